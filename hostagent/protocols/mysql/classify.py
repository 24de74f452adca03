"""What a MySQL/MariaDB text does, for policy: each statement (split as the server splits,
compound bodies whole: lexer.py), everything it runs (procedure, function, trigger and
event bodies, anonymous blocks, PREPARE ... FROM a literal), the tables and functions it
touches, its risky shapes (flags), what it runs that can't be known from its text
(`unknown`), and every column it names (masking). Kinds use PostgreSQL's names where
they exist, so that one policy covers both.

sqlglot parses what it models (queries, DML, CREATE/ALTER TABLE and VIEW), always from
the tokens MySQL read (lexer.emit), never from the text as sent. The rest is read from
the tokens, where an expression can only run inside parentheses: each parenthesised
group is judged as one. What isn't understood raises Unparseable (deny by default)."""
from __future__ import annotations

import bisect
import logging
import re
from dataclasses import dataclass, replace

import sqlglot
from sqlglot import exp

from hostagent.protocols.cache import TextCache
from hostagent.protocols.mysql.lexer import (Tok, Unparseable, close, emit, op, skip_prefix,
                                             split, tokenize, word)

__all__ = ["classify", "Statement", "Unparseable"]

# sqlglot logs each statement it can't model at WARNING, quoting it: agents' text in our logs
logging.getLogger("sqlglot").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Statement:
    kind: str                          # the top-level kind, e.g. "DROP"
    text: str                          # as sent, executable comments expanded
    kinds: frozenset[str] = frozenset()     # every kind it runs, nested ones included
    tables: tuple[str, ...] = ()       # "db.table" or "table", lowercased, unique
    functions: tuple[str, ...] = ()
    flags: frozenset[str] = frozenset()
    unknown: frozenset[str] = frozenset()   # policy gives "unparseable" unless allowed
    reads: frozenset[str] = frozenset()     # every column named anywhere (masking)
    copies: bool = False               # can copy column values elsewhere than its result
    prepares: tuple[str, str] | None = None   # PREPARE name FROM '<literal>'
    executes: str | None = None               # EXECUTE name
    database: str | None = None               # USE db
    kill: tuple[str, int] | None = None       # KILL [QUERY|CONNECTION] n
    # names that are not base tables here (CTEs): result columns the server says come
    # from them prove nothing about their source (masking)
    derived: frozenset[str] = frozenset()


MAX_DEPTH = 8       # PREPARE ... FROM literals nested in each other, before Unparseable
# client charsets whose multibyte characters can end in 0x5c: a backslash the server
# doesn't see, so strings end elsewhere than we read them (MySQL's own list)
# sql_mode flags under which text is read otherwise: strings in double quotes become
# names, backslashes stop escaping; the combinations that include ANSI_QUOTES
PARSING_MODES = frozenset({"ANSI_QUOTES", "NO_BACKSLASH_ESCAPES", "ANSI", "DB2", "MAXDB",
                           "MSSQL", "ORACLE", "POSTGRESQL"})
# The client character sets statements may be sent in: the judge reads UTF-8. Others
# read bytes otherwise (gbk's second bytes hide a backslash, latin1's 0xA0 is a space
# where UTF-8 has a letter), so the server would run what the judge never saw.
SAFE_CHARSETS = frozenset({"utf8mb4", "utf8mb3", "utf8"})
_SAFE_INTRODUCERS = frozenset({"", "n", "utf8", "utf8mb3", "utf8mb4", "latin1", "ascii",
                               "binary"})
_CHARSET_VARS = frozenset({"character_set_client", "character_set_connection",
                           "collation_connection"})
_SCOPES = frozenset({"GLOBAL", "SESSION", "LOCAL", "PERSIST", "PERSIST_ONLY"})
_EXPLAINABLE = frozenset({"SELECT", "INSERT", "REPLACE", "UPDATE", "DELETE", "WITH", "TABLE",
                          "VALUES"})
# words a parenthesised group may follow that are not function names
_NOT_NAMES = frozenset({"SELECT", "INSERT", "UPDATE", "REFERENCES", "COLUMNS", "INDEXES",
                        "PARTITION", "INDEX", "KEY", "OPTIONS", "IN", "VALUES", "CHECK", "AS",
                        "DEFAULT", "ON", "USING", "WHERE", "AND", "OR", "NOT", "LIKE", "BY"})
_INTO_END = frozenset({"FROM", "WHERE", "GROUP", "HAVING", "ORDER", "LIMIT", "FOR", "LOCK",
                       "UNION", "WINDOW", "INTO", "EXCEPT", "INTERSECT"})
_OUTFILE_WORDS = frozenset({"FIELDS", "COLUMNS", "TERMINATED", "OPTIONALLY", "ENCLOSED",
                            "ESCAPED", "BY", "LINES", "STARTING"})
