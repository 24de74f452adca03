"""SQL statements (PostgreSQL's, MySQL's) as protocol-neutral policy requests: the
statement kinds are the action, the tables the resources, and every SQL matcher
(databases, statements, tables, functions, flags) an attribute under its own name. What a statement
runs that can't be known from its text (Statement.unknown: computed dynamic SQL, code
in another language) goes in Request.unknown: policy gives it the `unparseable`
decision unless an allow rule names those flags."""
from __future__ import annotations

from hostagent.policy import Request

# A statement's text in its record, at most (a 32 MiB INSERT of a blob is recorded by
# its start and its length: a spool frame holds 32 MiB)
MAX_RECORDED = 64 << 10


def requests_for(statements, text: str, *, target: str, identity: dict, database: str,
                 extended: str | None = None, tables_of=None, protocol: str = "postgres",
                 how: str | None = None) -> list[tuple[Request, dict]]:
    """One (Request, command record) per statement; a statement that did not parse
    (None) is one unparsed request for the whole text. `tables_of(statement)`: its
    tables as policy matches them (names resolved through the search path). `how`: how
    the client sent it (recorded; by default PostgreSQL's simple or extended protocol)."""
    out = []
    for st in statements or [None]:
        if st is None:
            req = Request(target=target, protocol=protocol, identity=identity, text=text,
                          attributes={"databases": (database,)}, parsed=False)
            kinds: list = []
            tables = functions = flags = unknown = ()
        else:
            kinds = sorted(st.kinds)
            tables = st.tables if tables_of is None else tables_of(st)
            functions, flags = st.functions, st.flags
            unknown = tuple(sorted(getattr(st, "unknown", ())))
            req = Request(target=target, protocol=protocol, identity=identity, text=st.text,
                          action=" ".join(kinds), resources=tables,
                          attributes={"databases": (database,), "statements": st.kinds,
                                      "tables": tables, "functions": functions,
                                      "flags": flags}, unknown=unknown)
        recorded = req.text if len(req.text) <= MAX_RECORDED else req.text[:MAX_RECORDED]
        if not recorded.isascii():   # bytes that were not UTF-8 (lone surrogates) can't be
            recorded = recorded.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        out.append((req, {"text": recorded, "kinds": kinds, "tables": list(tables),
                          "functions": list(functions), "flags": sorted(flags),
                          "unknown": list(unknown),
                          "database": database, "statement": extended,
                          "protocol": how or ("simple" if extended is None else "extended"),
                          **({"text_chars": len(req.text)} if len(req.text) > MAX_RECORDED else {})}))
    return out
