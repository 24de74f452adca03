"""Layer tests as scripts: the events a layer is fed and the exact commands expected out
(after mitmproxy's test/mitmproxy/proxy/tutils.py Playbook).

    assert (Playbook(layer)
            >> DataReceived(CLIENT, query)
            << record("command", text="SELECT 1")
            << ToUpstream(query))

Expected commands are compared in order, all of them: a command that is expected but
missing, or produced but not expected, fails with both scripts shown. An expected item
may be a command (compared by ==), a command class (any instance), or a Match (a
predicate with a name, e.g. record() and sends()). Every call goes through the layer's
one entry point, `handle(event)`, as the driver's does.
"""
from __future__ import annotations

from typing import Any, Callable

from hostagent.protocols.api import (CLIENT, UPSTREAM, DataReceived, Record, ToClient,
                                     ToUpstream)


class Match:
    def __init__(self, what: str, test: Callable[[Any], bool]):
        self.what = what
        self.test = test

    def __repr__(self) -> str:
        return self.what


def record(kind: str, **fields) -> Match:
    """A Record of `kind` whose fields include these values."""
    return Match(f"record({kind!r}, {fields})",
                 lambda c: isinstance(c, Record) and c.kind == kind
                 and all(c.fields.get(k) == v for k, v in fields.items()))


def sends(cls, test: Callable[[bytes], bool], what: str = "") -> Match:
    """A ToClient/ToUpstream whose bytes pass `test`."""
    return Match(f"{cls.__name__}({what or test})",
                 lambda c: isinstance(c, cls) and test(bytes(c.data)))


class Playbook:
    def __init__(self, layer):
        self.layer = layer
        self.script: list[tuple[str, Any]] = []
        self.actual: list[Any] = []     # every command produced, for further checks

    def __rshift__(self, event) -> "Playbook":
        self.script.append(("in", event))
        return self

    def __lshift__(self, expected) -> "Playbook":
        self.script.append(("out", expected))
        return self

    def __bool__(self) -> bool:
        self.actual.clear()
        transcript: list[str] = []
        pending: list[Any] = []   # produced, not yet matched
        for step, item in self.script:
            if step == "in":
                if pending:
                    self._fail(transcript, f"unexpected command {pending[0]!r}")
                transcript.append(f">> {item!r}")
                pending = list(self.layer.handle(item))
                self.actual += pending
                continue
            if not pending:
                self._fail(transcript, f"expected {item!r}, but the layer said nothing more")
            got = pending.pop(0)
            if not _matches(item, got):
                self._fail(transcript, f"expected {item!r}\n   got {got!r}")
            transcript.append(f"<< {got!r}")
        if pending:
            self._fail(transcript, f"unexpected command {pending[0]!r}")
        return True

    @staticmethod
    def _fail(transcript: list[str], problem: str):
        raise AssertionError("playbook failed:\n" + "\n".join(transcript[-12:])
                             + f"\n!! {problem}")


def _matches(expected, got) -> bool:
    if isinstance(expected, Match):
        return expected.test(got)
    if isinstance(expected, type):
        return isinstance(got, expected)
    return expected == got


def feed(layer, side: str, data: bytes) -> list:
    """The commands for bytes from one side (for tests that look at what came out)."""
    return layer.handle(DataReceived(side, data))


def to_client(commands) -> bytes:
    return b"".join(bytes(c.data) for c in commands if isinstance(c, ToClient))


def to_upstream(commands) -> bytes:
    return b"".join(bytes(c.data) for c in commands if isinstance(c, ToUpstream))


__all__ = ["Playbook", "Match", "record", "sends", "feed", "to_client", "to_upstream",
           "CLIENT", "UPSTREAM"]
