"""Where result columns come from, as the server knows it.

A RowDescription names, for each column that is a plain reference to a table's (or a
view's) column, the relation's OID and the column's number, followed by the server
through aliases, joins, subqueries and CTEs. Mapped through the catalog to
schema.table.column, column mask rules apply exactly: an alias of a masked column is
masked, a same-named column of another table is not. Views count as reading the columns
they are built on (pg_depend), so a view over a masked column is masked whole.

The catalog is read on a side connection the proxy opens itself, with the injected
credentials (never in the agent's session, whose settings the agent controls), by
`CatalogFetch`: a scripted client driving a twin of the session's own layer, so the
side connection authenticates under exactly the same rules (TLS, SCRAM). One snapshot
per target and database is shared by its sessions; DDL run through the proxy drops it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hostagent.policy import Decision, Request
from hostagent.protocols.api import (CLIENT, Answer, Close, Command, DataReceived, OpenSide,
                                     Record, SideAnswered, Start, StartUpstreamTls, ToClient,
                                     ToUpstream)
from hostagent.protocols.postgres import messages as m
from hostagent.protocols.postgres.names import SearchPath, parse_path

# Everything qualified, search_path pinned: the injected role's settings (which an agent
# may have changed with ALTER ROLE ... SET) must not redirect what these read.
CATALOG_SQL = (
    "SET search_path = pg_catalog; SET statement_timeout = '10s'; "
    "SELECT c.oid, c.relkind, n.nspname, c.relname, a.attnum, a.attname "
    "FROM pg_catalog.pg_attribute a "
    "JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) a.attrelid "
    "JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace "
    "WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f') AND a.attnum OPERATOR(pg_catalog.>) 0 "
    "AND NOT a.attisdropped AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
    "AND n.nspname NOT LIKE 'pg\\_toast%' ORDER BY 1, 5; "
    "SELECT DISTINCT r.ev_class, d.refobjid, d.refobjsubid "
    "FROM pg_catalog.pg_depend d "
    "JOIN pg_catalog.pg_rewrite r ON r.oid OPERATOR(pg_catalog.=) d.objid "
    "WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_rewrite'::pg_catalog.regclass "
    "AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass "
    "AND r.ev_class OPERATOR(pg_catalog.<>) d.refobjid; "
    "SELECT DISTINCT p.proname FROM pg_catalog.pg_proc p "
    "JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace "
    "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema'); "
    # the path a session of this role starts with (before our SET)
    "SELECT reset_val FROM pg_catalog.pg_settings "
    "WHERE name OPERATOR(pg_catalog.=) 'search_path'; "
    # views calling functions of the database's own (which may read anything)
    "SELECT DISTINCT r.ev_class FROM pg_catalog.pg_depend d "
    "JOIN pg_catalog.pg_rewrite r ON r.oid OPERATOR(pg_catalog.=) d.objid "
    "JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) d.refobjid "
    "JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace "
    "WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_rewrite'::pg_catalog.regclass "
    "AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass "
    "AND n.nspname NOT IN ('pg_catalog', 'information_schema'); "
    # a parent's (or partitioned table's) scan returns its children's rows
    "SELECT inhrelid, inhparent FROM pg_catalog.pg_inherits")
MAX_CATALOG_BYTES = 64 << 20     # a catalog bigger than this is not held (all masked)


@dataclass(frozen=True)
class Relation:
    schema: str
    name: str
    kind: str                     # pg_class.relkind: r table, v view, m matview, ...
    columns: tuple[str, ...]      # by attnum - 1 ("" for a dropped number)


@dataclass
class Catalog:
    """One database's relations as the side connection saw them."""
    relations: dict[int, Relation]
    view_reads: dict[int, frozenset[tuple[int, int]]]   # view -> (oid, attnum; 0: all) read
    user_functions: frozenset[str]                      # names outside pg_catalog
    search_path: str = '"$user", public'                # a new session's
    view_calls: frozenset[int] = frozenset()            # views calling user functions
    parents: dict[int, frozenset[int]] = field(default_factory=dict)   # inheritance
    generation: int = 0
    _masks: dict = field(default_factory=dict)

    def schemas_of(self, name: str) -> set[str]:
        """The schemas holding a relation of this name."""
        index = self._masks.get("schemas")
        if index is None:
            index = self._masks["schemas"] = {}
            for rel in self.relations.values():
                index.setdefault(rel.name.lower(), set()).add(rel.schema)
        return index.get(name, set())

    def knows(self, oid: int, attnum: int) -> bool:
        rel = self.relations.get(oid)
        return rel is not None and 0 < attnum <= len(rel.columns) and bool(rel.columns[attnum - 1])

    def masked(self, masker) -> "MaskedColumns":
        """Which columns this masker masks, worked out once per set of rules."""
        key = masker.rules
        found = self._masks.get(key)
        if found is None:
            found = self._masks[key] = MaskedColumns.build(self, masker)
        return found


