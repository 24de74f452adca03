"""Record before execute, a loop turn at a time.

The records every session makes in one turn of the event loop go to the spool in one
write, and only then do the bytes those sessions let out in that turn leave: one
write(2) for the spool per turn instead of one per statement, and still no byte out
before the records that let it go are stored. A session whose records could not be
stored has none of that turn's bytes sent; it is told (its recorder's `fail`) and
ends with its protocol's error.
"""
from __future__ import annotations

import asyncio

from hostagent.recording.spool import Spool, SpoolError


class Turn:
    def __init__(self, spool: Spool):
        self.spool = spool
        self._events: list = []
        self._owners: list = []          # the recorders whose events are in _events
        self._writes: dict = {}          # leg -> [recorder, bytes...]: one write a leg
        self._scheduled = False
        self._flushing = False
        self._loop = None   # the proxy's, once it is running (asked once: it costs a getpid)

    def record(self, recorder, events: list) -> None:
        self._events += events
        self._owners.append(recorder)
        self._schedule()

    def send(self, leg, data: bytes, recorder) -> None:
        parts = self._writes.get(leg)
        if parts is None:
            self._writes[leg] = [recorder, data]
            self._schedule()
        else:
            parts.append(data)

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Store what is waiting, then send what it lets out. Also called at once where
        bytes must leave before something else happens (a TLS handshake, a close)."""
        if self._flushing:
            return           # (from a session the flush is failing: the loop below goes on)
        self._flushing = True
        try:
            while self._events or self._writes:
                events, owners, writes = self._events, self._owners, self._writes
                self._events, self._owners, self._writes = [], [], {}
                failed: set = set()
                if events:
                    try:
                        self.spool.append_many(events)
                        if self.spool.strict:
                            self.spool.wait_durable()
                    except SpoolError as exc:
                        failed = set(owners)
                        for recorder in failed:
                            recorder.fail(exc)   # may queue the session's error: next round
                for leg, parts in writes.items():
                    if parts[0] not in failed:
                        leg.write(parts[1] if len(parts) == 2 else b"".join(parts[1:]))
        finally:
            self._flushing = False
            self._scheduled = False