_TABLES = ("TABLE", "TABLES")
# statements read from their tokens: first word -> (kind, the words a list of tables
# follows, the words one of which must come second)
_TOKEN_STATEMENTS = {
    **{w: ("MAINTENANCE", _TABLES + ("VIEW",), _TABLES + ("VIEW", "NO_WRITE_TO_BINLOG", "LOCAL"))
       for w in ("OPTIMIZE", "ANALYZE", "CHECK", "REPAIR", "CHECKSUM")},
    "FLUSH": ("FLUSH", _TABLES, ()), "LOCK": ("LOCK", _TABLES, _TABLES + ("INSTANCE",)),
    "UNLOCK": ("LOCK", (), _TABLES + ("INSTANCE",)), "CACHE": ("CACHE", ("INDEX",), ("INDEX",)),
    "TRUNCATE": ("TRUNCATE", ("TRUNCATE",), ()), "RENAME": ("RENAME", _TABLES, _TABLES + ("USER",)),
    **{w: ("TRANSACTION", (), ()) for w in ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "XA")},
    "START": ("TRANSACTION", (), ("TRANSACTION",)), "RELEASE": ("TRANSACTION", (), ("SAVEPOINT",)),
    **{w: (w, (), ()) for w in ("INSTALL", "UNINSTALL", "SHUTDOWN", "RESET", "PURGE", "BINLOG",
                                "HELP", "SIGNAL")},
    "RESIGNAL": ("SIGNAL", (), ()), "CHANGE": ("CHANGE", (), ("MASTER", "REPLICATION")),
    "DEALLOCATE": ("DEALLOCATE", (), ("PREPARE",)),
}


class _Acc:
    """What one statement does, collected from its parts."""

    def __init__(self, depth: int):
        self.depth, self.kind, self.copies = depth, "", False
        self.kinds: set[str] = set()
        self.tables: list[str] = []
        self.functions: list[str] = []
        self.flags: set[str] = set()
        self.unknown: set[str] = set()
        self.reads: set[str] = set()
        self.prepares = self.executes = self.database = self.kill = None
        self.derived: set[str] = set()

    def flag(self, name: str, unknown: bool = False) -> None:
        self.flags.add(name)
        if unknown:
            self.unknown.add(name)

    def function(self, name: str) -> None:
        self.functions.append(name)
        if name.rsplit(".", 1)[-1] == "load_file":
            self.flag("server_files")

    def merge(self, o, kinds: bool = True) -> None:
        if kinds:
            self.kinds |= o.kinds
            self.copies |= o.copies
        self.tables.extend(o.tables)
        self.functions.extend(o.functions)
        self.flags |= o.flags
        self.unknown |= o.unknown
        self.reads |= o.reads
        self.derived |= o.derived

    def sub(self, toks: list[Tok]) -> "_Acc":
        s = _Acc(self.depth)
        _simple(toks, s)
        s.kinds.add(s.kind)
        s.kinds |= _implied(toks, 0, s.statement("")).kinds
        return s

    def statement(self, text: str) -> Statement:
        return Statement(self.kind, text, frozenset(self.kinds | {self.kind}),
                         tuple(dict.fromkeys(self.tables)), tuple(dict.fromkeys(self.functions)),
                         frozenset(self.flags), frozenset(self.unknown), frozenset(self.reads),
                         self.copies, self.prepares, self.executes, self.database, self.kill,
                         frozenset(self.derived))


# characters sqlglot is given for one statement (long literals already elided): it takes
# about 1 s for this much, on the proxy's loop
MAX_PARSED = 128 << 10
_cache = TextCache()        # text -> its Statements (or the Unparseable it raised)
_judged = TextCache()       # one statement's tokens (emit) -> its Statement


def classify(text: str) -> list[Statement]:
    """One Statement per statement of `text`; raises Unparseable. Pure, so cached (bounded
    by bytes): agents send the same statements again and again."""
    hit = _cache.get(text)
    if hit is None:
        try:
            hit = tuple(_classify(text, 0))
        except Unparseable as exc:
            hit = exc
        except RecursionError:
            hit = Unparseable("nested too deeply to read")
        _cache.put(text, hit, 2 * len(text))
    if isinstance(hit, Unparseable):
        raise Unparseable(*hit.args)
    return list(hit)


