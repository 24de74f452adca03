"""Judging commands, written once for every protocol layer (sans-IO, like the layers).

A layer parses a client message into one or more commands (statements of a Query, a
request, an exec), hands them here as policy Requests with the fields to record, and
gets back the strictest decision plus the Records that must be spooled before the
message goes on: one `command` event a command, its decision inside it, and a
`decision` event for each verdict that is no command's own (masking's refusals). Holds are kept in order: while one is open, the
layer defers what the client sends next, and gets it back once the hold is decided.
Audit mode and the `unparseable` decision live in the pure policy function.
The protocol supplies only what is its own: how to parse, to refuse, to say "held".
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from agentgate.events import COMMAND, DECISION
from hostagent.policy import Decision, Request
from hostagent.protocols.api import Hold, Record

_RANK = {"allow": 0, "review": 1, "deny": 2}


def strictest(decisions: Iterable[Decision]) -> Decision | None:
    """Deny over review over allow; among equals, the first (it names the rule)."""
    best = None
    for d in decisions:
        if best is None or _RANK[d.action] > _RANK[best.action]:
            best = d
    return best


class Enforcer:
    def __init__(self, decide: Callable[[Request], Decision]):
        self.decide = decide
        self._key = 0
        self._held: dict[int, tuple[Any, Decision]] = {}
        self._deferred: list = []
        self.deferred_bytes = 0   # what the deferred input holds (the memory budget)

    def judge(self, commands: Iterable[tuple[Request, dict]],
              extra: Iterable[Decision] = ()) -> tuple[Decision, list[Record]]:
        """Each command's record, with its decision, in order; `extra` decisions (e.g.
        masking refusing a COPY) take part in the verdict and are recorded too."""
        records: list[Record] = []
        decisions: list[Decision] = []
        for req, fields in commands:
            d = self.decide(req)
            records.append(Record(COMMAND, {**fields, "decision": d.as_dict()}))
            decisions.append(d)
        for d in extra:
            records.append(Record(DECISION, d.as_dict()))
            decisions.append(d)
        verdict = strictest(decisions) or Decision("allow", "(none)", "nothing to judge")
        return verdict, records

    # ------------------------------------------------------------ holds, in order

    def hold(self, pending: Any, decision: Decision, command: str) -> Hold:
        """Keep `pending` (what the layer will send or refuse) until the driver brings
        ApprovalDecided for the returned Hold's key."""
        self._key += 1
        self._held[self._key] = (pending, decision)
        return Hold(self._key, command, decision.rule, decision.reason)

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def held(self, key: int) -> Decision | None:
        entry = self._held.get(key)
        return entry[1] if entry else None

    def release(self, key: int) -> tuple[Any, Decision] | None:
        """What was held under `key` (None for a key not ours: ignored)."""
        return self._held.pop(key, None)

    def defer(self, item: Any, size: int) -> None:
        """Client input that arrived behind an open hold: nothing overtakes it."""
        self._deferred.append(item)
        self.deferred_bytes += size

    def take_deferred(self) -> list:
        items, self._deferred, self.deferred_bytes = self._deferred, [], 0
        return items
