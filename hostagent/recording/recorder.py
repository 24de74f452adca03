"""Per-session recorder: numbers events 1..n, chains their hashes, spools them."""
from __future__ import annotations

import logging
import time
import uuid

from agentgate.events import GENESIS, SESSION_END, Event, make_event, pack_payload
from hostagent.recording.spool import Spool, SpoolError

log = logging.getLogger("agentgate.recorder")


class SessionRecorder:
    """Not thread-safe: one session is driven by one task at a time.

    `record()` returns only once the event is in the spool (crash-safe; fsynced too
    in strict mode); it raises SpoolError if it can't be, so the caller can refuse
    the action it was about to forward: record before execute.
    """

    def __init__(self, spool: Spool, session_id: str | None = None, *, seq: int = 0,
                 prev_hash: bytes = GENESIS, start_mono_ns: int | None = None):
        self.spool = spool
        self.session_id = session_id or str(uuid.uuid4())
        self.seq = seq
        self.prev_hash = prev_hash
        self._start = time.monotonic_ns() if start_mono_ns is None else start_mono_ns
        self.ended = False
        # With a turn (hostagent/proxy/turn.py), events go to the spool at the end of
        # the loop's turn, before any byte that turn lets out; a failure then comes to
        # `fail`, which tells `on_failure` (the session) and refuses all that follows.
        self.turn = None
        self.on_failure = None
        self.failed: SpoolError | None = None

    @classmethod
    def resume(cls, spool: Spool, session_id: str) -> "SessionRecorder":
        """Continue a session found in the spool after a restart (its chain goes on)."""
        seq, prev, _kind = spool.tails[session_id]
        return cls(spool, session_id, seq=seq, prev_hash=prev)

    def record(self, kind: str, fields: dict | None = None) -> Event:
        return self.record_raw(kind, pack_payload(fields or {}))

    def record_raw(self, kind: str, payload: bytes) -> Event:
        return self.record_many([(kind, payload)])[-1]

    def record_many(self, items: list[tuple[str, bytes | dict]]) -> list[Event]:
        """Several events in one spool write (e.g. a statement and its decision): all
        of them are stored, or none and SpoolError."""
        if self.ended:
            raise RuntimeError(f"session {self.session_id} has ended")
        if self.failed is not None:
            raise SpoolError(str(self.failed))
        events, seq, prev = [], self.seq, self.prev_hash
        wall, mono = time.time_ns(), time.monotonic_ns() - self._start
        for kind, payload in items:
            if isinstance(payload, dict):
                payload = pack_payload(payload)
            seq += 1
            ev = make_event(self.session_id, seq, wall, mono, kind, payload, prev)
            prev = ev.hash
            events.append(ev)
        if self.turn is not None:
            self.turn.record(self, events)
        else:
            self.spool.append_many(events)
        self.seq, self.prev_hash = seq, prev
        if events[-1].kind == SESSION_END:
            self.ended = True
        return events

    def fail(self, exc: SpoolError) -> None:
        """The turn could not store this recorder's events."""
        if self.failed is None:
            self.failed = exc
            if self.on_failure is not None:
                self.on_failure(exc)
            else:
                log.error("session %s: events could not be stored: %s", self.session_id, exc)


def close_orphans(spool: Spool, reason: str = "hostagent_restart") -> list[str]:
    """End the sessions a previous run left open in the spool (it died mid-session), so
    their recordings say how they ended. Returns their ids."""
    closed = []
    for session_id, (_seq, _hash, kind) in sorted(spool.tails.items()):
        if kind != SESSION_END:
            try:
                SessionRecorder.resume(spool, session_id).record(SESSION_END, {"reason": reason})
            except SpoolError as exc:   # e.g. full: shipping must start all the same
                log.error("cannot end session %s left open: %s", session_id, exc)
                continue
            closed.append(session_id)
    return closed