def _classify(text: str, depth: int) -> list[Statement]:
    toks, cuts = tokenize(text)
    starts = [c[0] for c in cuts]
    out = []
    for u in split(toks):
        lo, hi = toks[u.lo].start, toks[u.hi - 1].end
        parts, at = [], lo
        for c0, c1 in cuts[bisect.bisect_left(starts, lo):bisect.bisect_left(starts, hi)]:
            parts.append(text[at:c0])
            at = c1
        # judged by its tokens: the same statement (many INSERTs in one text, or spelled
        # otherwise) is judged once
        key = emit(toks[u.lo:u.hi]) if depth == 0 and u.form == "simple" else None
        st = _judged.get(key) if key else None
        if st is None:
            acc = _Acc(depth)
            if u.form == "simple":
                _simple(toks[u.lo:u.hi], acc)
            else:
                _compound(toks, u, acc)
            st = _implied(toks, u.lo, acc.statement(""))
            if key:
                _judged.put(key, st, 2 * len(key))
        for name in (*st.tables, *st.functions, st.database or ""):
            if not name.isascii():
                try:
                    name.encode()
                except UnicodeEncodeError:   # bytes that are not UTF-8 (lone surrogates)
                    raise Unparseable("a name that is not UTF-8") from None
        out.append(replace(st, text=("".join(parts) + text[at:hi]).strip()))
    return out


def _implied(toks: list[Tok], lo: int, st: Statement) -> Statement:
    """What a statement does beyond its verb: CREATE OR REPLACE drops what it replaces
    (a table's rows, a database), RENAME TABLE alters (it can move a table away)."""
    extra = set()
    if word(toks, lo) == "CREATE" and word(toks, lo + 1) == "OR" and word(toks, lo + 2) == "REPLACE":
        extra.add("DROP")
    if "RENAME" in st.kinds:
        extra.add("ALTER")
    return replace(st, kinds=st.kinds | extra) if extra else st


def _compound(toks: list[Tok], u, acc: _Acc) -> None:
    """CREATE PROCEDURE/FUNCTION/TRIGGER/EVENT, ALTER EVENT, anonymous blocks: what the
    body runs (later, or now) is what the statement runs."""
    acc.kind = "DO" if u.form == "block" else toks[u.lo].up
    if u.form == "routine" and _find(toks[u.lo:u.body], "DEFAULT") is not None:
        raise Unparseable("parameters with defaults: expressions not read")   # MariaDB 11.8
    if u.form == "trigger":
        acc.kinds.add("TRIGGER")
        acc.flag("trigger")
        on = next((k for k in range(u.lo, u.body) if word(toks, k) == "ON"), None)
        if on is None:
            raise Unparseable("a trigger without ON table")
        acc.tables.append(_name(toks, on + 1)[0])
    prepared, executed = set(), set()
    for role, lo, hi in u.pieces:
        t = toks[lo:hi]
        if role == "stmt":
            s = acc.sub(t)
            acc.merge(s)
            prepared |= {s.prepares[0]} if s.prepares else set()
            executed |= {s.executes} if s.executes else set()
        elif role in ("expr", "interval"):
            _sql(t, acc, "SELECT INTERVAL " if role == "interval" else "SELECT ")
        else:   # LEAVE ITERATE OPEN CLOSE FETCH
            _plain(t, acc)
            acc.copies |= t[0].up == "FETCH"
    if executed - prepared:
        acc.flag("dynamic_sql", unknown=True)    # runs what was prepared elsewhere


# ---- helpers on tokens

def _name(t: list[Tok], i: int) -> tuple[str, int]:
    """`name` or `db.name` at i, lowercased, and where it ends."""
    if not (i < len(t) and t[i].kind in "wq"):
        raise Unparseable("expected a name")
    if op(t, i + 1, ".") and i + 2 < len(t) and t[i + 2].kind in "wq":
        return f"{t[i].val}.{t[i + 2].val}".lower(), i + 3
    return t[i].val.lower(), i + 1


def _find(t: list[Tok], *words: str, start: int = 0) -> int | None:
    return next((k for k in range(start, len(t)) if word(t, k) in words), None)


def _items(t: list[Tok]) -> list[list[Tok]]:
    """Split on commas outside parentheses."""
    out, cur, depth = [], [], 0
    for tok in t:
        if tok.kind == "o":
            depth += (tok.val == "(") - (tok.val == ")")
            if tok.val == "," and depth == 0:
                out.append(cur)
                cur = []
                continue
        cur.append(tok)
    return out + [cur]


def _tables_after(t: list[Tok], words, acc: _Acc, pairs: bool = False) -> None:
    """The list of tables after the first of `words` (each item's leading name; with
    pairs, `a TO b` names both)."""
    k = _find(t, *words)
    if k is None:
        return
    k += 1
    while word(t, k) in ("TABLE", "TABLES", "TEMPORARY", "IF", "NOT", "EXISTS"):
        k += 1
    for item in _items(t[k:]):
        if item and item[0].kind in "wq" and word(item, 0) not in ("WITH", "FOR"):
            acc.tables.append(_name(item, 0)[0])
            to = _find(item, "TO")
            if pairs and to is not None:
                acc.tables.append(_name(item, to + 1)[0])


