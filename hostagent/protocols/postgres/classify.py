"""What a SQL text does, judged by a real parser (libpg_query via pglast), not by its
first keyword: every statement in it and everything each can do (effects.py: nested
statements, bodies, rule actions, MERGE actions, known dynamic SQL, see plpgsql.py), the
tables and functions it touches, the risky shapes policy cares about (flags), what it
runs that can't be known from its text (`unknown`), and where its result columns come
from (for masking). Text that does not parse, or runs SQL that does not, raises
Unparseable; the caller decides (deny by default)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from pglast import ast, parse_sql
from pglast.parser import ParseError, scan
from pglast.visitors import Skip, Visitor

from hostagent.protocols.cache import TextCache
from hostagent.protocols.postgres.effects import FILE_FUNCTIONS, KINDS, SQL_FUNCTIONS, Unparseable
from hostagent.protocols.postgres.effects import Walk as _Walk
from hostagent.protocols.postgres.effects import find_nodes as _nodes
from hostagent.protocols.postgres.effects import statement_kind as _kind

__all__ = ["classify", "Statement", "Lineage", "Unparseable", "KINDS", "FILE_FUNCTIONS",
           "SQL_FUNCTIONS"]


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
    # flags naming what it runs that can't be known from its text (dynamic_sql,
    # untrusted_language): policy gives it the `unparseable` decision unless allowed
    unknown: frozenset[str] = frozenset()
    # every column it names, in bodies and dynamic SQL too (what masking must know it
    # may read)
    reads: frozenset[str] = frozenset()
    # it holds code that runs later or elsewhere (a block, a function or procedure body),
    # whose names resolve when it runs
    code: bool = False


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
    renamed = aliased = False
    for n in _nodes(stmt, ast.RangeVar, ast.RangeFunction, ast.RangeTableFunc,
                    ast.RangeSubselect, ast.JoinExpr, ast.CommonTableExpr):
        if isinstance(n, ast.RangeVar):
            relnames.add(n.relname)
            if n.alias:
                relnames.add(n.alias.aliasname)
                if n.alias.colnames:
                    # people x(a, b, c): its columns under names of the agent's choosing,
                    # so it counts as reading all of them
                    renamed = aliased = True
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
    return Lineage(frozenset(columns), whole or aliased, frozenset(opaque), renamed)


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


_WRITES = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "COPY"})


def _classify(sql: str) -> tuple[tuple[Statement, ...], tuple[tuple[int, int], ...]]:
    try:
        raw = parse_sql(sql)
    except ParseError as exc:
        raise Unparseable(str(exc)) from None
    out, spans = [], []
    for stmt in raw:
        kind = _kind(type(stmt.stmt).__name__)
        start = stmt.stmt_location or 0
        end = start + stmt.stmt_len if stmt.stmt_len else len(sql)
        walk = _Walk()
        # any part of it that can't be read (a body, a known dynamic text) raises
        # Unparseable: the whole text is judged as unparseable
        walk.statement(stmt.stmt, sql[start:end])
        if walk.kinds & _WRITES and any(t.rsplit(".", 1)[-1].lower() == "pg_settings"
                                        for t in walk.tables):
            # pg_settings' rules call set_config: any setting, those that change how
            # later texts are read included, and back before the server reports it
            walk.flags.add("changes_parsing")
            walk.unknown.add("changes_parsing")
        spans.append((start, end))
        out.append(Statement(kind=kind, text=sql[start:end].strip(),
                             kinds=frozenset(walk.kinds | {kind}),
                             tables=tuple(dict.fromkeys(walk.tables)),
                             functions=tuple(dict.fromkeys(walk.functions)),
                             flags=frozenset(walk.flags),
                             sources=tuple(_select_sources(stmt.stmt).items()),
                             lineage=_lineage(stmt.stmt), unknown=frozenset(walk.unknown),
                             reads=frozenset(walk.columns), code=walk.code))
    return tuple(out), tuple(spans)
