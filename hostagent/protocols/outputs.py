"""What each statement returned, for the recording: rows, the command tag, errors, and a
bounded sample of the rows as the client got them (masked), for replay.

Statements are followed in the order the server answers them: a Query's statements, or
the Executes up to a Sync, form a group that one ReadyForQuery ends; an error ends the
statement it hit and the server skips the rest of its group. Each statement sent gets
an id; the driver times it from its send to the answer carrying the same id.
"""
from __future__ import annotations

from collections import deque

from hostagent.recording.samples import SampleLimits

# Command tags whose count is rows changed, not rows returned
CHANGING = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "COPY"})
MAX_VALUE_CHARS = 256


class _Group:
    __slots__ = ("ids", "closed")

    def __init__(self):
        self.ids: deque[int] = deque()
        self.closed = False


class Outputs:
    def __init__(self, limits: SampleLimits | None = None):
        self.limits = limits or SampleLimits()
        self.session_left = self.limits.session_bytes
        self._groups: deque[_Group] = deque()
        self._next = 0
        self._reset()

    def _reset(self) -> None:
        self.rows = 0
        self._sample: list[list] = []
        self._sample_bytes = 0
        self._truncated = False
        self._columns: list[str] | None = None
        self._formats: list[int] = []

    # ------------------------------------------------------------ what the client sent

    def _open(self) -> _Group:
        if not self._groups or self._groups[-1].closed:
            self._groups.append(_Group())
        return self._groups[-1]

    def _ids(self, n: int) -> tuple[int, ...]:
        ids = tuple(range(self._next + 1, self._next + 1 + n))
        self._next += n
        return ids

    def sent_query(self, statements: int) -> tuple[int, ...]:
        group = self._open()
        ids = self._ids(max(statements, 1))
        group.ids.extend(ids)
        group.closed = True
        return ids

    def sent_execute(self) -> tuple[int, ...]:
        ids = self._ids(1)
        self._open().ids.extend(ids)
        return ids

    def sent_sync(self) -> None:
        self._open().closed = True

    # ------------------------------------------------------------ what the server answered

    def columns(self, names: list[str], formats: list[int]) -> None:
        self._columns, self._formats = names, formats

    def wants_sample(self) -> bool:
        return (len(self._sample) < self.limits.rows and not self._truncated
                and self.session_left > 0)

    def row(self, values: list[bytes | None] | None) -> None:
        """A row as sent to the client; values only when wants_sample() said so."""
        self.rows += 1
        if values is None:
            return
        formats = self._formats if len(self._formats) == len(values) else [0] * len(values)
        rendered = [None if v is None else
                    (v[:MAX_VALUE_CHARS].decode(errors="replace") if f == 0
                     else f"<binary {len(v)} bytes>")
                    for v, f in zip(values, formats)]
        size = sum(len(v) for v in rendered if v is not None) + 2 * len(rendered)
        if self._sample_bytes + size > self.limits.bytes or size > self.session_left:
            self._truncated = True
            return
        self._sample.append(rendered)
        self._sample_bytes += size
        self.session_left -= size

    def _front(self) -> int | None:
        if self._groups and self._groups[0].ids:
            return self._groups[0].ids.popleft()
        return None

    def _fields(self) -> dict:
        out: dict = {"rows_returned": self.rows}
        if self._columns is not None:
            out["columns"] = self._columns
            if self.session_left <= 0 and not self._sample and self.rows:
                out["sample_capped"] = True   # the session's sample budget is spent
            else:
                out["sample"] = self._sample
                if self._truncated or len(self._sample) < self.rows:
                    out["sample_truncated"] = True
        self._reset()
        return out

    def complete(self, tag: str) -> tuple[int | None, dict]:
        fields = {"summary": tag, **self._fields()}
        verb, _, rest = tag.partition(" ")
        count = rest.rsplit(" ", 1)[-1]
        if verb in CHANGING and count.isdigit():
            fields["rows_affected"] = int(count)
        return self._front(), fields

    def empty(self) -> tuple[int | None, dict]:
        return self._front(), {"summary": "(empty query)", **self._fields()}

    def suspended(self) -> tuple[int | None, dict]:
        return self._front(), {"summary": "(portal suspended)", **self._fields()}

    def error(self, sqlstate: str, message: str) -> tuple[int | None, dict]:
        """The statement in front failed: the server skips the rest of its group."""
        sid = self._front()
        if self._groups:
            self._groups[0].ids.clear()
        return sid, {"error": message, "sqlstate": sqlstate, **self._fields()}

    def ready(self) -> None:
        if self._groups and self._groups[0].closed:
            self._groups.popleft()
        self._reset()
