"""What one parsed statement can do (for classify): everything in it, statements nested
in CTEs, DO blocks and function/procedure bodies (LANGUAGE sql, both body syntaxes, and
PL/pgSQL), rule actions, each action of a MERGE, and dynamic SQL whose text is known
(EXECUTE of literals or of variables assigned only literals, dblink and the other
functions that run SQL given as text: see plpgsql.py), the tables and functions it
touches, and the risky shapes policy cares about (flags).

What can't be known from the text is named in Statement.unknown (the policy gives it
its `unparseable` decision unless an allow rule names the flag, see hostagent.policy):
  dynamic_sql         SQL text computed when it runs (format(), a parameter, a column,
                      concatenation with anything but literals), or functions that
                      choose what they read at run time (schema_to_xml, database_to_xml)
  untrusted_language  a DO block or function in a language other than SQL and PL/pgSQL
                      (plpython3u, plperl, c, internal...): we can't read its code
  changes_parsing     it sets client_encoding to other than UTF8, or turns
                      standard_conforming_strings off (SET, set_config, ALTER ROLE/
                      DATABASE/SYSTEM ... SET, a function's SET): the server would then
                      read later texts differently from us (a backslash hidden in a
                      multibyte character, or escaping a quote, moves where strings end)
A trigger (CREATE [EVENT] TRIGGER ... EXECUTE FUNCTION f) is judged by what it is
(kinds CREATE and TRIGGER, f in functions, flag `trigger`): f's body is not in the text;
it was judged when it was created through the proxy.

Text that does not parse, a body that does not parse, or dynamic SQL nested deeper than
MAX_DEPTH raises Unparseable; the caller decides (deny by default)."""
from __future__ import annotations

from collections import deque

from pglast import ast, parse_plpgsql, parse_sql
from pglast.parser import ParseError

from hostagent.protocols.postgres.plpgsql import Body, Computed, literal_values, split_assignment

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
    # CREATE RULE / AGGREGATE, OPERATOR, TYPE ... / TYPE ... AS (...)
    "RuleStmt": "CREATE", "DefineStmt": "CREATE", "CompositeTypeStmt": "CREATE",
}
# Functions that read or write the server's files or run programs.
FILE_FUNCTIONS = frozenset({"pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file",
                            "lo_import", "lo_export", "lo_get", "lo_put", "pg_file_write",
                            "pg_ls_logdir", "pg_ls_waldir", "pg_ls_tmpdir", "pg_ls_archive_statusdir",
                            "dblink", "dblink_exec", "pg_file_rename", "pg_file_unlink",
                            "pg_file_sync", "pg_logdir_ls"})
# Settings that change how the server reads the text of later statements: a client
# encoding whose characters hide a backslash, backslashes escaping quotes in plain
# strings. Under them our reading and the server's differ: only these values are safe
# (a number never is, so that texts differing in numbers are judged alike).
PARSING_SETTINGS = {"client_encoding": frozenset({"utf8", "unicode"}),
                    "standard_conforming_strings": frozenset({"on", "true", "yes"})}
# Settings that load code from the server's files, or run programs, when they take effect.
LIBRARY_SETTINGS = frozenset({"session_preload_libraries", "local_preload_libraries",
                              "shared_preload_libraries", "dynamic_library_path"})


# Large-object functions, as the statement kinds of what they do to the stored data.
LARGE_OBJECT_KINDS = {"lo_unlink": "DELETE", "lo_truncate": "DELETE", "lo_truncate64": "DELETE",
                      "lo_put": "UPDATE", "lowrite": "UPDATE", "lo_from_bytea": "INSERT",
                      "lo_create": "INSERT", "lo_creat": "INSERT", "lo_import": "INSERT"}


_ALTER_DATA = {"AT_DropColumn": "DROP", "AT_AlterColumnType": "UPDATE"}


def _is_bool(node) -> bool:
    if isinstance(node, ast.A_Const):
        return isinstance(node.val, ast.Boolean)
    return (isinstance(node, ast.TypeCast) and node.typeName.names[-1].sval in ("bool", "boolean"))


