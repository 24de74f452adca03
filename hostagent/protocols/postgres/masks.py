"""The PostgreSQL layer's masking half: which result columns are masked (by what the
server says they are, catalog.py, else by the names the statement uses), rows and
messages rewritten as they stream, and the statements refused because they would carry
masked values where masks don't reach. A mixin of PostgresLayer: it reads the layer's
session state (masker, results, catalog)."""
from __future__ import annotations

from hostagent.masking import MASK
from hostagent.protocols.postgres import messages as m
from hostagent.protocols.postgres.effects import SQL_FUNCTIONS
from hostagent.protocols.postgres.walk import mask_row, mask_rows

# statements that only read: anything else that reads a masked column is refused
READ_KINDS = frozenset({"SELECT", "EXPLAIN", "PREPARE", "DECLARECURSOR", "SHOW"})
# statements whose errors can quote the rows they write
WRITE_KINDS = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "COPY", "ALTER", "CREATE"})
# planner statistics: most common values, histogram bounds
STATS_VIEWS = frozenset({"pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic",
                         "pg_statistic_ext_data"})
# functions that store or send a value where masks don't reach
EMITTING_FUNCTIONS = frozenset({
    "pg_notify", "set_config", "setval", "lo_from_bytea", "lo_create", "lo_put", "lowrite",
    "lo_import", "lo_export", "pg_logical_emit_message", "dblink", "dblink_exec",
    "dblink_send_query", "dblink_open", "pg_file_write", "pg_advisory_lock",
    "pg_advisory_xact_lock", "pg_try_advisory_lock", "pg_try_advisory_xact_lock",
    "pg_advisory_lock_shared", "pg_try_advisory_lock_shared", "pg_advisory_xact_lock_shared",
    "pg_try_advisory_xact_lock_shared", "txid_current", "nextval", "lo_truncate",
    "lo_truncate64", "lo_creat"})
# ... and every function of these families (large objects, advisory locks, dblink)
EMITTING_PREFIXES = ("lo_", "pg_advisory", "pg_try_advisory", "dblink")
TEXT_OID = 25
ACTIONS = {"pass": 0, "mask": 1, "scan": 2}   # a plan's, for the compiled mask_row
_MASK = MASK.encode()
TEXT_TYPES = frozenset({25, 1043, 1042, 19, 114, 142, 705})   # text, varchar, char, name...
# bool, int2/4/8, oid, float4/8, numeric, date, time(tz), timestamp(tz), interval, uuid
PLAIN_BINARY_TYPES = frozenset({16, 20, 21, 23, 26, 700, 701, 1700, 1082, 1083, 1266, 1114,
                                1184, 1186, 2950})


# Text forms no detector can match: bool (t, f), int2 (six characters); int4 and oid
# (ten digits) hold no card or SSN, but may hold a phone number
UNMATCHABLE_TYPES = frozenset({16, 21})
SHORT_NUMBER_TYPES = frozenset({23, 26})


def _unmatchable(type_oid: int, detectors: frozenset) -> bool:
    return type_oid in UNMATCHABLE_TYPES or (type_oid in SHORT_NUMBER_TYPES
                                             and "phone" not in detectors)


# Numbers whose text a digit detector can match (a card in an int8, a phone number in an
# int4): in binary format the detectors can't read them, so they are masked whole
DIGIT_DETECTORS = frozenset({"credit_card", "phone", "us_ssn"})
NUMBER_TYPES = frozenset({20, 700, 701, 1700, 2950})   # int8, float4/8, numeric, uuid


def _binary_readable(type_oid: int, detectors: frozenset) -> bool:
    """Whether a column of this type may go out in binary format unscanned."""
    if type_oid not in PLAIN_BINARY_TYPES:
        return False
    if detectors & DIGIT_DETECTORS and (type_oid in NUMBER_TYPES or (
            type_oid in SHORT_NUMBER_TYPES and "phone" in detectors)):
        return False
    return True


