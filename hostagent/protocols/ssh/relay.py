"""A forwarded connection's two channels joined (-L/-W, -R, streamlocal): bytes both
ways, each chunk recorded before it is passed on, flow control from each side's write
buffer to the other's reading, EOF and close relayed. An allowed forward is a recorded
session of its own (the caller opens the recording and hands it here)."""
from __future__ import annotations

import asyncssh

from agentgate.events import DATA, OUTPUT, SESSION_END
from hostagent.recording.spool import SpoolError


class Joint:
    """What the two ends share: the recording, the byte counts, the end."""

    def __init__(self, recorder, on_failure, touch=lambda: None):
        self.recorder = recorder
        self.touch = touch                 # activity: the connection's idle clock
        self.on_failure = on_failure       # SpoolError: the whole SSH connection closes
        self.counts = {"bytes_in": 0, "bytes_out": 0}
        self.ends: list[End] = []
        self.done = False

    def record(self, kind: str, fields: dict) -> bool:
        try:
            self.recorder.record(kind, fields)
            return True
        except SpoolError as exc:
            self.on_failure(exc)
            return False

    def finish(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        for end in self.ends:
            if end.chan is not None:
                end.chan.close()
        if not self.recorder.ended:
            self.record(OUTPUT, dict(self.counts))
            self.record(SESSION_END, {"reason": reason, **self.counts})


class End(asyncssh.SSHTCPSession, asyncssh.SSHUNIXSession):
    """One channel of a forward. `dir` is how its incoming bytes are recorded: "in" for
    the agent's end (towards the target), "out" for the target's end."""

    def __init__(self, joint: Joint, dir: str):
        self.joint = joint
        self.dir = dir
        self.chan = None
        self.peer: End | None = None
        self.early: list[bytes] = []       # read before the other end existed (bounded:
        joint.ends.append(self)            # its reading is paused at once)

    def connection_made(self, chan) -> None:
        # (asyncssh may call this after the open it belongs to has returned, so after
        # join: whichever end comes second starts both; and it starts reading a channel
        # after this returns, whatever was paused here: see data_received)
        self.chan = chan
        if self._joined():
            self.peer.chan.resume_reading()
            self.peer._flush()
        else:
            chan.pause_reading()

    def _joined(self) -> bool:
        return self.chan is not None and self.peer is not None and self.peer.chan is not None

    def join(self, peer: "End") -> None:
        self.peer, peer.peer = peer, self
        if self._joined():
            for end in (self, peer):
                end.chan.resume_reading()
                end._flush()

    def _flush(self) -> None:
        """What came before the other end was there, in order."""
        early, self.early = self.early, []
        for item in early:
            if item is None:
                self.eof_received()
            else:
                self.data_received(item, None)

    def data_received(self, data: bytes, datatype) -> None:
        if self.joint.done:
            return
        if not self._joined():
            self.early.append(bytes(data))     # (bounded: reading paused from here)
            self.chan.pause_reading()
            return
        self.joint.touch()
        self.joint.counts["bytes_in" if self.dir == "in" else "bytes_out"] += len(data)
        if not self.joint.record(DATA, {"dir": self.dir, "data": bytes(data)}):
            return
        self.peer.chan.write(data)

    def eof_received(self) -> bool:
        if not self._joined():
            self.early.append(None)
        else:
            self.peer.chan.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.chan is not None:
            self.peer.chan.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.chan is not None:
            self.peer.chan.resume_reading()

    def connection_lost(self, exc) -> None:
        self.joint.finish(f"{'agent' if self.dir == 'in' else 'target'} closed"
                          + (f": {exc}" if exc else ""))
