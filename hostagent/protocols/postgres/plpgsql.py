"""What a PL/pgSQL body (a DO block, a function or procedure) runs, for classify: the SQL
statements and expressions in it, and its dynamic SQL (EXECUTE, FOR ... IN EXECUTE,
RETURN QUERY EXECUTE, OPEN ... FOR EXECUTE) with the texts it can run when those are
known.

A dynamic text is known when it is made only of string literals joined with `||`
(casts to text allowed), or of variables assigned only such values: `DECLARE v text :=
'...'`, `v := '...'`, each assignment one more text the variable may hold. A variable is
not known when anything else may write it (SELECT/FETCH/EXECUTE ... INTO, a FOR loop,
GET DIAGNOSTICS, CALL with it as an argument, an element or field assignment, a
parameter, an implicit variable), when its type isn't text (a `name` or `char(n)`
variable would truncate what it holds), or when it is assigned from itself. Anything
else (a number, format(), a parameter, a column, a function) is computed: unknown."""
from __future__ import annotations

import itertools
import json

from pglast import ast, parse_sql
from pglast.parser import ParseError, scan

MAX_VALUES = 16            # texts an expression may stand for, before it counts as computed
MAX_TEXT = 256 * 1024      # the length of one, likewise (`v := v2 || v2 || ...` doubling)
_TEXT_TYPES = frozenset({"text", "varchar"})


class Computed(Exception):
    """The value of an expression is computed when it runs: it can't be known here."""


def literal_values(node, variable=None) -> frozenset[str]:
    """The texts an expression node can evaluate to: string literals, `||` of such,
    casts to text, and (with `variable`, a name -> texts function) variables. Raises
    Computed for anything else."""
    if isinstance(node, ast.A_Const):
        if isinstance(node.val, ast.String):
            return frozenset((node.val.sval,))
        raise Computed
    if isinstance(node, ast.TypeCast):
        tn = node.typeName
        if (tn.names and tn.names[-1].sval in _TEXT_TYPES and not tn.typmods
                and not tn.arrayBounds and not tn.setof):
            return literal_values(node.arg, variable)
        raise Computed
    if isinstance(node, ast.A_Expr):
        name = tuple(getattr(s, "sval", None) for s in node.name or ())
        if (getattr(node.kind, "name", "") == "AEXPR_OP" and name in (("||",), ("pg_catalog", "||"))
                and node.lexpr is not None and node.rexpr is not None):
            left = literal_values(node.lexpr, variable)
            right = literal_values(node.rexpr, variable)
            if len(left) * len(right) > MAX_VALUES:
                raise Computed
            out = frozenset(a + b for a, b in itertools.product(left, right))
            if any(len(v) > MAX_TEXT for v in out):
                raise Computed
            return out
        raise Computed
    if (isinstance(node, ast.ColumnRef) and variable is not None and len(node.fields) == 1
            and isinstance(node.fields[0], ast.String)):
        return variable(node.fields[0].sval)
    raise Computed


def expression_values(text: str, variable=None) -> frozenset[str]:
    """literal_values of a PL/pgSQL expression given as text."""
    try:
        (raw,) = parse_sql(f"SELECT {text}")
    except (ParseError, ValueError):
        raise Computed from None
    stmt = raw.stmt
    if (not isinstance(stmt, ast.SelectStmt) or len(stmt.targetList or ()) != 1 or
            any(getattr(stmt, a) for a in ("fromClause", "whereClause", "groupClause",
                                           "havingClause", "withClause", "intoClause",
                                           "sortClause", "limitCount", "limitOffset",
                                           "distinctClause", "lockingClause", "windowClause"))
            or stmt.targetList[0].name):
        raise Computed
    return literal_values(stmt.targetList[0].val, variable)


