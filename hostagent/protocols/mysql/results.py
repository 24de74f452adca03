"""Masking MySQL result sets, text and binary protocol alike.

A column definition names the table and column a value comes from (org_table,
org_name): a column rule applies to that. Where the name proves nothing, masking fails
closed: when a statement could read a masked column (it names one, or reads a table a
rule may cover, e.g. through `*`), a result column that does not come straight from one
of the statement's own tables (an expression, a derived table's or a view's column) is
masked whole. Detectors scan the rest; a numeric column a detector could match (a card
number kept as BIGINT) is redefined as text, so typed clients decode the mask.

Column definitions of masked columns are rewritten as text (utf8mb4 VAR_STRING); in the
binary protocol the row is then re-encoded with the new types.
"""
from __future__ import annotations

from dataclasses import dataclass

from hostagent.masking import MASK, Masker
from hostagent.protocols.mysql import messages as m

PASS, WHOLE, SCAN, NUMBER = 0, 1, 2, 3
MASK_BYTES = MASK.encode()
# detectors that can match a run of digits: numbers are rendered and scanned for them
DIGIT_DETECTORS = frozenset({"credit_card", "us_ssn", "phone"})
WIDE_NUMBERS = frozenset({m.T_LONG, m.T_LONGLONG, m.T_DECIMAL, m.T_NEWDECIMAL})
NUMERIC = frozenset({m.T_TINY, m.T_SHORT, m.T_LONG, m.T_FLOAT, m.T_DOUBLE, m.T_LONGLONG,
                     m.T_INT24, m.T_YEAR, m.T_DECIMAL, m.T_NEWDECIMAL, m.T_BIT})
TEXT_TYPES = frozenset({m.T_VARCHAR, m.T_VAR_STRING, m.T_STRING, m.T_ENUM, m.T_SET,
                        m.T_JSON, m.T_TINY_BLOB, m.T_MEDIUM_BLOB, m.T_LONG_BLOB, m.T_BLOB})


@dataclass(frozen=True)
class Reads:
    """What the statements of one command could read, for masking."""
    tables: frozenset[str] = frozenset()      # bare table names they name
    masked: bool = False                      # they could read a masked column
    rules: tuple[str, ...] = ()               # the rules of the masked columns they name


def reads_of(statements, masker: Masker) -> Reads:
    tables: set[str] = set()
    rules: list[str] = []
    masked = False
    for st in statements:
        if st is None:
            return Reads(frozenset(), True, ("(unparsed)",))
        tables.update(t.rsplit(".", 1)[-1] for t in st.tables if t not in st.derived)
        for col in st.reads:
            rule = masker.column_masked_anywhere(col)
            if rule:
                rules.append(rule)
        masked = masked or any(masker.table_may_hold(t.rsplit(".", 1)[-1]) for t in st.tables)
        if "CALL" in st.kinds or st.kind == "DO":
            # a routine's body (created earlier, or elsewhere) may read anything
            return Reads(frozenset(), True, tuple(dict.fromkeys(rules)) or ("(masking)",))
    return Reads(frozenset(tables), masked or bool(rules), tuple(dict.fromkeys(rules)))


@dataclass(frozen=True)
class Plan:
    actions: tuple[int, ...]
    rules: tuple[str | None, ...]     # the rule masking a WHOLE column
    types: tuple[int, ...]            # the server's types (binary rows are read with them)
    out_types: tuple[int, ...]        # the types the client is told
    payloads: tuple[bytes | None, ...]   # rewritten column definitions (None: unchanged)
    binary: tuple[bool, ...]          # columns of the binary character set (blobs)
    trivial: bool                     # nothing to do on rows


def plan(columns: list[m.Column], masker: Masker, reads: Reads) -> Plan:
    digits = bool(masker.detectors & DIGIT_DETECTORS)
    scanning = bool(masker.detectors)
    actions, rules, payloads, out_types = [], [], [], []
    for col in columns:
        rule = None
        if col.org_table and col.org_name:
            rule = masker.column_masked(col.org_table, col.org_name)
            if rule is None and reads.masked and col.org_table.lower() not in reads.tables:
                rule = reads.rules[0] if reads.rules else "(masking)"   # a view, a derived table
        elif reads.masked:
            rule = reads.rules[0] if reads.rules else "(masking)"       # an expression
        if rule is not None:
            action = WHOLE
        elif scanning and col.type in TEXT_TYPES:
            action = SCAN
        elif digits and col.type in WIDE_NUMBERS:
            action = NUMBER
        else:
            action = PASS
        actions.append(action)
        rules.append(rule)
        if action in (WHOLE, NUMBER) or (action == SCAN and col.type not in TEXT_TYPES):
            new = m.as_masked_text(col, max(col.length, 21))
            payloads.append(m.column(new))
            out_types.append(new.type)
        else:
            payloads.append(None)
            out_types.append(col.type)
    types = tuple(c.type for c in columns)
    return Plan(tuple(actions), tuple(rules), types, tuple(out_types), tuple(payloads),
                tuple(c.charset == m.BINARY_CHARSET for c in columns),
                all(a == PASS for a in actions))


def _scan(masker: Masker, value: bytes, rule_if_opaque: str, binary: bool = False) -> bytes:
    try:
        return masker.scan_bytes(value)
    except UnicodeDecodeError:
        if binary:
            # a blob: its bytes read one to a character, so text inside it (a key in a
            # file's bytes) is found and masked in place, the rest left as it is
            return masker.scan(value.decode("latin-1"))[0].encode("latin-1")
        masker.count_column(rule_if_opaque)   # text that isn't: can't be inspected
        return MASK_BYTES


def mask_row(values: list, p: Plan, masker: Masker,
             unsigned: tuple[bool, ...] | None = None) -> list:
    """A row's values masked: a text row's, or (with `unsigned`) a binary row's raw values
    (messages.parse_binary_row), whose numbers are rendered as the text they become
    (the caller rebuilds the row with p.out_types)."""
    out = list(values)
    for i, action in enumerate(p.actions):
        v = out[i]
        if v is None or action == PASS:
            continue
        if action == WHOLE:
            masker.count_column(p.rules[i])
            out[i] = MASK_BYTES
            continue
        if action == NUMBER and unsigned is not None:
            v = m.render_binary(v, p.types[i], unsigned[i]).encode()
        out[i] = _scan(masker, v, "(masking)", p.binary[i])
    return out
