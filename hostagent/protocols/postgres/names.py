"""Table rules match relations, not spellings: an unqualified name means the relation
the session's search_path finds, so a rule on `private.secrets` also matches
`SET search_path = private; DROP TABLE secrets`.

The session's path is followed through what the agent runs (SET/RESET search_path);
where it can't be (set_config, a SET we can't read), it is unknown and an unqualified
name stands for that name in every schema that has it (and every schema on the paths
seen), so no rule is escaped by leaving the path in doubt."""
from __future__ import annotations

from pglast import ast, parse_sql
from pglast.parser import ParseError

DEFAULT_PATH = ("$user", "public")


def parse_path(value: str) -> tuple[str, ...]:
    """search_path's text form ('"$user", public') as schema names."""
    out = []
    for part in value.split(","):
        part = part.strip()
        if part.startswith('"') and part.endswith('"') and len(part) > 1:
            part = part[1:-1].replace('""', '"')
        else:
            part = part.lower()
        if part:
            out.append(part)
    return tuple(out)


class SearchPath:
    def __init__(self, user: str, initial: tuple[str, ...] = DEFAULT_PATH):
        self.user = user
        self.initial = initial
        self.path: tuple[str, ...] | None = initial
        self.seen: set[str] = set(self._schemas(initial))
        self._last: tuple = (None, (), None)

    def _schemas(self, path) -> list[str]:
        return [self.user if s == "$user" else s for s in path]

    def learned_initial(self, initial: tuple[str, ...]) -> None:
        """The path a new session of this role starts with (read from the server)."""
        if self.path == self.initial:
            self.path = initial
        self.initial = initial
        self.seen.update(self._schemas(initial))

    def after(self, statement, in_transaction: bool = False) -> None:
        """Follow what a statement (classify.Statement, or None: unparsed) does to the
        path. A SET in a transaction may be rolled back, one in a block or a dynamic
        statement can't be read: the path is then unknown."""
        if statement is None:
            return
        kinds = statement.kinds
        if any(f.rsplit(".", 1)[-1].lower() == "set_config" for f in statement.functions) \
                or "dynamic_sql" in statement.flags:
            self.path = None
            return
        if "DISCARD" in kinds and "all" in statement.text.lower():
            self.path = self.initial
            return
        if "SET" not in kinds:
            return
        if statement.kind != "SET" or in_transaction:
            self.path = None
            return
        try:
            stmts = parse_sql(statement.text)
        except ParseError:
            self.path = None
            return
        for raw in stmts:
            node = raw.stmt
            if not isinstance(node, ast.VariableSetStmt):
                continue
            if node.name is None or node.name.lower() == "search_path":
                if node.kind == 0 and node.args:   # SET search_path TO ...
                    names = []
                    for arg in node.args:
                        value = getattr(arg, "val", arg)
                        sval = getattr(value, "sval", None)
                        if sval is None:
                            self.path = None
                            return
                        names.append(sval)
                        if "," in sval:   # 'a,b': one schema, or two; both are candidates
                            self.seen.update(parse_path(sval))
                    self.path = tuple(names)
                    self.seen.update(self._schemas(self.path))
                elif node.kind in (1, 4, 5):   # TO DEFAULT, RESET, RESET ALL
                    self.path = self.initial
                elif node.kind != 0:
                    self.path = None

    def resolve(self, tables, catalog=None, later: bool = False) -> tuple[str, ...]:
        """`tables` with every unqualified name also as schema.name: the schema the
        path finds it in (per the catalog), else every schema it may be in. `later`:
        the names resolve when it runs, under a path we can't know now (a prepared
        statement, a function body)."""
        key = (tables, later, self.path)
        if key == self._last[0] and catalog is self._last[2]:
            return self._last[1]
        out = list(tables)
        for t in tables:
            if "." in t:
                continue
            bare = t.lower()
            have = (catalog.schemas_of(bare) if catalog is not None else None)
            if self.path is not None and not later:
                path = ["pg_catalog", *self._schemas(self.path)]
                if have is not None:
                    first = next((s for s in path if s in have), None)
                    cands = [first] if first else path
                else:
                    cands = path
            else:
                cands = sorted(self.seen | (have or set()) | {"public", self.user})
            out += [f"{s}.{bare}" for s in cands if s]
        found = tuple(dict.fromkeys(out))
        self._last = (key, found, catalog)   # agents send the same statements again
        return found