def split_assignment(query: str) -> tuple[str | None, str] | None:
    """`target := expr` (or `=`) -> (the target's name as the parser folds it, or None
    when the target is not a plain name: `v[1]`, `rec.f`, `blk.v`; expr). None when
    the text is not an assignment."""
    try:
        tokens = scan(query)
    except ParseError:
        return None
    at = next((i for i, t in enumerate(tokens) if t.name in ("COLON_EQUALS", "ASCII_61")), None)
    if not at:
        return None
    rhs = query[tokens[at].end + 1:]
    if at != 1:
        return None, rhs
    first = tokens[0]
    word = query[first.start:first.end + 1]
    if first.name == "IDENT" and word.startswith('"'):
        return word[1:-1].replace('""', '"'), rhs
    if (first.name == "IDENT" or first.kind != "NO_KEYWORD") and \
            word.replace("_", "").replace("$", "").isalnum():
        return word.lower(), rhs
    return None, rhs


class Body:
    """A parsed PL/pgSQL function (pglast.parse_plpgsql output): `static` holds the
    texts of its statements and expressions (each judged as written), `dynamic` the
    expressions whose value is run as SQL; values(expr) gives the texts one can run."""

    def __init__(self, tree):
        if isinstance(tree, str):
            tree = json.loads(tree)
        fn = tree[0]["PLpgSQL_function"] if len(tree) == 1 else {}
        if "action" not in fn:
            # libpg_query reads only `LANGUAGE plpgsql` bodies, and says nothing when it
            # skips one: a body not read must not pass for an empty one
            raise ValueError("no PL/pgSQL body was read")
        self.static: list[str] = []
        self.dynamic: list[str] = []
        self.calls: list[str] = []
        self._datums = fn.get("datums") or []
        self._assigned: dict[int, list[str]] = {}
        self._touched: set[int] = set()        # datums written some other way
        self._touched_names: set[str] = set()
        self._memo: dict[str, frozenset[str] | None] = {}
        self._busy: set[str] = set()
        for d in self._datums:
            self._collect(d, in_datums=True)
        self._collect(fn.get("action"), in_datums=False)
        self._by_name: dict[str, list[int]] = {}
        for dno, d in enumerate(self._datums):
            for kind, inner in d.items():
                if kind in ("PLpgSQL_var", "PLpgSQL_rec", "PLpgSQL_row") and "refname" in inner:
                    self._by_name.setdefault(inner["refname"], []).append(dno)
        for call in self.calls:
            try:
                tree = parse_sql(call)
            except ParseError:
                continue   # judged (and refused) as a static statement
            for ref in _column_refs(tree):
                self._touched_names.add(ref)

    def _collect(self, value, in_datums: bool) -> None:
        stack = [(value, "")]
        while stack:
            v, key = stack.pop()
            if isinstance(v, list):
                stack.extend((x, key) for x in v)
                continue
            if not isinstance(v, dict):
                if (isinstance(v, int) and not isinstance(v, bool) and not in_datums
                        and key in ("varno", "target", "curvar", "retvarno", "dno")):
                    self._touched.add(v)
                continue
            for k, inner in v.items():
                if k == "PLpgSQL_expr" and isinstance(inner, dict):
                    if "query" in inner:
                        self.static.append(inner["query"])
                elif k in ("PLpgSQL_stmt_dynexecute", "PLpgSQL_stmt_dynfors"):
                    q = inner.get("query", {}).get("PLpgSQL_expr", {}).get("query")
                    self.dynamic.append(q if q is not None else "")
                    stack.extend((x, kk) for kk, x in inner.items())
                elif k == "dynquery":
                    q = inner.get("PLpgSQL_expr", {}).get("query") if isinstance(inner, dict) else None
                    self.dynamic.append(q if q is not None else "")
                    stack.append((inner, k))
                elif k == "PLpgSQL_stmt_assign" and isinstance(inner, dict):
                    query = inner.get("expr", {}).get("PLpgSQL_expr", {}).get("query", "")
                    dno = inner.get("varno", 0)
                    split = split_assignment(query)
                    if split is None or split[0] is None or split[0] != self._refname(dno):
                        self._touched.add(dno)   # v[1] := ..., rec.f := ..., blk.v := ...
                        if split is not None and split[0] is not None:
                            self._touched_names.add(split[0])
                    else:
                        self._assigned.setdefault(dno, []).append(split[1])
                    stack.extend((x, kk) for kk, x in inner.items() if kk not in ("varno",))
                elif k == "PLpgSQL_stmt_call" and isinstance(inner, dict):
                    query = inner.get("expr", {}).get("PLpgSQL_expr", {}).get("query")
                    if query:
                        self.calls.append(query)
                    stack.extend((x, kk) for kk, x in inner.items())
                elif k in ("PLpgSQL_var", "PLpgSQL_rec", "PLpgSQL_row") and not in_datums:
                    # a loop variable, an INTO target: written by what it belongs to
                    if isinstance(inner, dict) and "refname" in inner:
                        self._touched_names.add(inner["refname"])
                    stack.append((inner, k))
                elif k == "fields" and isinstance(inner, list):
                    # a row's members (INTO targets, loop variables): all written
                    for f in inner:
                        if isinstance(f, dict):
                            self._touched.add(f.get("varno", 0))
                            if "name" in f:
                                self._touched_names.add(f["name"])
                elif k == "diag_items":
                    for item in inner or ():
                        t = (item.get("PLpgSQL_diag_item") or {}).get("target", 0)
                        self._touched.add(t)
                else:
                    stack.append((inner, k))

    def _refname(self, dno: int) -> str | None:
        if 0 <= dno < len(self._datums):
            for inner in self._datums[dno].values():
                if isinstance(inner, dict):
                    return inner.get("refname")
        return None

    def variable(self, name: str) -> frozenset[str]:
        """Every text variable `name` may hold when it is read; Computed if that isn't
        known (see the module's docstring)."""
        if name in self._memo:
            out = self._memo[name]
            if out is None:
                raise Computed
            return out
        if name in self._busy or name in self._touched_names:
            raise Computed
        dnos = self._by_name.get(name)
        if not dnos:
            raise Computed
        self._busy.add(name)
        try:
            out: set[str] = set()
            for dno in dnos:
                out |= self._datum_values(dno)
                if len(out) > MAX_VALUES:
                    raise Computed
            result = frozenset(out)
        except Computed:
            self._memo[name] = None
            raise
        finally:
            self._busy.discard(name)
        self._memo[name] = result
        return result

    def _datum_values(self, dno: int) -> set[str]:
        d = self._datums[dno]
        inner = d.get("PLpgSQL_var")
        if (inner is None or dno == 0 or dno in self._touched or "lineno" not in inner
                or "promise" in inner or "cursor_explicit_expr" in inner
                or (inner.get("datatype", {}).get("PLpgSQL_type", {}).get("typname")
                    not in _TEXT_TYPES)):
            raise Computed
        sources = list(self._assigned.get(dno, ()))
        default = inner.get("default_val", {}).get("PLpgSQL_expr", {}).get("query")
        if default is not None:
            sources.append(default)
        if not sources:
            raise Computed   # never assigned here: an implicit variable, or written elsewhere
        out: set[str] = set()
        for src in sources:
            out |= expression_values(src, self.variable)
        return out

    def values(self, expr: str) -> frozenset[str]:
        """The texts a dynamic-SQL expression can run; Computed if not known."""
        return expression_values(expr, self.variable)


def _column_refs(tree) -> set[str]:
    out, stack = set(), [tree]
    while stack:
        n = stack.pop()
        if isinstance(n, (list, tuple)):
            stack.extend(n)
        elif isinstance(n, ast.Node):
            if isinstance(n, ast.ColumnRef):
                out.update(f.sval for f in n.fields if isinstance(f, ast.String))
            for attr in n.__slots__:
                v = getattr(n, attr, None)
                if isinstance(v, (ast.Node, list, tuple)):
                    stack.append(v)
    return out