def _dblink_sql(args) -> tuple[int, ...]:
    """dblink(sql), dblink(sql, fail), dblink(conn, sql), dblink(conn, sql, fail)."""
    if len(args) == 1:
        return (0,)
    return (0,) if len(args) == 2 and _is_bool(args[1]) else (1,)


def _dblink_open_sql(args) -> tuple[int, ...]:
    """dblink_open(cursor, sql [, fail]) or dblink_open(conn, cursor, sql [, fail])."""
    if len(args) == 2 or (len(args) == 3 and _is_bool(args[2])):
        return (1,)
    return (2,)


# Functions that run SQL given as text: bare name -> the arguments that are SQL.
SQL_TEXT_ARGS = {
    "dblink": _dblink_sql, "dblink_exec": _dblink_sql, "dblink_send_query": lambda a: (1,),
    "dblink_open": _dblink_open_sql,
    "query_to_xml": lambda a: (0,), "query_to_xmlschema": lambda a: (0,),
    "query_to_xml_and_xmlschema": lambda a: (0,),
    "ts_stat": lambda a: (0,), "ts_rewrite": lambda a: (1,) if len(a) == 2 else (),
    "crosstab": lambda a: (0, 1) if len(a) == 2 and not isinstance(
        getattr(a[1], "val", None), ast.Integer) else (0,),
    "crosstab2": lambda a: (0,), "crosstab3": lambda a: (0,), "crosstab4": lambda a: (0,),
    "pg_background_launch": lambda a: (0,),
}
# ... and the same for pg_cron's, recognised schema-qualified only (their names are common)
SQL_TEXT_ARGS_QUALIFIED = {
    "cron.schedule": lambda a: (len(a) - 1,), "cron.schedule_in_database": lambda a: (2,),
    "cron.alter_job": lambda a: (2,),
}
# Functions that read a table named by a text argument (its first).
TABLE_TEXT_FUNCTIONS = frozenset({"table_to_xml", "table_to_xmlschema",
                                  "table_to_xml_and_xmlschema"})
# Functions that read every table of a schema or database, or build SQL from fragments
# given as text (xml2's xpath_table, tablefunc's connectby): what they run isn't known.
WIDE_FUNCTIONS = frozenset({"schema_to_xml", "schema_to_xmlschema", "schema_to_xml_and_xmlschema",
                            "database_to_xml", "database_to_xmlschema",
                            "database_to_xml_and_xmlschema", "xpath_table", "connectby"})
SQL_FUNCTIONS = frozenset(SQL_TEXT_ARGS) | TABLE_TEXT_FUNCTIONS | WIDE_FUNCTIONS | {
    "cursor_to_xml", "cursor_to_xmlschema"}
MAX_DEPTH = 8          # bodies and dynamic SQL nested in each other, before Unparseable
# SQL text judged for one statement beyond its own (bodies, dynamic texts), before
# Unparseable: `||` of variables can make texts far longer than the statement itself
MAX_JUDGED_BYTES = 2 * 1024 * 1024
_SCOPES = (ast.RangeVar, ast.RangeFunction, ast.RangeSubselect, ast.RangeTableFunc)
_MERGE_ACTIONS = {"CMD_UPDATE": "UPDATE", "CMD_INSERT": "INSERT", "CMD_DELETE": "DELETE"}
# definitions naming the functions an object calls later (CREATE AGGREGATE, OPERATOR, TYPE)
_DEFINE_FUNCS = frozenset({"function", "procedure", "input", "output", "receive", "send",
                           "typmod_in", "typmod_out", "analyze", "subscript", "restrict",
                           "join", "canonical", "subtype_diff"})


def statement_kind(node_name: str) -> str:
    """A statement node's kind: the known ones by name, the rest by their verb."""
    if node_name in KINDS:
        return KINDS[node_name]
    for verb in ("Create", "Alter", "Drop", "Grant", "Reassign", "Comment", "Security",
                 "Import", "Refresh", "Reindex", "Cluster", "Load", "Discard", "Checkpoint"):
        if node_name.startswith(verb):
            return verb.upper()
    return node_name.removesuffix("Stmt").upper()


