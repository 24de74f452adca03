"""Which result shape the rows coming back belong to, and where its columns come from:
what masking needs to follow a result through the extended protocol's pipeline."""
from __future__ import annotations

from dataclasses import replace

from hostagent.protocols.postgres import messages as m

OPAQUE_CODE = frozenset({"CALL"})


class Results:
    """Which result shape the rows coming back belong to, following the client's
    messages in order (simple queries carry their RowDescription; an extended Execute
    uses the one its statement or portal was described with)."""

    def __init__(self):
        self._expect: list[tuple] = []            # client order: describe/execute/sync/query
        self._stmt_plan: dict[str, list] = {}
        self._portal_plan: dict[str, list] = {}
        self._portal_stmt: dict[str, str] = {}
        # Where each result's columns come from, snapshotted in client order: a
        # pipeline may re-use a statement name (or the unnamed one) before the server
        # has answered for the earlier text. None: unknown, every column is masked.
        self._stmt_prov: dict[str, tuple | None] = {}
        self._portal_prov: dict[str, tuple | None] = {}
        self._plan: list | None = None

    def client(self, kind: bytes, body: bytes) -> None:
        c = m.Cursor(body)
        if kind == b"Q":
            self._expect.append(("query", None))
        elif kind == b"B":
            portal, stmt = c.cstr(), c.cstr()
            self._portal_stmt[portal] = stmt
            self._portal_plan.pop(portal, None)
            self._portal_prov[portal] = self._stmt_prov.get(stmt)
        elif kind == b"D":
            what = body[:1]
            c.pos = 1
            name = c.cstr()
            prov = (self._stmt_prov if what == b"S" else self._portal_prov).get(name)
            self._expect.append(("describe", what, name, prov))
        elif kind == b"E":
            self._expect.append(("execute", c.cstr()))
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
            return self._portal_prov.get(front[1])
        if front[0] == "describe":
            return front[3]
        return False

    def set_plan(self, plan: list) -> None:
        front = self._expect[0] if self._expect else ("query",)
        if front[0] == "describe":
            self._expect.pop(0)
            (self._stmt_plan if front[1] == b"S" else self._portal_plan)[front[2]] = plan
        self._plan = plan

    def plan(self) -> list | None:
        front = self._expect[0] if self._expect else ("query",)
        if front[0] == "execute":
            portal = front[1]
            return self._portal_plan.get(portal) or self._stmt_plan.get(
                self._portal_stmt.get(portal, ""))
        return self._plan

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
