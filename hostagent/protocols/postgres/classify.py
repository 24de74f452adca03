"""What a SQL text does, judged by a real parser (libpg_query via pglast), not by its
first keyword: every statement in it, the statements nested in CTEs and in DO blocks
(PL/pgSQL), the tables and functions it touches, and the risky shapes policy cares
about. Text that does not parse raises Unparseable; the caller decides (deny by
default)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace

from pglast import ast, parse_plpgsql, parse_sql
from pglast.parser import ParseError, scan
from pglast.visitors import Skip, Visitor

from hostagent.protocols.cache import TextCache

# node type -> statement kind
KINDS = {
    "SelectStmt": "SELECT", "InsertStmt": "INSERT", "UpdateStmt": "UPDATE",
    "DeleteStmt": "DELETE", "MergeStmt": "MERGE", "TruncateStmt": "TRUNCATE",
    "DropStmt": "DROP", "AlterTableStmt": "ALTER", "AlterObjectSchemaStmt": "ALTER",
    "RenameStmt": "ALTER", "AlterDatabaseStmt": "ALTER", "AlterRoleStmt": "ALTER",
    "CreateStmt": "CREATE", "CreateTableAsStmt": "CREATE", "IndexStmt": "CREATE",
    "ViewStmt": "CREATE", "CreateFunctionStmt": "CREATE", "CreateRoleStmt": "CREATE",
    "CreatedbStmt": "CREATE", "CreateSchemaStmt": "CREATE", "CreateExtensionStmt": "CREATE",
    "DropdbStmt": "DROP", "DropRoleStmt": "DROP", "CopyStmt": "COPY", "DoStmt": "DO",
    "CallStmt": "CALL", "VariableSetStmt": "SET", "VariableShowStmt": "SHOW",
    "GrantStmt": "GRANT", "GrantRoleStmt": "GRANT", "TransactionStmt": "TRANSACTION",
    "ExplainStmt": "EXPLAIN", "PrepareStmt": "PREPARE", "ExecuteStmt": "EXECUTE",
    "DeallocateStmt": "DEALLOCATE", "VacuumStmt": "VACUUM", "LockStmt": "LOCK",
    "ListenStmt": "LISTEN", "NotifyStmt": "NOTIFY", "AlterSystemStmt": "ALTER",
}
# Functions that read or write the server's files or run programs.
FILE_FUNCTIONS = frozenset({"pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file",
                            "lo_import", "lo_export", "lo_get", "lo_put", "pg_file_write",
                            "pg_ls_logdir", "pg_ls_waldir", "pg_ls_tmpdir", "pg_ls_archive_statusdir",
                            "dblink", "dblink_exec"})
SQL_FUNCTIONS = frozenset({"query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema",
                           "table_to_xml", "table_to_xmlschema", "table_to_xml_and_xmlschema",
                           "cursor_to_xml", "schema_to_xml", "database_to_xml", "dblink",
                           "dblink_exec", "dblink_open", "dblink_send_query"})


def _kind(node_name: str) -> str:
    """A statement node's kind: the known ones by name, the rest by their verb."""
    if node_name in KINDS:
        return KINDS[node_name]
    for verb in ("Create", "Alter", "Drop", "Grant", "Reassign", "Comment", "Security",
                 "Import", "Refresh", "Reindex", "Cluster", "Load", "Discard", "Checkpoint"):
        if node_name.startswith(verb):
            return verb.upper()
    return node_name.removesuffix("Stmt").upper()


_ASSIGN = re.compile(r'^\s*[\w."\[\]]+\s*:?=\s*')


class Unparseable(Exception):
    pass


@dataclass(frozen=True)
class Statement:
    kind: str                                  # the top-level kind, e.g. "DROP"
    text: str
    kinds: frozenset[str] = frozenset()        # every kind inside, nested ones included
    tables: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    flags: frozenset[str] = field(default_factory=frozenset)
    # result column name -> the columns it is computed from ("table.column", or
    # "column" where the table isn't known): masking follows a column through
    # aliases and expressions (SELECT lower(email) AS e)
    sources: tuple[tuple[str, frozenset[str]], ...] = ()
    lineage: "Lineage | None" = None


@dataclass(frozen=True)
class Lineage:
    """What masking needs beyond `sources`, to fail closed where names can't be
    followed: every column the statement reads anywhere (subqueries included), whether
    it reads whole rows (row_to_json(p), p.*::text), the result columns whose value is
    opaque to us (a subquery, a whole row), and whether FROM renames columns (alias
    lists, functions in FROM, joins with an alias), after which names prove nothing."""
    columns: frozenset[str] = frozenset()        # "column" as written (qualifier dropped)
    whole_rows: bool = False
    opaque: frozenset[str] = frozenset()         # result names
    renamed: bool = False