class Unparseable(Exception):
    pass

def _dollar_quote(body: str) -> str:
    tag, n = "$agq$", 0
    while tag in body:
        n += 1
        tag = f"$agq{n}$"
    return f"{tag}{body}{tag}"


def _names(parts) -> str:
    return ".".join(p.sval for p in parts or () if isinstance(p, ast.String))


class Walk:
    """Collects what one statement does, into kinds, tables, functions, flags and
    unknown, following bodies and known dynamic SQL into the text they run. Visits every
    node breadth first, in pglast's Visitor's order, without its per-call cost (it
    looks up its methods with inspect on every call: a body of many statements paid it
    for each)."""

    def __init__(self, text: str = ""):
        self.kinds: set[str] = set()
        self.tables: list[str] = []
        self.functions: list[str] = []
        self.flags: set[str] = set()
        self.unknown: set[str] = set()
        self.columns: set[str] = set()   # every column named, bodies included (masking)
        self.code = False                # it holds code (a block, a function body)
        self.depth = 0
        self._text = text            # the source of the statement walked (its root)
        self._root = None
        self._variable = None        # PL/pgSQL variables, while walking a body
        self._scoped: bool | None = None   # whether the root has tables in scope
        self._judged: set[str] = set()
        self._judged_bytes = 0

    def statement(self, node, text: str) -> None:
        self._root, self._text, self._scoped = node, text, None
        self(node)

    def _names_resolver(self):
        """The body's variables, for names in a statement of a PL/pgSQL body, where no
        table is in scope (a column of the same name may win: #variable_conflict)."""
        if self._variable is None:
            return None
        if self._scoped is None:
            self._scoped = bool(find_nodes(self._root, *_SCOPES))
        return None if self._scoped else self._variable

    def __call__(self, tree) -> None:
        todo = deque((tree,))
        Node = ast.Node
        while todo:
            item = todo.popleft()
            for sub in (item if isinstance(item, tuple) else (item,)):
                if isinstance(sub, Node):
                    self.visit(sub)
                    for member in sub.__slots__:
                        value = getattr(sub, member)
                        if isinstance(value, (tuple, Node)):
                            todo.append(value)
                elif isinstance(sub, tuple):
                    todo.extend(v for v in sub if isinstance(v, (tuple, Node)))

    def visit(self, node):
        cls = type(node)
        name = cls.__name__
        if name.endswith("Stmt") and name != "RawStmt":
            self.kinds.add(statement_kind(name))
        if cls is ast.RangeVar:
            self.tables.append(".".join(p for p in (node.schemaname, node.relname) if p))
            if node.schemaname:
                self.tables.append(node.relname)   # a rule on the bare name still matches
        elif cls is ast.FuncCall:
            self._call(node)
        elif cls is ast.ColumnRef:
            last = node.fields[-1] if node.fields else None
            if isinstance(last, ast.String):
                self.columns.add(last.sval)
        else:
            handler = _HANDLERS.get(cls)
            if handler is not None:
                handler(self, node)

    # ---- what runs elsewhere, judged here

    def run_text(self, sql: str) -> None:
        """Judge SQL text this statement runs (a body, a known dynamic text) as part of
        it. Unparseable if it does not parse, or nests too deep."""
        if sql in self._judged:
            return
        self._judged.add(sql)
        self._judged_bytes += len(sql)
        if self._judged_bytes > MAX_JUDGED_BYTES:
            raise Unparseable("too much SQL in bodies and dynamic SQL to judge")
        if self.depth >= MAX_DEPTH:
            raise Unparseable("SQL nested in bodies and dynamic SQL too deeply to judge")
        try:
            raw = parse_sql(sql)
        except ParseError as exc:
            raise Unparseable(f"SQL run by the statement does not parse: {exc}") from None
        saved = (self._root, self._text, self._variable, self._scoped)
        self.depth += 1
        self._variable = None
        try:
            for stmt in raw:
                start = stmt.stmt_location or 0
                end = start + stmt.stmt_len if stmt.stmt_len else len(sql)
                self.statement(stmt.stmt, sql[start:end])
        finally:
            self.depth -= 1
            self._root, self._text, self._variable, self._scoped = saved

    def _dynamic(self, node=None, texts=None) -> None:
        """Dynamic SQL (an expression node, or a function giving its texts): judged as
        the texts it runs when they are known."""
        self.flags.add("dynamic_sql")
        try:
            texts = texts() if texts is not None else literal_values(node, self._names_resolver())
        except Computed:
            self.unknown.add("dynamic_sql")
            return
        for text in sorted(texts):
            self.run_text(text)

    def _call(self, node: ast.FuncCall) -> None:
        fname = _names(node.funcname)
        self.functions.append(fname)
        lower = fname.lower()
        bare = lower.rsplit(".", 1)[-1]
        if bare in FILE_FUNCTIONS:
            self.flags.add("server_files")
        if bare in LARGE_OBJECT_KINDS:
            self.kinds.add(LARGE_OBJECT_KINDS[bare])
        if bare == "set_config":
            args = node.args or ()
            try:
                (setting,) = literal_values(args[0]) if args else ("",)
            except (Computed, ValueError):
                setting = "client_encoding"   # computed: it may be one of them
            self._parsing_setting(setting.lower(), args[1] if len(args) > 1 else None)
        spec = SQL_TEXT_ARGS.get(bare) or SQL_TEXT_ARGS_QUALIFIED.get(lower)
        if spec is None and bare not in SQL_FUNCTIONS:
            return
        self.flags.add("dynamic_sql")   # runs SQL (or reads tables) given at run time
        args = node.args or ()
        if any(isinstance(a, ast.NamedArgExpr) for a in args) or node.func_variadic:
            self.unknown.add("dynamic_sql")   # which argument is the SQL: not followed
        elif spec is not None:
            for i in spec(args):
                if 0 <= i < len(args):
                    self._dynamic(args[i])
        elif bare in WIDE_FUNCTIONS:
            self.unknown.add("dynamic_sql")
        elif bare in TABLE_TEXT_FUNCTIONS and args:
            self._table_text(args[0])

    def _table_text(self, arg) -> None:
        if isinstance(arg, ast.TypeCast) and arg.typeName.names[-1].sval == "regclass":
            arg = arg.arg
        try:
            names = literal_values(arg, self._names_resolver())
            for name in names:
                (raw,) = parse_sql(f"TABLE {name}")
                rel = raw.stmt.fromClause[0]
                if not isinstance(rel, ast.RangeVar):
                    raise Computed
                self.tables.append(".".join(p for p in (rel.schemaname, rel.relname) if p))
                if rel.schemaname:
                    self.tables.append(rel.relname)
        except (Computed, ParseError, ValueError, AttributeError, IndexError, TypeError):
            self.unknown.add("dynamic_sql")

    # ---- PL/pgSQL

    def _plpgsql(self, create_function: str) -> None:
        try:
            body = Body(parse_plpgsql(create_function))
        except (ParseError, ValueError):
            raise Unparseable("a procedural block contains code the parser can't read") from None
        if self.depth >= MAX_DEPTH:
            raise Unparseable("SQL nested in bodies and dynamic SQL too deeply to judge")
        saved = (self._root, self._text, self._variable, self._scoped)
        self.depth += 1
        self._variable = body.variable
        try:
            for query in body.static:
                self._plpgsql_expr(query)
            for expr in body.dynamic:
                self._dynamic(texts=lambda e=expr: body.values(e))
        finally:
            self.depth -= 1
            self._root, self._text, self._variable, self._scoped = saved

    def _plpgsql_expr(self, query: str) -> None:
        """A PL/pgSQL statement or expression: a statement, an expression, or the right
        side of an assignment."""
        for text in (query, f"SELECT {query}", None):
            if text is None:
                split = split_assignment(query)
                if split is None:
                    break
                text = f"SELECT {split[1]}"
            try:
                inner = parse_sql(text)
            except ParseError:
                continue
            for stmt in inner:
                start = stmt.stmt_location or 0
                end = start + stmt.stmt_len if stmt.stmt_len else len(text)
                self.statement(stmt.stmt, text[start:end])
            return
        raise Unparseable("a procedural block contains code the parser can't read")

    # ---- node handlers

    def _do(self, node: ast.DoStmt) -> None:
        self.code = True
        body, language = "", "plpgsql"
        for arg in node.args or ():
            if arg.defname == "as":
                body = arg.arg.sval
            elif arg.defname == "language":
                language = arg.arg.sval   # the server's names are case-sensitive
        if language != "plpgsql":
            self.flags.add("untrusted_language")
            self.unknown.add("untrusted_language")
            return
        self._plpgsql(f"CREATE FUNCTION f() RETURNS void AS {_dollar_quote(body)} "
                      "LANGUAGE plpgsql")

    def _create_function(self, node: ast.CreateFunctionStmt) -> None:
        self.code = True
        language, body = None, None
        for opt in node.options or ():
            if opt.defname == "language":
                language = opt.arg.sval
            elif opt.defname == "as":
                body = opt.arg
        if node.sql_body is not None:
            return   # SQL-standard body (BEGIN ATOMIC, RETURN): parsed, walked as a child
        if language is None:
            language = "sql"   # the server refuses it; judged as if it were SQL
        if language == "sql":
            if body:
                self.run_text(body[0].sval)
        elif language == "plpgsql":
            if node is self._root and self._text:
                text = self._text
            else:
                from pglast.stream import RawStream
                text = RawStream()(node)
            self._plpgsql(text)
        else:
            self.flags.add("untrusted_language")
            self.unknown.add("untrusted_language")

    def _trigger(self, node) -> None:
        self.kinds.add("TRIGGER")
        self.flags.add("trigger")
        self.functions.append(_names(node.funcname))

    def _rule(self, node: ast.RuleStmt) -> None:
        self.kinds.add("RULE")   # its actions are statements, walked as children

    def _merge(self, node: ast.MergeStmt) -> None:
        """MERGE does what its WHEN clauses may do (DO NOTHING adds nothing)."""
        constant_join = not find_nodes(node.joinCondition, ast.ColumnRef)
        for clause in node.mergeWhenClauses or ():
            kind = _MERGE_ACTIONS.get(getattr(clause.commandType, "name", ""))
            if kind is None:
                continue
            self.kinds.add(kind)
            if kind != "INSERT" and clause.condition is None and constant_join:
                self.flags.add("no_where")   # every row of the target

    def _delete_update(self, node) -> None:
        if node.whereClause is None:
            self.flags.add("no_where")

    def _copy(self, node: ast.CopyStmt) -> None:
        if node.is_program:
            self.flags.add("copy_program")
        elif node.filename:
            self.flags.add("server_files")
        elif not node.is_from:
            self.flags.add("copy_out")

    def _drop(self, node: ast.DropStmt) -> None:
        if node.removeType is not None:
            for obj in node.objects or ():
                if isinstance(obj, tuple) and all(isinstance(p, ast.String) for p in obj):
                    self.tables.append(".".join(p.sval for p in obj))

    def _select(self, node: ast.SelectStmt) -> None:
        if node.intoClause is not None:
            self.kinds.add("CREATE")    # SELECT ... INTO makes a table
            self.flags.add("select_into")

    def _option(self, node: ast.DefElem) -> None:
        """file_fdw's options: a foreign table reading a program's output or a file."""
        if node.defname == "program":
            self.flags.add("copy_program")
        elif node.defname == "filename":
            self.flags.add("server_files")

    def _parsing_setting(self, name: str, value) -> None:
        """SET / set_config of a setting that changes how later text is read."""
        safe = PARSING_SETTINGS.get(name)
        if safe is None:
            return
        if value is not None:
            try:
                (value,) = literal_values(value)
            except (Computed, ValueError):
                value = None
        if value is None or value.lower().replace("-", "").replace("_", "") not in safe:
            self.flags.add("changes_parsing")
            self.unknown.add("changes_parsing")

    def _setting(self, node: ast.VariableSetStmt) -> None:
        name = (node.name or "").lower()
        if name in PARSING_SETTINGS:
            kind = getattr(node.kind, "name", "")
            if kind == "VAR_SET_VALUE":
                args = node.args or ()
                self._parsing_setting(name, args[0] if len(args) == 1 else None)
            elif kind not in ("VAR_SET_DEFAULT", "VAR_RESET"):
                self._parsing_setting(name, None)   # FROM CURRENT: whatever it is then
        if name in LIBRARY_SETTINGS:
            self.flags.add("server_files")
        elif name.endswith("_command"):     # archive_command, restore_command...
            self.flags.add("copy_program")

    def _load(self, node: ast.LoadStmt) -> None:
        self.flags.add("server_files")

    def _define(self, node: ast.DefineStmt) -> None:
        if (getattr(node.kind, "name", "") == "OBJECT_OPERATOR" and node.defnames
                and getattr(node.defnames[-1], "sval", None) == "||"):
            # an operator || found before pg_catalog's (search_path) would change what
            # every `'...' || '...'` we take as known dynamic SQL runs
            self.flags.add("dynamic_sql")
            self.unknown.add("dynamic_sql")
        for d in node.definition or ():
            if isinstance(d, ast.DefElem) and isinstance(d.arg, ast.TypeName) and (
                    d.defname.endswith("func") or d.defname in _DEFINE_FUNCS):
                self._implicit(_names(d.arg.names))

    def _cast(self, node: ast.CreateCastStmt) -> None:
        if node.func is not None:
            self._implicit(_names(node.func.objname))

    def _alter_cmd(self, node: ast.AlterTableCmd) -> None:
        # what an ALTER TABLE does to the data: a dropped column is gone; a new type's
        # USING expression rewrites every value
        kind = _ALTER_DATA.get(getattr(node.subtype, "name", ""))
        if kind:
            self.kinds.add(kind)

    def _domain(self, node) -> None:
        # CHECK expressions run on every value cast to the domain
        if getattr(node, "constraints", None) or getattr(node, "def_", None) is not None:
            self.flags.add("implicit_code")

    def _implicit(self, fname: str) -> None:
        """A function an operator, aggregate, cast or type will call where no call is
        written (`a ### b`, `x::t`, `agg(x)`): what it is given and does is judged by
        name nowhere later, so one we treat specially (SQL from text, settings, files)
        makes what the statement leads to unknown."""
        self.functions.append(fname)
        self.flags.add("implicit_code")
        bare = fname.lower().rsplit(".", 1)[-1]
        if bare in SQL_FUNCTIONS or bare in FILE_FUNCTIONS or bare == "set_config" \
                or bare in LARGE_OBJECT_KINDS or "." in fname and fname.lower() in \
                SQL_TEXT_ARGS_QUALIFIED:
            self.unknown.add("dynamic_sql")


_HANDLERS = {
    ast.DoStmt: Walk._do, ast.CreateFunctionStmt: Walk._create_function,
    ast.CreateTrigStmt: Walk._trigger, ast.CreateEventTrigStmt: Walk._trigger,
    ast.RuleStmt: Walk._rule, ast.MergeStmt: Walk._merge,
    ast.DeleteStmt: Walk._delete_update, ast.UpdateStmt: Walk._delete_update,
    ast.CopyStmt: Walk._copy, ast.DropStmt: Walk._drop, ast.SelectStmt: Walk._select,
    ast.DefineStmt: Walk._define, ast.CreateCastStmt: Walk._cast, ast.DefElem: Walk._option,
    ast.CreateDomainStmt: Walk._domain, ast.AlterDomainStmt: Walk._domain,
    ast.AlterTableCmd: Walk._alter_cmd,
    ast.VariableSetStmt: Walk._setting, ast.LoadStmt: Walk._load,
}


def find_nodes(tree, *types) -> list:
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
