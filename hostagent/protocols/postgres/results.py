"""Which result shape the rows coming back belong to, and where its columns come from:
what masking needs to follow a result through the extended protocol's pipeline."""
from __future__ import annotations

from dataclasses import replace

from hostagent.protocols.postgres import messages as m
from hostagent.protocols.postgres.masks import in_formats

OPAQUE_CODE = frozenset({"CALL"})


class Results:
    """Which result shape the rows coming back belong to, following the client's
    messages in order (simple queries carry their RowDescription; an extended Execute
    uses the one its statement or portal was described with).

    Statements and portals are versioned in client order (each Parse, Bind or Close of a
    name is a new version): a shape described for an earlier text under the same name
    never applies to rows of a later one, and a portal no Bind of ours made (an SQL
    cursor) has no shape, so its rows are masked whole."""

    def __init__(self):
        self._expect: list[tuple] = []            # client order: describe/execute/sync/query
        self._version: dict[tuple[bytes, str], int] = {}
        self._next = 0
        self._plans: dict[tuple[bytes, str], tuple[int, list]] = {}   # described shapes
        # portal -> (statement, version, the result formats its Bind asked for)
        self._portal_stmt: dict[str, tuple[str, int, tuple]] = {}
        # Where each result's columns come from, snapshotted in client order: a
        # pipeline may re-use a statement name (or the unnamed one) before the server
        # has answered for the earlier text. None: unknown, every column is masked.
        self._stmt_prov: dict[str, tuple | None] = {}
        self._portal_prov: dict[str, tuple | None] = {}
        self._plan: list | None = None
        self._formatted: dict[tuple, tuple[list, list]] = {}

    def _bump(self, what: bytes, name: str) -> int:
        self._next += 1
        self._version[(what, name)] = self._next
        return self._next

    def client(self, kind: bytes, body: bytes) -> None:
        c = m.Cursor(body)
        if kind == b"Q":
            self._bump(b"S", "")   # a simple query drops the unnamed statement and portal
            self._bump(b"P", "")
            self._expect.append(("query", None))
        elif kind == b"P":
            self._bump(b"S", c.cstr())
        elif kind == b"C":
            what = body[:1]
            c.pos = 1
            self._bump(what, c.cstr())
        elif kind == b"B":
            bind = m.parse_bind(body)
            portal, stmt = bind.portal, bind.statement
            self._bump(b"P", portal)
            # (the formats the rows will come in: a statement's description says text)
            self._portal_stmt[portal] = (stmt, self._version.get((b"S", stmt), 0),
                                         bind.result_formats)
            self._portal_prov[portal] = self._stmt_prov.get(stmt)
        elif kind == b"D":
            what = body[:1]
            c.pos = 1
            name = c.cstr()
            prov = (self._stmt_prov if what == b"S" else self._portal_prov).get(name)
            self._expect.append(("describe", what, name, prov,
                                 self._version.get((what, name), 0)))
        elif kind == b"E":
            portal = c.cstr()
            bound = self._portal_stmt.get(portal)
            self._expect.append(("execute", portal, self._portal_prov.get(portal),
                                 self._version.get((b"P", portal), 0), bound))
        elif kind == b"S":
            self._expect.append(("sync",))

    def provenance(self, statement: str | None, prov: tuple | None) -> None:
        """What a Query (statement None) or a Parse (its name) reads: (tables, sources,
        lineages), or None when it can't be known."""
        if statement is not None:
            self._stmt_prov[statement] = prov
            return
        for i in range(len(self._expect) - 1, -1, -1):
            if self._expect[i][0] == "query":
                self._expect[i] = ("query", prov)
                return

    def current(self) -> tuple | None:
        front = self._expect[0] if self._expect else ("query", None)
        if front[0] == "describe":
            return front[3]
        if front[0] == "query":
            return front[1]
        return None

    def running(self) -> tuple | None | bool:
        """The provenance of what the server is running now (for its errors and
        notices): a query's or an executed portal's; None when unknown; False when no
        statement runs (errors of Parse, Bind, Sync)."""
        front = self._expect[0] if self._expect else ("sync",)
        if front[0] == "query":
            return front[1]
        if front[0] == "execute":
            return front[2]
        if front[0] == "describe":
            return front[3]
        return False

    def set_plan(self, plan: list) -> None:
        front = self._expect[0] if self._expect else ("query",)
        if front[0] == "describe":
            self._expect.pop(0)
            self._plans[(front[1], front[2])] = (front[4], plan)
        self._plan = plan

    def plan(self) -> list | None:
        front = self._expect[0] if self._expect else ("query",)
        if front[0] == "execute":
            _, portal, _prov, version, bound = front
            found = self._plans.get((b"P", portal))
            if found is not None and found[0] == version:
                return found[1]
            if bound is not None:   # described as a statement, this very text
                found = self._plans.get((b"S", bound[0]))
                if found is not None and found[0] == bound[1]:
                    return self._in_formats(found[1], bound[2])
            return None   # no shape of its own: masked whole
        return self._plan

    def _in_formats(self, plan: list, formats: tuple[int, ...]) -> list:
        # the same object for the same (plan, formats): the row loop compiles a plan once
        key = (id(plan), formats)
        cached = self._formatted.get(key)
        if cached is None or cached[0] is not plan:
            if len(self._formatted) >= 64:
                self._formatted.clear()
            cached = self._formatted[key] = (plan, in_formats(plan, formats))
        return cached[1]

    def done(self) -> None:
        if self._expect and self._expect[0][0] == "execute":
            self._expect.pop(0)

    def upstream(self, kind: bytes) -> None:
        if kind in (b"n", b"t") and self._expect and self._expect[0][0] == "describe":
            if kind == b"n":
                self._expect.pop(0)
        elif kind in (b"s", b"I") and self._expect and self._expect[0][0] == "execute":
            self._expect.pop(0)
        elif kind == b"E":
            # the server skips the rest up to Sync
            while self._expect and self._expect[0][0] not in ("sync", "query"):
                self._expect.pop(0)
        elif kind == b"Z" and self._expect:
            self._expect.pop(0)


def provenance(statements) -> tuple | None:
    """(tables, sources, lineages) of what a Query or Parse runs; None when some of it
    is unknown: unparsed, or rows of a statement prepared or declared earlier."""
    if not statements or any(st is None or st.lineage is None or
                             st.kinds & {"EXECUTE", "FETCH"} for st in statements):
        return None
    sources: dict[str, set] = {}
    for st in statements:
        for name, cols in st.sources:
            sources.setdefault(name, set()).update(cols)
    tables = {t.rsplit(".", 1)[-1] for st in statements for t in st.tables}
    # code we can't see into (a procedure, computed SQL) may read anything: as whole
    # rows; blocks and bodies read what they name
    lineages = [replace(st.lineage, whole_rows=True) if st.kinds & OPAQUE_CODE or st.unknown
                else replace(st.lineage, columns=st.lineage.columns | st.reads)
                for st in statements]
    functions = {f.rsplit(".", 1)[-1].lower() for st in statements for f in st.functions}
    kinds = frozenset().union(*(st.kinds for st in statements))
    return tables, sources, lineages, functions, kinds