class _Walk(Visitor):
    def __init__(self):
        super().__init__()
        self.kinds: set[str] = set()
        self.tables: list[str] = []
        self.functions: list[str] = []
        self.flags: set[str] = set()

    def visit(self, ancestors, node):
        name = type(node).__name__
        if name.endswith("Stmt") and name != "RawStmt":
            self.kinds.add(_kind(name))
        if isinstance(node, ast.RangeVar):
            self.tables.append(".".join(p for p in (node.schemaname, node.relname) if p))
            if node.schemaname:
                self.tables.append(node.relname)   # a rule on the bare name still matches
        elif isinstance(node, ast.FuncCall):
            fname = ".".join(s.sval for s in node.funcname if isinstance(s, ast.String))
            self.functions.append(fname)
            bare = fname.rsplit(".", 1)[-1].lower()
            if bare in FILE_FUNCTIONS:
                self.flags.add("server_files")
            if bare in SQL_FUNCTIONS:
                self.flags.add("dynamic_sql")   # runs SQL (or reads tables) we can't see
        elif isinstance(node, (ast.DeleteStmt, ast.UpdateStmt)) and node.whereClause is None:
            self.flags.add("no_where")
        elif isinstance(node, ast.CopyStmt):
            if node.is_program:
                self.flags.add("copy_program")
            elif node.filename:
                self.flags.add("server_files")
            elif not node.is_from:
                self.flags.add("copy_out")
        elif isinstance(node, ast.DropStmt) and node.removeType is not None:
            for obj in node.objects or ():
                if isinstance(obj, tuple) and all(isinstance(p, ast.String) for p in obj):
                    self.tables.append(".".join(p.sval for p in obj))
        elif isinstance(node, ast.DoStmt):
            self._do_block(node)

    def _do_block(self, node: ast.DoStmt) -> None:
        body, language = "", "plpgsql"
        for arg in node.args or ():
            if arg.defname == "as":
                body = arg.arg.sval
            elif arg.defname == "language":
                language = arg.arg.sval
        if language != "plpgsql":
            self.flags.add("untrusted_language")
            return
        try:
            tree = parse_plpgsql(f"CREATE FUNCTION f() RETURNS void AS $agq${body}$agq$ "
                                 "LANGUAGE plpgsql")
        except ParseError:
            self.flags.add("unparseable_block")
            return
        for query, dynamic in _plpgsql_queries(tree):
            if dynamic:
                self.flags.add("dynamic_sql")
                continue
            inner = None
            rhs = _ASSIGN.sub("", query, count=1)
            # a statement, an expression, or the right side of an assignment
            for text in (query, f"SELECT {query}", f"SELECT {rhs}"):
                try:
                    inner = parse_sql(text)
                    break
                except ParseError:
                    continue
            if inner is None:
                self.flags.add("unparseable_block")
                continue
            self(inner)


def _plpgsql_queries(tree) -> list[tuple[str, bool]]:
    """(query text, is dynamic) for every SQL statement and expression in a PL/pgSQL tree:
    statements, FOR ... IN queries, assignments, conditions, RETURN and RAISE arguments."""
    out: list[tuple[str, bool]] = []

    def walk(value):
        if isinstance(value, dict):
            for key, inner in value.items():
                if key in ("PLpgSQL_stmt_dynexecute", "PLpgSQL_stmt_dynfors"):
                    out.append(("", True))
                elif key == "PLpgSQL_expr" and isinstance(inner, dict) and "query" in inner:
                    out.append((inner["query"], False))
                else:
                    walk(inner)
        elif isinstance(value, list):
            for item in value:
                walk(item)
    walk(tree if not isinstance(tree, str) else json.loads(tree))
    return out


def _nodes(tree, *types) -> list:
    """Every node of these types in `tree`, nested ones included. A plain walk of the
    nodes' slots: a pglast Visitor per call costs time in the size of the whole list it
    sits in, which made wide SELECT lists quadratic (one agent could stall the loop)."""
    out, stack = [], [tree]
    while stack:
        n = stack.pop()
        if isinstance(n, (list, tuple)):
            stack.extend(n)
        elif isinstance(n, ast.Node):
            if isinstance(n, types):
                out.append(n)
            for attr in n.__slots__:
                v = getattr(n, attr, None)
                if isinstance(v, (ast.Node, list, tuple)):
                    stack.append(v)
    return out


def _fields(ref: ast.ColumnRef) -> list[str]:
    return [f.sval if isinstance(f, ast.String) else "*" for f in ref.fields]