def _plain(t: list[Tok], acc: _Acc, lists: bool = False) -> None:
    """A statement read from its tokens runs expressions only in parentheses: a call's
    arguments, a subquery. Each group is judged, with the name before it: a call (with
    `lists`, a group of names after a name is a list of columns: LOAD DATA's)."""
    i = 0
    while i < len(t):
        if not op(t, i, "("):
            i += 1
            continue
        j = close(t, i)
        inner, lo = t[i + 1:j - 1], i
        if i and t[i - 1].kind in "wq" and word(t, i - 1) not in _NOT_NAMES and not (lists and all(
                x.kind in "wqv" or (x.kind == "o" and x.val in ",.") for x in inner)):
            lo = i - 3 if op(t, i - 2, ".") and i > 2 else i - 1
            try:
                _sql(t[lo:j], acc, "SELECT ")
                i = j
                continue
            except Unparseable:    # CAST(a AS CHAR) and the like, or a keyword: the group alone
                acc.function(".".join(x.val for x in t[lo:i]).lower())
        if inner:
            _sql(t[i:j], acc, "SELECT ")
        i = j


# ---- sqlglot, on the tokens MySQL read

_NOT_CALLS = (exp.Connector, exp.Case)   # operators and CASE, which sqlglot models as Func
_SELECT_HINTS = frozenset({"SQL_NO_CACHE", "SQL_CACHE", "SQL_CALC_FOUND_ROWS", "HIGH_PRIORITY",
                           "STRAIGHT_JOIN", "SQL_SMALL_RESULT", "SQL_BIG_RESULT",
                           "SQL_BUFFER_RESULT"})
_HINTED = _SELECT_HINTS | {"SELECT"}


def _sql(toks: list[Tok], acc: _Acc, prefix: str = ""):
    """Parse with sqlglot and collect tables, functions, columns and nested queries. The
    prefix (SELECT for an expression) is not the statement's: its node is not counted."""
    kept = []
    for x in toks:     # SELECT's hints (SQL_NO_CACHE, HIGH_PRIORITY...) change nothing judged
        if not (x.up in _SELECT_HINTS and x.kind == "w" and kept and kept[-1].up in _HINTED):
            kept.append(x)
    text = prefix + emit(kept)
    if len(text) > MAX_PARSED:
        raise Unparseable("too long to judge")
    try:
        trees = sqlglot.parse(text, read="mysql")
    except Exception as exc:   # sqlglot raises many kinds of errors on what it can't read
        raise Unparseable(f"does not parse: {type(exc).__name__}") from None
    if len(trees) != 1 or trees[0] is None:
        raise Unparseable("not one statement")
    root, selects = trees[0], 0
    acc.derived.update(c.alias_or_name.lower() for c in root.find_all(exp.CTE))
    for node in root.walk(bfs=False):             # depth first: the order written
        if isinstance(node, (exp.Command, exp.Into)):
            raise Unparseable("a part sqlglot does not model")
        if isinstance(node, exp.Select):
            selects += 1
            if node is not root or not prefix:
                acc.kinds.add("SELECT")
        elif isinstance(node, exp.Table):
            if isinstance(node.this, exp.Identifier):
                if node.args.get("catalog"):
                    raise Unparseable("a three-part table name")
                name = ".".join(p for p in (node.text("db"), node.name) if p).lower()
                if name != "dual":
                    acc.tables.append(name)
            elif not isinstance(node.this, exp.Func):
                raise Unparseable("an unexpected table")
        elif isinstance(node, (exp.Column, exp.ColumnDef)):
            if node.name and node.name != "*":
                acc.reads.add(node.name.lower())
        elif isinstance(node, exp.Join):
            acc.reads.update(u.name.lower() for u in node.args.get("using") or ())
        elif isinstance(node, exp.PropertyEQ):    # @v := <expr>: copies into a variable
            acc.copies = True
            acc.flag("into_var")
        if isinstance(node, exp.Func) and not isinstance(node, _NOT_CALLS):
            acc.function(_fname(node, text))
    # every SELECT written is a query sqlglot saw: none was swallowed by lenient parsing
    if selects < sum(t.kind == "w" and t.up == "SELECT" for t in toks) + ("SELECT" in prefix):
        raise Unparseable("a query sqlglot did not model")
    return root


def _fname(node, text: str) -> str:
    """The function's name as written (sqlglot renames: IFNULL is Coalesce)."""
    if isinstance(node, exp.Anonymous):
        name, parent = node.name, node.parent
        if isinstance(parent, exp.Dot) and parent.expression is node:
            name = f"{parent.this.name}.{name}"
        return name.lower()
    meta = node.meta
    written = text[meta["start"]:meta["end"] + 1] if "start" in meta else ""
    return (written if re.fullmatch(r"\w+", written) else node.sql_name()).lower()


# ---- statements

def _simple(t: list[Tok], acc: _Acc) -> None:
    if not t:
        raise Unparseable("an empty statement")
    first = word(t, 0) or ("(" if op(t, 0, "(") else "")
    handler = _HANDLERS.get(first) or (_tokens if first in _TOKEN_STATEMENTS else None)
    if handler is None:
        raise Unparseable(f"not a statement read here: {t[0].val[:20]!r}")
    handler(t, acc)


