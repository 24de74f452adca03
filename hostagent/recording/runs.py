"""Run sessions: each `agentgate run` (and each enrolled cgroup) is itself recorded, with
the processes it exec'd, the connects the egress guard refused, and its exit code."""
from __future__ import annotations

import logging
import os
import pwd
import shlex
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from agentgate.events import SESSION_END, SESSION_START
from hostagent.recording.recorder import SessionRecorder
from hostagent.recording.spool import Spool, SpoolError

if TYPE_CHECKING:   # recording needs no kernel: only the shape of its events
    from hostagent.intercept.loader import KernelEvent

log = logging.getLogger("agentgate.hostagent")

# Guard events an agent can cause at will (a connect loop): at most this many a second
# per run are recorded one by one; the rest are counted, so a loop can't fill the spool.
GUARD_EVENTS = frozenset({"connect_denied", "connect_direct", "udp_denied", "bind_denied",
                          "socket_denied", "unix_denied"})
GUARD_EVENTS_PER_SECOND = 50


def new_group() -> str:
    return uuid.uuid4().hex[:12]


class RunSession:
    def __init__(self, spool: Spool, *, host: str, argv: list[str], user: str | None,
                 cgroup: Path, group: str, mode: str, requested_by: str = ""):
        self.cgroup = cgroup
        self.group = group
        self._window = 0
        self._in_window = 0
        self.suppressed = 0
        self.rec = SessionRecorder(spool)
        who = user or requested_by or pwd.getpwuid(os.getuid()).pw_name
        self.rec.record(SESSION_START, {
            "host": host, "target": argv[0] if argv else str(cgroup), "protocol": "run",
            "session_group": group, "agent": f"{who} {shlex.join(argv)}",
            "process": {"argv": argv, "user": who, "cgroup": str(cgroup), "mode": mode,
                        "requested_by": requested_by}})

    def event(self, ev: KernelEvent) -> None:
        if self.rec.ended:
            return
        if ev.kind in GUARD_EVENTS and not self._admit():
            return
        try:
            self.rec.record(ev.kind, {"pid": ev.pid, "uid": ev.uid, "comm": ev.comm,
                                      "filename": ev.filename, "address": ev.addr})
        except SpoolError as exc:
            log.error("cannot record %s event: %s", ev.kind, exc)

    def _admit(self) -> bool:
        now = int(time.monotonic())
        if now != self._window:
            if self.suppressed:
                self.rec.record("events_suppressed", {"count": self.suppressed})
                self.suppressed = 0
            self._window, self._in_window = now, 0
        self._in_window += 1
        if self._in_window > GUARD_EVENTS_PER_SECOND:
            self.suppressed += 1
            return False
        return True

    def end(self, exit_code: int | None, *, lost: int = 0, refused: int | None = None,
            reason: str = "exited", suppressed: int = 0) -> None:
        """`refused`: connections the proxy refused for this run; None when it can't tell
        whose they were (then a count is left out rather than borrowed from other runs).
        `suppressed`: refusals the kernel counted over its rate, never reported."""
        end = {"reason": reason, "exit_code": exit_code}
        if refused is not None:
            end["refused_connections"] = refused
        if self.suppressed or suppressed:
            end["events_suppressed"] = self.suppressed + suppressed
        if lost:
            log.warning("%d kernel events were lost: the recording is incomplete", lost)
            end.update(incomplete=True, lost_events=lost)
        self.rec.record(SESSION_END, end)


class Runs:
    """Run sessions by cgroup id, so kernel events find theirs."""

    def __init__(self) -> None:
        self.by_cgroup: dict[int, RunSession] = {}
        self._window = 0
        self._logged = 0

    def add(self, cgroup_id: int, run: RunSession) -> None:
        self.by_cgroup[cgroup_id] = run

    def pop(self, cgroup_id: int) -> RunSession | None:
        return self.by_cgroup.pop(cgroup_id, None)

    def on_event(self, ev: KernelEvent) -> None:
        run = self.by_cgroup.get(ev.cgroup_id)
        if run is not None:
            run.event(ev)
        elif ev.kind not in ("exec", "exit"):
            # no run to record it in (one that just ended): logged, at a bounded rate
            now = int(time.monotonic())
            if now != self._window:
                if self._logged > GUARD_EVENTS_PER_SECOND:
                    log.info("%d more events of no run not logged", self._logged
                             - GUARD_EVENTS_PER_SECOND)
                self._window, self._logged = now, 0
            self._logged += 1
            if self._logged <= GUARD_EVENTS_PER_SECOND:
                log.info("%s pid %d (%s) %s", ev.kind, ev.pid, ev.comm, ev.addr)