@dataclass(frozen=True)
class MaskedColumns:
    columns: dict[tuple[int, int], str]    # (oid, attnum) -> rule
    views: dict[int, str]                  # a view reading masked data -> rule: all masked
    names: frozenset[str]                  # relations (by name) holding masked data

    @classmethod
    def build(cls, catalog: Catalog, masker) -> "MaskedColumns":
        columns: dict[tuple[int, int], str] = {}
        rels = catalog.relations
        for oid, rel in rels.items():
            for i, name in enumerate(rel.columns):
                if name:
                    rule = (masker.column_masked(rel.name, name) or
                            masker.column_masked(f"{rel.schema}.{rel.name}", name))
                    if rule:
                        columns[(oid, i + 1)] = rule
        changed = True
        while changed:   # a parent's column of a masked child's column name, up the tree
            changed = False
            for (oid, num), rule in list(columns.items()):
                name = rels[oid].columns[num - 1]
                for parent in catalog.parents.get(oid, ()):
                    cols = rels[parent].columns if parent in rels else ()
                    if name in cols and (parent, cols.index(name) + 1) not in columns:
                        columns[(parent, cols.index(name) + 1)] = rule
                        changed = True
        masked_rels = {oid for oid, _ in columns}
        views: dict[int, str] = {v: "(view over the database's own functions)"
                                 for v in catalog.view_calls} if masker.column_rules else {}
        changed = True
        while changed:   # views over views: until nothing more is found
            changed = False
            for view, reads in catalog.view_reads.items():
                if view in views:
                    continue
                for oid, num in reads:
                    # num 0: the whole row (SELECT p::text FROM people p)
                    rule = views.get(oid) or (columns.get((oid, num)) if num else next(
                        (r for (o, _), r in columns.items() if o == oid), None))
                    if rule:
                        views[view] = rule
                        changed = True
                        break
        names = frozenset(rels[o].name.lower() for o in masked_rels | set(views) if o in rels)
        return cls(columns, views, names)

    def rule(self, oid: int, attnum: int) -> str | None:
        return self.views.get(oid) or self.columns.get((oid, attnum))


class CatalogCache:
    """A target's catalog snapshots, one per database, shared by its sessions. DDL run
    through the proxy bumps the generation: snapshots older than it are read again
    before a result that needs them is masked."""

    def __init__(self):
        self.generation = 0
        self._by_db: dict[str, Catalog] = {}

    def get(self, database: str) -> Catalog | None:
        return self._by_db.get(database)

    def put(self, database: str, catalog: Catalog) -> None:
        if catalog.generation == self.generation:   # else DDL ran while it was read
            self._by_db[database] = catalog

    def invalidate(self) -> None:
        self.generation += 1
        self._by_db.clear()


def build(results: list[list[list[bytes | None]]], generation: int) -> Catalog:
    """A Catalog from CATALOG_SQL's six results (text format)."""
    if len(results) != 6:
        raise ValueError(f"expected 6 results, got {len(results)}")
    cols: dict[int, tuple[str, str, str, dict[int, str]]] = {}
    for oid, kind, schema, rel, attnum, att in results[0]:
        entry = cols.setdefault(int(oid), (schema.decode(), rel.decode(), kind.decode(), {}))
        entry[3][int(attnum)] = att.decode()
    relations = {}
    for oid, (schema, rel, kind, atts) in cols.items():
        width = max(atts)
        relations[oid] = Relation(schema, rel, kind,
                                  tuple(atts.get(i, "") for i in range(1, width + 1)))
    view_reads: dict[int, set] = {}
    for view, ref, sub in results[1]:
        view_reads.setdefault(int(view), set()).add((int(ref), int(sub)))
    functions = frozenset(name.decode() for (name,) in results[2])
    path = results[3][0][0].decode() if results[3] and results[3][0][0] is not None else ""
    view_calls = frozenset(int(v) for (v,) in results[4])
    parents: dict[int, set] = {}
    for child, parent in results[5]:
        parents.setdefault(int(child), set()).add(int(parent))
    return Catalog(relations, {k: frozenset(v) for k, v in view_reads.items()}, functions,
                   path, view_calls, {k: frozenset(v) for k, v in parents.items()}, generation)