def _tokens(t, acc):
    kind, after, second = _TOKEN_STATEMENTS[t[0].up]
    if second and word(t, 1) not in second:
        raise Unparseable(f"{t[0].up} of what")
    acc.kind = kind
    _plain(t, acc)
    _tables_after(t, after, acc, pairs=kind == "RENAME")
    if kind == "INSTALL":
        acc.flag("udf")


def _query(t, acc):
    root = _sql(_strip_into(t, acc), acc)
    if isinstance(root, (exp.Select, exp.SetOperation, exp.Subquery, exp.Values)):
        acc.kind = "SELECT"
    elif isinstance(root, (exp.Insert, exp.Update, exp.Delete)) and t[0].up == "WITH":
        acc.kind = type(root).__name__.upper()
        _writes(root, acc)
    else:
        raise Unparseable("not a query")


def _strip_into(t, acc):
    """SELECT ... INTO OUTFILE/DUMPFILE/@var (which sqlglot reads as a table): noted,
    then removed. Checked strictly: nothing else may hide in the removed part."""
    out, i, depth = [], 0, 0
    while i < len(t):
        if t[i].kind == "o":
            depth += (t[i].val == "(") - (t[i].val == ")")
        if word(t, i) != "INTO":
            out.append(t[i])
            i += 1
            continue
        if depth:
            raise Unparseable("INTO in a subquery")
        acc.copies, i = True, i + 1
        if word(t, i) in ("OUTFILE", "DUMPFILE"):
            acc.flag("server_files")
            if not (i + 1 < len(t) and t[i + 1].kind == "s"):
                raise Unparseable("expected a file name")
            i += 2
            while True:
                if word(t, i) in ("CHARSET", "CHARACTER"):
                    i += 3 if word(t, i + 1) == "SET" else 2
                elif word(t, i) in _OUTFILE_WORDS or (i < len(t) and t[i].kind == "s"):
                    i += 1
                else:
                    break
            continue
        acc.flag("into_var")
        while True:
            if not (i < len(t) and (t[i].kind in "vq" or word(t, i) not in ("", *_INTO_END))):
                raise Unparseable("expected a variable after INTO")
            i += 1
            if not op(t, i, ","):
                break
            i += 1
    return out


def _writes(root, acc):
    """no_where, and whether a write copies column values (from a query, or from a
    column named in a value)."""
    if isinstance(root, (exp.Update, exp.Delete)) and root.args.get("where") is None:
        acc.flag("no_where")
    if isinstance(root, exp.Update):
        acc.copies |= any(e.expression.find(exp.Column, exp.Select) is not None
                          for e in root.expressions if isinstance(e, exp.EQ))
    elif isinstance(root, exp.Insert):
        if not isinstance(root.this, (exp.Table, exp.Schema)):
            raise Unparseable("INSERT into what")
        target = {id(n) for n in root.this.walk()}
        acc.copies |= any(id(n) not in target and isinstance(n, (exp.Column, exp.Select)) and
                          not (isinstance(n.parent, exp.EQ) and n.parent.this is n)
                          for n in root.walk())


def _dml(t, acc):
    verb, i = t[0].up, 1
    while word(t, i) in ("LOW_PRIORITY", "DELAYED", "HIGH_PRIORITY", "QUICK", "IGNORE"):
        i += 1
    head = t[0]._replace(val="INSERT") if verb == "REPLACE" else t[0]
    root = _sql([head] + t[i:], acc)
    if type(root).__name__.upper() != ("INSERT" if verb == "REPLACE" else verb):
        raise Unparseable("not the statement it starts as")
    acc.kind = verb
    _writes(root, acc)