def in_formats(plan: list, formats: tuple[int, ...]) -> list:
    """A plan made from a statement's description (every column text) for rows a Bind
    asked for in `formats` (none: text; one: all; else one a column): a scanned column
    sent in binary can't be scanned, so it is masked unless its type may pass."""
    if not formats or not any(formats):
        return plan
    out = []
    for i, p in enumerate(plan):
        fmt = formats[0] if len(formats) == 1 else (formats[i] if i < len(formats) else 0)
        if fmt == 1 and p[0] == "scan" and p[3] not in TEXT_TYPES:
            out.append(("mask", "(unscannable binary)", 1, p[3], True) if p[4] else
                       ("pass", "", 1, p[3], False))
        else:
            out.append(p)
    return out


# error and notice fields that can quote data: withheld while masked columns are read
_QUOTING = frozenset("MDHWqp")


def withheld(fields: dict[str, str]) -> dict[str, str]:
    out = {k: v for k, v in fields.items() if k not in _QUOTING}
    out["M"] = (f"agentgate: the server's message is withheld: the statement reads masked "
                f"columns (SQLSTATE {fields.get('C', '?')})")
    return out




class Masking:
    def _plan(self, cols: list[m.Column]) -> bytes:
        """Decide, per column, mask whole / scan with detectors / pass; a masked column
        becomes text, so any client (binary formats too) decodes the mask."""
        prov = self._results.current()
        cat = self._current_catalog() if self.catalogs is not None else None
        exact = cat.masked(self.masker) if cat is not None else None
        if prov is not None:
            tables, sources, lineages, functions, _kinds = prov
            # Names can be followed only so far; a statement that reads a masked column
            # (or whole rows) anywhere gets every result column not proven clean masked.
            touches = self._reads_masked(prov)
            renamed = any(lin.renamed for lin in lineages)
            opaque = set().union(*(lin.opaque for lin in lineages))
        failed = self._catalog_failed == self.catalogs.generation if self.catalogs else False
        runs_sql = prov is not None and bool(prov[3] & SQL_FUNCTIONS)
        plan = []
        for col in cols:
            if failed:
                # where columns come from can't be known: nothing is proven clean
                rule = "(catalog unavailable)"
            elif exact is not None and col.table_oid and cat.knows(col.table_oid, col.column):
                # the server says which relation's column this is: its rule, and only it
                rule = exact.rule(col.table_oid, col.column)
            elif prov is None:
                rule = "(unknown provenance)"
            else:
                rule = self._column_rule(tables, col.name)
                for src in sources.get(col.name, ()):   # through aliases and expressions
                    table, _, name = src.rpartition(".")
                    rule = rule or (self.masker.column_masked(table, name) if table
                                    else self._column_rule(tables, name))
                if not rule and touches and (
                        renamed or col.name in opaque or "?column?" in opaque or
                        (col.table_oid == 0 and col.name not in sources)):
                    # computed by the server under a name we can't follow (CASE,
                    # coalesce, a cast, a subquery, a whole row, renamed columns)
                    rule = "(derived from masked data)"
                if not rule and col.table_oid == 0:
                    # no table says where it is from: a masked column's name (from a
                    # function's row, a VALUES list), SQL run from text, or code of the
                    # database's own, which may read anything, mask it
                    rule = self.masker.column_masked_anywhere(col.name) or (
                        "(computed by SQL we can't follow)" if runs_sql or (
                            cat is not None and functions & cat.user_functions) else None)
            detectors = self.masker.detectors
            # (the last item: whether, sent in binary, the column could not be read)
            binary_hides = not _binary_readable(col.type_oid, detectors)
            if rule:
                plan.append(("mask", rule, col.format, col.type_oid, binary_hides))
            elif self.masker.has_detectors and (
                    col.format == 0 or col.type_oid in TEXT_TYPES) and \
                    not _unmatchable(col.type_oid, detectors):
                plan.append(("scan", "", col.format, col.type_oid, binary_hides))
            elif col.format == 1 and binary_hides:
                # binary arrays, json(b), bytea, numbers a digit detector would read
                # in their text...: the detectors can't read them
                plan.append(("mask", "(unscannable binary)", col.format, col.type_oid,
                             binary_hides))
            else:
                plan.append(("pass", "", col.format, col.type_oid, binary_hides))
        self._results.set_plan(plan)
        out = [m.Column(c.name, c.table_oid, c.column, TEXT_OID, -1, -1, c.format)
               if p[0] == "mask" else c for c, p in zip(cols, plan)]
        return m.row_description(out)

    def _reads_masked(self, prov) -> bool:
        """Whether a statement reads masked columns (or whole rows, or what we can't see:
        a procedural body, a procedure), by the names it uses."""
        tables, _sources, lineages, _functions, _kinds = prov
        return any(lin.whole_rows or
                   any(self._column_rule(tables, c) for c in lin.columns)
                   for lin in lineages)

    def _copies_masked(self, statements) -> str | None:
        """Why a statement that reads masked columns would carry their values somewhere
        masks don't reach (another table, a view or function made of them, a setting,
        a notification, a large object), or None. Such statements are refused: masks
        apply to results, so the values must not leave any other way."""
        if not self.masker.column_rules:
            return None
        cat = self._current_catalog() if self.catalogs is not None else None
        for st in statements:
            if st is None or st.lineage is None:
                continue
            if "implicit_code" in st.flags:
                return ("an operator, cast, aggregate, type or domain check calls its "
                        "function where no call is written: masked values could reach "
                        "it unseen")
            if st.unknown:
                return (f"what it runs can't be known ({', '.join(sorted(st.unknown))}), "
                        "so it may read masked columns and carry them anywhere")
            holding = [t for t in st.tables if self._may_hold_masked(t)]
            if holding and "trigger" in st.flags:
                return ("a trigger on a table with masked columns would hand its rows to "
                        "code that can store them anywhere")
            if holding and st.code:
                return (f"code (a block or a function body) that reads {holding[0]}, which "
                        "has masked columns, could carry them anywhere")
            if holding and st.kinds & {"ALTER"}:
                return (f"{holding[0]} has masked columns: changing it (renames, "
                        "inheritance, partitions) could take its values out of the masks")
            stats = sorted({t.rsplit(".", 1)[-1].lower() for t in st.tables} & STATS_VIEWS)
            if stats:
                return f"{stats[0]} quotes column values (planner statistics)"
            read = st.lineage.columns | st.reads
            tables = {t.rsplit(".", 1)[-1] for t in st.tables}
            rules = [r for c in read for r in [self._column_rule(tables, c)] if r]
            if not rules and not (st.lineage.whole_rows and holding):
                continue
            what = sorted(st.kinds - READ_KINDS)
            if what:
                return (f"a {' '.join(what)} statement may not read masked columns "
                        f"(rule {rules[0] if rules else 'whole rows'}): their values "
                        "would leave unmasked")
            funcs = {f.rsplit(".", 1)[-1].lower() for f in st.functions}
            emitting = funcs & EMITTING_FUNCTIONS | {
                f for f in funcs if f.startswith(EMITTING_PREFIXES)}
            if cat is not None:
                emitting |= funcs & cat.user_functions
            if emitting or "select_into" in st.flags:
                return (f"a statement that reads masked columns may not pass them to "
                        f"{', '.join(sorted(emitting)) or 'SELECT INTO'}")
        return None

    def _may_hold_masked(self, table: str) -> bool:
        """Whether a relation of this name has masked columns: as the catalog says, or
        (a relation it doesn't know) as the rules' table patterns allow."""
        bare = table.rsplit(".", 1)[-1].lower()
        cat = self._current_catalog() if self.catalogs is not None else None
        if cat is not None and cat.schemas_of(bare):
            return bare in cat.masked(self.masker).names
        return self.masker.table_may_hold(bare)

    def _running_reads_masked(self) -> bool:
        """Errors and notices quote values ('invalid input syntax for type integer:
        "<the value>"', RAISE NOTICE '%', r.ssn): while a statement that reads masked
        columns runs, or one we can't see into, their text is withheld."""
        if not self.masker.column_rules:
            return False
        prov = self._results.running()
        if prov is False:
            return False
        if prov is None or self._reads_masked(prov):
            return True
        # a write's errors quote whole rows ("Failing row contains (...)")
        return bool(prov[4] & WRITE_KINDS) and any(self._may_hold_masked(t) for t in prov[0])

    def _column_rule(self, tables: set, column: str) -> str | None:
        """A column of unknown table is masked if any table the statement reads has
        it masked."""
        if not self.masker.column_rules:
            return None
        return next((r for t in (tables or {""}) for r in [self.masker.column_masked(t, column)]
                     if r), None)

    def _mask_fields(self, kind: bytes, fields: dict[str, str]) -> bytes:
        """Errors and notices can quote row data ("Key (email)=(...) already exists"):
        their texts go through the detectors too."""
        out = {}
        for code, value in fields.items():
            out[code] = self.masker.scan(value)[0] if code in "MDHW" else value
        body = b"".join(k.encode() + v.encode() + b"\0" for k, v in out.items()) + b"\0"
        return m.frame(kind, body)

    def _mask_notification(self, body: bytes) -> bytes:
        c = m.Cursor(body)
        pid, channel, payload = c.i32(), c.cstr(), c.cstr()
        payload = self.masker.scan(payload)[0]
        return m.frame(b"A", m._I32.pack(pid) + channel.encode() + b"\0" + payload.encode() + b"\0")

    def _mask_run(self, data: bytes, pos: int, end: int, cap: int) -> tuple[int, int, bytes]:
        """The run of DataRows from `pos`, masked by the compiled loop: (where it
        stopped, how many rows, the rows rewritten); no rows when the shape is unknown
        or the loop isn't built (the caller masks row by row)."""
        plan = self._results.plan()
        if plan is None or mask_rows is None:
            return pos, 0, b""
        self._compile(plan)
        return mask_rows(data, pos, end, cap, self._actions, self._keys,
                         self.masker.prefilter, self._scan_value, self.masker.counts, _MASK)

    def _compile(self, plan: list) -> None:
        if plan is not self._compiled_for:
            # per result shape, not per row: which columns to blank, which to scan
            self._compiled_for = plan
            self._mask_cols = [(i, f"{p[1]}:column") for i, p in enumerate(plan)
                               if p[0] == "mask"]
            self._scan_cols = [i for i, p in enumerate(plan) if p[0] == "scan"]
            self._actions = bytes(ACTIONS[p[0]] for p in plan)
            self._keys = tuple(f"{p[1]}:column" for p in plan)

    def _mask_row(self, body: bytes) -> list[bytes | None]:
        plan = self._results.plan()
        if plan is not None:
            self._compile(plan)
        if plan is not None and self.lean and mask_row is not None:
            # the same, compiled (the general path, lean off, keeps the loop below)
            values = mask_row(body, self._actions, self._keys, self.masker.prefilter,
                              self._scan_value, self.masker.counts, _MASK)
            if values is not None:
                return values
        values = m.parse_data_row(body)
        if plan is None or len(plan) != len(values):
            # rows whose shape we don't know: nothing goes out unmasked
            mask_cols = [(i, "(unknown shape):column") for i in range(len(values))]
            scan_cols = []
        else:
            mask_cols, scan_cols = self._mask_cols, self._scan_cols
        counts = self.masker.counts
        for i, key in mask_cols:
            if values[i] is not None:
                values[i] = _MASK
                counts[key] = counts.get(key, 0) + 1
        for i in scan_cols:
            if values[i] is not None:
                values[i] = self._scan_value(values[i])
        return values

    def _scan_value(self, value: bytes) -> bytes:
        try:
            return self.masker.scan_bytes(value)
        except UnicodeDecodeError:   # not text in a text column: masked whole
            self.masker.count_column("(undecodable)")
            return _MASK