class CatalogFetch:
    """A side-connection layer (see api.OpenSide): logs in through `twin` (a fresh
    PostgresLayer with the target's credentials and TLS rules, no policy, no masks),
    runs CATALOG_SQL, answers with a Catalog and says goodbye. Anything unexpected ends
    it without an answer: the session then masks every result column."""

    def __init__(self, twin, user: str, database: str, generation: int):
        self.twin = twin
        self.generation = generation
        self.startup = m.startup_message({"user": user, "database": database,
                                          "application_name": "agentgate catalog"})
        self.reader = m.FrameReader()
        self.results: list[list] = []
        self.size = 0
        self.asked = False

    def handle(self, event) -> list:
        out = self._filter(self.twin.handle(event))
        if type(event) is Start:
            out += self._filter(self.twin.handle(DataReceived(CLIENT, self.startup)))
        return out

    def buffered(self) -> int:
        return self.size + self.reader.buffered

    def _filter(self, commands) -> list:
        out = []
        for cmd in commands:
            t = type(cmd)
            if t is ToUpstream or t is StartUpstreamTls:
                out.append(cmd)
            elif t is ToClient:
                out += self._from_server(cmd.data)
            elif t is Close:
                out.append(Close(f"catalog: {cmd.reason}"))
            elif t is not Record:
                out.append(Close(f"catalog: unexpected {t.__name__}"))
            if out and type(out[-1]) is Close:
                break
        return out

    def _from_server(self, data: bytes) -> list:
        out: list = []
        for kind, body in self.reader.receive_data(data):
            if kind == b"E":
                return [Close("catalog query failed: " + m.parse_fields(body).get("M", "?"))]
            if kind == b"T":
                self.results.append([])
            elif kind == b"D":
                self.size += len(body) + 64
                if self.size > MAX_CATALOG_BYTES:
                    return [Close("catalog too large to hold")]
                self.results[-1].append(m.parse_data_row(body))
            elif kind == b"Z":
                if not self.asked:
                    self.asked = True
                    out += self._filter(self.twin.handle(DataReceived(
                        CLIENT, m.frame(b"Q", CATALOG_SQL.encode() + b"\0"))))
                else:
                    try:
                        catalog = build(self.results, self.generation)
                    except (ValueError, TypeError, AttributeError) as exc:
                        return [Close(f"catalog unreadable: {exc}")]
                    return [Answer(catalog), ToUpstream(m.frame(b"X")),
                            Close("catalog read")]
        return out


def _allow(_req: Request) -> Decision:
    return Decision("allow", "(agentgate catalog)", "the proxy's own query")


class UsesCatalog:
    """The PostgreSQL layer's use of the catalog: when to read it (the session's start,
    a result from a relation it doesn't know), holding the server's messages meanwhile,
    and unqualified table names resolved through the search path. A mixin of
    PostgresLayer."""

    def _can_read_catalog(self) -> bool:
        # the side connection logs in with the injected credentials; without them
        # (the agent's own password passes through) masks follow names alone
        return (self.catalogs is not None and self.password is not None
                and (self.wants_catalog or (self.masker is not None and self.masker.column_rules))
                and self._catalog_failed != self.catalogs.generation)

    def _current_catalog(self):
        cat = self.catalog
        if cat is not None and cat.generation == self.catalogs.generation:
            return cat
        cat = self.catalog = self.catalogs.get(self.database)
        return cat

    def _catalog_needed(self, body: bytes) -> bool:
        if not self._can_read_catalog():
            return False
        cat = self._current_catalog()
        for col in m.parse_row_description(body):
            if col.table_oid and (cat is None or not cat.knows(col.table_oid, col.column)) \
                    and col.table_oid not in self._catalog_tried:
                return True
        return False

    def _tables_resolver(self, named: bool):
        """A statement's tables with unqualified names also as the relations the search
        path finds: now, or, for what runs later (a named prepared statement, PREPARE, a
        body), wherever a later path may find them."""
        cat = self._current_catalog() if self.catalogs is not None else None
        if self.names is None:
            self.names = SearchPath(self.upstream_user or self.database)
            if cat is not None:
                self.names.learned_initial(parse_path(cat.search_path))

        def tables_of(st):
            if not any("." not in t for t in st.tables):
                return st.tables
            later = named or st.code or "PREPARE" in st.kinds
            return self.names.resolve(st.tables, cat, later)
        return tables_of

    def _fetch_catalog(self) -> list[Command]:
        if self._fetching:
            return []
        self._fetching = True
        twin = type(self)(decide=_allow, target=self.target, user=self.upstream_user,
                          password=self.password, tls=self.tls, ca=self.ca,
                          server_name=self.server_name,
                          weak_password_auth=self.upstream_auth.weak)
        return [OpenSide(0, CatalogFetch(twin, self.upstream_user, self.database,
                                         self.catalogs.generation))]

    def _catalog_read(self, event: SideAnswered) -> list[Command]:
        self._fetching = False
        out: list[Command] = []
        if event.value is not None:
            self.catalog = event.value
            self.catalogs.put(self.database, event.value)
        else:
            # nothing is proven clean: every result column is masked (masks.py) until
            # DDL makes another read worth trying (or the next session tries again)
            self._catalog_failed = self.catalogs.generation
            out.append(Record("catalog", {"error": event.error,
                                          "masking": "every column masked"}))
        stalled, self._stalled, self._stalled_bytes = self._stalled or [], None, 0
        cat = self.catalog
        for kind, body in stalled[:1]:
            if kind == b"T":   # what even a fresh read doesn't know is not asked again
                self._catalog_tried.update(
                    c.table_oid for c in m.parse_row_description(body)
                    if c.table_oid and (cat is None or not cat.knows(c.table_oid, c.column)))
        return out + self._upstream_frames(stalled)