def _ddl(t, acc):
    """CREATE and ALTER: tables and views through sqlglot, the rest from the tokens."""
    acc.kind = t[0].up
    i = skip_prefix(t, 1)
    while word(t, i) in ("TEMPORARY", "UNIQUE", "FULLTEXT", "SPATIAL", "ONLINE", "OFFLINE",
                         "IGNORE"):
        i += 1
    obj = word(t, i)
    if _find(t, "DIRECTORY", "FILE_NAME") is not None:
        acc.flag("server_files")          # DATA/INDEX DIRECTORY, CONNECT's FILE_NAME
    if obj in ("TABLE", "VIEW", "INDEX"):
        check = _find(t, "CHECK")               # a view's WITH [CASCADED|LOCAL] CHECK OPTION
        if obj == "VIEW" and check == len(t) - 2 and word(t, check + 1) == "OPTION":
            t = t[:check - (2 if word(t, check - 1) in ("CASCADED", "LOCAL") else 1)]
        try:
            root = _sql(t if acc.kind == "CREATE" else [t[0]] + t[i:], acc)
        except Unparseable:
            if (acc.kind, obj) != ("ALTER", "TABLE"):
                raise
            return _alter_tokens(t, i, acc)   # forms sqlglot doesn't model
        if not isinstance(root, (exp.Create, exp.Alter)):
            raise Unparseable(f"not a {acc.kind}")
        acc.copies |= root.find(exp.Select, exp.RenameColumn) is not None or any(
            c.find(exp.Column) is not None for c in root.find_all(exp.ColumnConstraint)) or any(
            a.args.get("rename_from") for a in root.find_all(exp.ModifyColumn))
        return
    _plain(t, acc)
    if obj == "SEQUENCE":
        _tables_after(t, ("SEQUENCE",), acc)
    elif obj in ("AGGREGATE", "FUNCTION") and acc.kind == "CREATE":   # RETURNS ... SONAME
        if _find(t, "SONAME") is None:
            raise Unparseable("a function without a body")
        acc.flag("udf")
    elif obj not in ("DATABASE", "SCHEMA", "USER", "ROLE", "SERVER") and not (
            acc.kind == "ALTER" and obj in ("PROCEDURE", "FUNCTION", "EVENT")
            and _find(t, "DO") is None):           # ALTER EVENT ... DO is split as compound
        raise Unparseable(f"{acc.kind} {obj[:20]} is not read")


def _alter_tokens(t, i, acc):
    _plain(t, acc)
    acc.tables.append(_name(t, i + 3 if word(t, i + 1) == "IF" else i + 1)[0])
    for j in range(i + 1, len(t) - 1):   # EXCHANGE ... WITH TABLE x, RENAME [TO] x, REFERENCES x
        w = word(t, j)
        if w == "RENAME" and word(t, j + 1) in ("COLUMN", "INDEX", "KEY") or w == "CHANGE":
            acc.copies = True
        elif w in ("RENAME", "TABLE", "REFERENCES") or (
                w in ("TO", "AS") and word(t, j - 1) == "RENAME"):
            if t[j + 1].kind in "wq" and word(t, j + 1) not in ("TO", "AS"):
                acc.tables.append(_name(t, j + 1)[0])


def _drop(t, acc):
    obj = word(t, 2 if word(t, 1) == "TEMPORARY" else 1)
    acc.kind = "DEALLOCATE" if obj == "PREPARE" else "DROP"
    _plain(t, acc)
    if obj in ("TABLE", "TABLES", "VIEW", "SEQUENCE", "INDEX"):
        if obj == "INDEX" and _find(t, "ON") is None:
            raise Unparseable("DROP INDEX without ON")
        _tables_after(t, ("ON",) if obj == "INDEX" else (obj,), acc)
    elif obj not in ("PREPARE", "DATABASE", "SCHEMA", "PROCEDURE", "FUNCTION", "TRIGGER",
                     "EVENT", "USER", "ROLE", "SERVER"):
        raise Unparseable(f"DROP {obj[:20]} is not read")


def _sql_mode_ok(value: list[Tok]) -> bool:
    """A mode spelled out (a literal, or DEFAULT: the global one the session was checked
    with at login) without a flag under which text reads otherwise."""
    if len(value) != 1 or value[0].kind not in "wqs":
        return False   # a variable, an expression: unknown until it runs
    modes = {f.strip().upper() for f in value[0].val.split(",")}
    return not modes & PARSING_MODES


def _collation_ok(value: list[Tok]) -> bool:
    return len(value) == 1 and value[0].kind in "wqs" and \
        value[0].val.lower().split("_", 1)[0] in SAFE_CHARSETS


def _charset_ok(value: list[Tok]) -> bool:
    if len(value) != 1 or value[0].kind not in "wqs":
        return False   # a number (a charset's id), a variable, an expression: unknown
    return value[0].val.lower() in SAFE_CHARSETS


def _set(t, acc):
    acc.kind = "SET"
    if word(t, 1) == "STATEMENT":                     # MariaDB: SET STATEMENT a=1 FOR <stmt>
        f = _find(t, "FOR")
        if f is None:
            raise Unparseable("SET STATEMENT without FOR")
        for item in _items(t[2:f]):
            _assignment(item, acc)
        return acc.merge(acc.sub(t[f + 1:]))
    w = word(t, 2 if word(t, 1) in _SCOPES and word(t, 2) == "TRANSACTION" else 1)
    if w in ("TRANSACTION", "ROLE", "PASSWORD") or (w == "DEFAULT" and word(t, 2) == "ROLE"):
        return _plain(t, acc)
    for item in _items(t[1:]):
        w = word(item, 0)
        if w in ("NAMES", "CHARSET") or (w == "CHARACTER" and word(item, 1) == "SET"):
            k = 2 if w == "CHARACTER" else 1
            rest = item[k + 1:]
            if not _charset_ok(item[k:k + 1]) or (rest and (
                    len(rest) != 2 or word(rest, 0) != "COLLATE" or not _collation_ok(rest[1:]))):
                acc.flag("changes_parsing", unknown=True)
        else:
            _assignment(item, acc)