def _result_targets(stmt) -> tuple:
    """The ResTargets that make a statement's result columns: a SELECT's list, or the
    RETURNING of a write (pglast spells it returningClause from PostgreSQL 18 on)."""
    if isinstance(stmt, ast.SelectStmt):
        return tuple(stmt.targetList or ())
    if isinstance(stmt, (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)):
        ret = getattr(stmt, "returningClause", None)
        if ret is not None:
            return tuple(ret.exprs or ())
        return tuple(getattr(stmt, "returningList", None) or ())
    return ()


def _refs(node) -> set[tuple[str, str]]:
    """(qualifier, column) for every column reference in an expression; a whole-row
    reference (t.*, or a bare table name) counts as every column of it."""
    refs = set()
    for ref in _nodes(node, ast.ColumnRef):
        parts = _fields(ref)
        refs.add(((parts[-2] if len(parts) > 1 else ""), parts[-1]))
    return refs


def _scope(from_clause, ctes: dict) -> tuple[dict[str, str], dict[str, dict]]:
    """Names visible in a FROM: alias -> table, and alias -> a subquery's (or CTE's)
    own column sources."""
    tables: dict[str, str] = {}
    derived: dict[str, dict] = {}

    class _From(Visitor):
        def visit(self, ancestors, n):
            if isinstance(n, ast.RangeVar):
                name = n.alias.aliasname if n.alias else n.relname
                if not n.schemaname and n.relname in ctes:
                    derived[name] = ctes[n.relname]
                else:
                    tables[name] = n.relname
            elif isinstance(n, ast.RangeSubselect) and n.alias:
                derived[n.alias.aliasname] = _select_sources(n.subquery, ctes)
                return Skip
    _From()(from_clause or ())
    return tables, derived


def _lineage(stmt) -> Lineage:
    relnames: set[str] = set()
    renamed = False
    for n in _nodes(stmt, ast.RangeVar, ast.RangeFunction, ast.RangeTableFunc,
                    ast.RangeSubselect, ast.JoinExpr, ast.CommonTableExpr):
        if isinstance(n, ast.RangeVar):
            relnames.add(n.relname)
            if n.alias:
                relnames.add(n.alias.aliasname)
        elif isinstance(n, (ast.RangeFunction, ast.RangeTableFunc)):
            renamed = True
        elif isinstance(n, (ast.RangeSubselect, ast.JoinExpr)) and n.alias is not None:
            renamed = renamed or bool(n.alias.colnames) or isinstance(n, ast.JoinExpr)
        elif isinstance(n, ast.CommonTableExpr) and n.aliascolnames:
            renamed = True
    targets = [t for t in _result_targets(stmt) if isinstance(t, ast.ResTarget)]
    # a star as a whole result column is expanded by the server into named columns
    top_stars = {id(t.val) for t in targets if isinstance(t.val, ast.ColumnRef)
                 and isinstance(t.val.fields[-1], ast.A_Star)}
    columns: set[str] = set()
    whole = False
    for ref in _nodes(stmt, ast.ColumnRef):
        parts = _fields(ref)
        if (parts[-1] == "*" and id(ref) not in top_stars) or (
                len(parts) == 1 and parts[0] in relnames):
            whole = True
        if parts[-1] != "*":
            columns.add(parts[-1])
    opaque: set[str] = set()
    for t in targets:
        if isinstance(t.val, ast.ColumnRef):
            f = t.val.fields
            if len(f) == 1 and isinstance(f[0], ast.String) and f[0].sval in relnames:
                opaque.add(t.name or f[0].sval)   # SELECT p FROM people p: a whole row
            continue   # plain columns (and top-level stars) are followed by name
        if any(isinstance(n, (ast.SubLink, ast.A_Star)) or (
                isinstance(n, ast.ColumnRef) and (
                    isinstance(n.fields[-1], ast.A_Star) or
                    (len(n.fields) == 1 and n.fields[0].sval in relnames)))
               for n in _nodes(t.val, ast.SubLink, ast.A_Star, ast.ColumnRef)):
            opaque.add(t.name or "?column?")
    return Lineage(frozenset(columns), whole, frozenset(opaque), renamed)