def _assignment(item, acc):
    i = 1 if word(item, 0) in _SCOPES and not op(item, 1, "=") else 0
    if i >= len(item) or item[i].kind not in "vgwq":
        raise Unparseable("expected a variable")
    system = item[i].kind != "v"                 # not a @user variable
    name, i = (item[i].val.lower(), i + 1) if item[i].kind in "vg" else _name(item, i)
    if not (op(item, i, "=") or op(item, i, ":=")) or i + 1 >= len(item):
        raise Unparseable("expected = value")
    value, base = item[i + 1:], name.lstrip("@")
    if base.split(".")[0] in ("global", "session", "local") and "." in base:
        base = base.split(".", 1)[1]
    if system and base == "sql_mode" and not _sql_mode_ok(value):
        acc.flag("changes_parsing", unknown=True)
    elif system and base in _CHARSET_VARS and not (
            _collation_ok if base.startswith("collation") else _charset_ok)(value):
        acc.flag("changes_parsing", unknown=True)
    elif system and base in ("init_connect", "init_slave", "init_replica"):
        acc.flag("dynamic_sql", unknown=True)    # SQL run by later connections
    elif system and base in ("general_log_file", "slow_query_log_file"):
        acc.flag("server_files")
    if "." in name and item[0].kind != "g":
        acc.reads.add(name.rsplit(".", 1)[1])    # NEW.col in a trigger
    if len(value) > 1 or value[0].kind not in "wqsnxbvgz":
        root = _sql(value, acc, "SELECT ")
        acc.copies |= any(isinstance(n, exp.Select) and n is not root or
                          isinstance(n, exp.Column) and n.table for n in root.walk())


def _show(t, acc):
    acc.kind = "SHOW"
    _plain(t, acc)
    i = 1 + (word(t, 1) in ("FULL", "EXTENDED")) + (word(t, 2) == "FULL")
    if word(t, 1) == "CREATE" and word(t, 2) in ("TABLE", "VIEW", "SEQUENCE"):
        acc.tables.append(_name(t, 3)[0])
    elif word(t, i) in ("COLUMNS", "FIELDS", "INDEX", "INDEXES", "KEYS") and word(t, i + 1) in (
            "FROM", "IN"):
        name, k = _name(t, i + 2)
        acc.tables.append(f"{_name(t, k + 1)[0]}.{name}" if word(t, k) in ("FROM", "IN") else name)


def _use(t, acc):
    if len(t) != 2 or t[1].kind not in "wq":
        raise Unparseable("USE takes one name")
    acc.kind, acc.database = "USE", t[1].val


def _kill(t, acc):
    i = 2 if word(t, 1) in ("HARD", "SOFT") else 1
    mode = word(t, i).lower() if word(t, i) in ("QUERY", "CONNECTION") else ""
    i += bool(mode)
    if i != len(t) - 1 or t[i].kind != "n" or not t[i].val.isdigit():
        raise Unparseable("KILL of other than a connection id")
    acc.kind, acc.kill = "KILL", (mode or "connection", int(t[i].val))


def _explain(t, acc):
    if t[0].up == "ANALYZE" and word(t, 1) in _TOKEN_STATEMENTS["ANALYZE"][2]:
        return _tokens(t, acc)                       # ANALYZE TABLE
    acc.kind, i, analyze = "EXPLAIN", 1, t[0].up == "ANALYZE"
    while word(t, i) in ("ANALYZE", "EXTENDED", "PARTITIONS", "FORMAT"):
        analyze |= word(t, i) == "ANALYZE"
        i += 3 if word(t, i) == "FORMAT" else 1
    if word(t, i) in _EXPLAINABLE or op(t, i, "("):
        # plain EXPLAIN doesn't run it, but the server may evaluate constant subqueries
        # while planning: all but its kinds count (ANALYZE runs it: everything counts)
        acc.merge(acc.sub(t[i:]), kinds=analyze)
    elif analyze:
        raise Unparseable("ANALYZE of what")
    else:
        _plain(t, acc)
        if word(t, i) != "FOR":                      # EXPLAIN FOR CONNECTION n
            acc.tables.append(_name(t, i)[0])        # DESCRIBE t


def _call(t, acc):
    acc.kind = "CALL"
    name, i = _name(t, 1)
    acc.functions.append(name)
    if i < len(t) and not (op(t, i, "(") and close(t, i) == len(t)):
        raise Unparseable("unexpected text after CALL")
    _plain(t, acc)


def _do(t, acc):
    acc.kind = "DO"
    _sql(t[1:], acc, "SELECT ")


def _handler(t, acc):
    acc.kind = "HANDLER"
    name, i = _name(t, 1)
    if word(t, i) not in ("OPEN", "READ", "CLOSE"):
        raise Unparseable("HANDLER of what")
    acc.tables.append(name)
    _plain(t, acc)


def _load(t, acc):
    if word(t, 1) == "INDEX":                        # LOAD INDEX INTO CACHE t
        acc.kind = "CACHE"
        _plain(t, acc)
        return _tables_after(t, ("CACHE",), acc)
    into = _find(t, "INTO")
    if word(t, 1) not in ("DATA", "XML") or into is None or word(t, into + 1) != "TABLE":
        raise Unparseable("expected LOAD DATA|XML ... INTO TABLE")
    acc.kind = "LOAD"
    acc.flag("local_files" if _find(t[:into], "LOCAL") is not None else "server_files")
    s = next((k for k in range(into, len(t)) if word(t, k) == "SET" and
              word(t, k - 1) != "CHARACTER"), len(t))       # SET col = <expr>, ...
    _plain(t[:s], acc, lists=True)
    _plain(t[s:], acc)
    _tables_after(t[:s], ("TABLE",), acc)


def _literal_text(tok: Tok) -> str | None:
    """The SQL a literal holds, decoded as MySQL would (None: not a literal)."""
    if tok.kind == "s":
        if tok.cs not in _SAFE_INTRODUCERS and not tok.val.isascii():
            raise Unparseable("a literal in a charset not decoded here")
        return tok.val
    if tok.kind not in "xb":
        return None
    data = (bytes.fromhex(tok.val.rjust(len(tok.val) + len(tok.val) % 2, "0")) if tok.kind == "x"
            else int(tok.val or "0", 2).to_bytes((len(tok.val) + 7) // 8, "big"))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise Unparseable("a literal that is not UTF-8") from None


def _run_literal(sql: str, acc: _Acc) -> None:
    if acc.depth >= MAX_DEPTH:
        raise Unparseable("prepared statements nested too deeply")
    inner = _classify(sql, acc.depth + 1)
    if len(inner) != 1:
        raise Unparseable("a prepared statement must be one statement")   # as the server
    acc.merge(inner[0])


def _prepare(t, acc):
    acc.kind = "PREPARE"
    if len(t) < 4 or t[1].kind not in "wq" or word(t, 2) != "FROM":
        raise Unparseable("expected PREPARE name FROM")
    sql = _literal_text(t[3]) if len(t) == 4 else None
    if sql is None:                 # @var, or (MariaDB) any expression: known when it runs
        acc.flag("dynamic_sql", unknown=True)
        if len(t) > 4 or t[3].kind not in "vg":
            _sql(t[3:], acc, "SELECT ")
        return
    _run_literal(sql, acc)
    acc.prepares = (t[1].val, sql)


def _execute(t, acc):
    acc.kind = "EXECUTE"
    using = _find(t, "USING") or len(t)
    if using + 1 < len(t):
        _sql(t[using + 1:], acc, "SELECT ")
    if word(t, 1) == "IMMEDIATE":                    # MariaDB
        acc.flag("dynamic_sql", unknown=True)
        sql = _literal_text(t[2]) if using == 3 else None
        if sql is not None:
            _run_literal(sql, acc)
        elif using > 2:
            _sql(t[2:using], acc, "SELECT ")
    elif using != 2 or t[1].kind not in "wq":
        raise Unparseable("expected EXECUTE name")
    else:
        acc.executes = t[1].val


def _grant(t, acc):
    acc.kind = t[0].up
    _plain(t, acc)
    on = _find(t, "ON")
    if on is None:
        return                                       # roles
    obj = word(t, on + 1)
    obj = obj if obj in ("TABLE", "FUNCTION", "PROCEDURE", "PACKAGE") else ""
    i, parts = on + 1 + bool(obj), []
    while i < len(t) and (t[i].kind in "wq" or op(t, i, "*")) and word(t, i) not in ("TO", "FROM"):
        parts.append(t[i].val.lower())
        if not op(t, i + 1, "."):
            break
        i += 2
    if parts and obj in ("", "TABLE"):
        acc.tables.append(".".join(parts))          # "*.*" and "db.*" name every table


_HANDLERS = {
    "SELECT": _query, "WITH": _query, "(": _query, "TABLE": _query, "VALUES": _query,
    "INSERT": _dml, "REPLACE": _dml, "UPDATE": _dml, "DELETE": _dml, "CREATE": _ddl,
    "ALTER": _ddl, "DROP": _drop, "SET": _set, "SHOW": _show, "USE": _use, "KILL": _kill,
    "EXPLAIN": _explain, "DESCRIBE": _explain, "DESC": _explain, "ANALYZE": _explain,
    "CALL": _call, "DO": _do,
    "HANDLER": _handler, "LOAD": _load, "PREPARE": _prepare, "EXECUTE": _execute,
    "GRANT": _grant, "REVOKE": _grant,
}