def _select_sources(node, ctes: dict | None = None) -> dict[str, frozenset[str]]:
    ctes = dict(ctes or {})
    if isinstance(node, (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt)):
        targets = _result_targets(node)
        rel = node.relation
        tables, derived = {(rel.alias.aliasname if rel.alias else rel.relname): rel.relname}, {}
        if isinstance(node, ast.UpdateStmt) and node.fromClause:
            t2, derived = _scope(node.fromClause, ctes)
            tables.update(t2)
    elif isinstance(node, ast.SelectStmt):
        if node.withClause:
            for cte in node.withClause.ctes or ():
                ctes[cte.ctename] = _select_sources(cte.ctequery, ctes)
        if node.op is not None and node.larg is not None and node.op != 0:
            # UNION etc.: the result's columns are named by the left side; each comes
            # from both sides (conservatively: a name from either)
            left, right = _select_sources(node.larg, ctes), _select_sources(node.rarg, ctes)
            merged = {k: v | frozenset().union(*right.values()) for k, v in left.items()}
            return merged
        targets = node.targetList or ()
        tables, derived = _scope(node.fromClause, ctes)
    else:
        return {}
    out: dict[str, frozenset[str]] = {}
    for t in targets:
        if not isinstance(t, ast.ResTarget):
            continue
        srcs: set[str] = set()
        for qual, col in _refs(t.val):
            if qual in derived:
                inner = derived[qual]
                srcs |= set().union(*inner.values()) if col == "*" else set(inner.get(col, ()))
            elif qual in tables:
                srcs.add(f"{tables[qual]}.{col}")
            elif not qual and col != "*":
                srcs.add(col)
                for d in derived.values():
                    srcs |= set(d.get(col, ()))
        if t.name:
            name = t.name
        elif isinstance(t.val, ast.ColumnRef):
            f = t.val.fields[-1]
            name = f.sval if isinstance(f, ast.String) else "*"
        elif isinstance(t.val, ast.FuncCall):
            name = t.val.funcname[-1].sval
        else:
            name = "?column?"
        if name == "*":   # a star over a subquery or CTE carries its columns' sources
            for qual, _c in _refs(t.val):
                for d in ([derived[qual]] if qual in derived else
                          derived.values() if not qual else []):
                    for k, v in d.items():
                        out[k] = out.get(k, frozenset()) | v
            continue
        out[name] = out.get(name, frozenset()) | frozenset(srcs)
    return out


_NUMBERS = frozenset({"ICONST", "FCONST"})
_SHAPES_MAX = 4096
_shapes: dict[str, tuple[int, Statement]] = {}


def _shape(sql: str) -> str | None:
    """The text with its numeric literals blanked: statements that differ only in numbers
    (`WHERE aid = 12345`) are the same to policy and masking. Only numbers: a string
    literal can be a DO body or a COPY program, and must be judged every time."""
    try:
        tokens = scan(sql)
    except ParseError:
        return None
    parts, at = [], 0
    for t in tokens:
        if t.name in _NUMBERS:
            parts.append(sql[at:t.start])
            parts.append("\0" + t.name[0])
            at = t.end + 1
    if not parts:
        return None   # nothing to blank: the exact-text cache covers it
    parts.append(sql[at:])
    return "".join(parts)


_cache = TextCache()


def classify(sql: str) -> tuple[Statement, ...]:
    """One Statement per top-level statement in `sql` (a simple Query may hold many).
    Pure, so cached (bounded by bytes): agents send the same statements again and again,
    often with only the numbers changed (a tokenizer pass, ~5 us, instead of a parse,
    ~200 us)."""
    hit = _cache.get(sql)
    if hit is not None:
        return hit
    out = _classify_uncached(sql)
    _cache.put(sql, out, 2 * len(sql))   # the text, and the statements made of it
    return out


def _classify_uncached(sql: str) -> tuple[Statement, ...]:
    key = _shape(sql) if len(sql) < 4096 else None
    hit = _shapes.get(key) if key is not None else None
    if hit is not None:
        start, tail, st = hit   # the text around the numbers is the same: so are these
        return (replace(st, text=sql[start:len(sql) - tail].strip()),)
    out, spans = _classify(sql)
    if key is not None and len(out) == 1:
        if len(_shapes) >= _SHAPES_MAX:
            _shapes.clear()
        _shapes[key] = (spans[0][0], len(sql) - spans[0][1], out[0])
    return out


def _classify(sql: str) -> tuple[tuple[Statement, ...], tuple[tuple[int, int], ...]]:
    try:
        raw = parse_sql(sql)
    except ParseError as exc:
        raise Unparseable(str(exc)) from None
    out, spans = [], []
    for stmt in raw:
        walk = _Walk()
        walk(stmt.stmt)
        if "unparseable_block" in walk.flags:
            # part of it can't be read: the whole text is judged as unparseable
            raise Unparseable("a procedural block contains code the parser can't read")
        kind = _kind(type(stmt.stmt).__name__)
        start = stmt.stmt_location or 0
        end = start + stmt.stmt_len if stmt.stmt_len else len(sql)
        spans.append((start, end))
        out.append(Statement(kind=kind, text=sql[start:end].strip(),
                             kinds=frozenset(walk.kinds | {kind}),
                             tables=tuple(dict.fromkeys(walk.tables)),
                             functions=tuple(dict.fromkeys(walk.functions)),
                             flags=frozenset(walk.flags),
                             sources=tuple(_select_sources(stmt.stmt).items()),
                             lineage=_lineage(stmt.stmt)))
    return tuple(out), tuple(spans)
