"""Run sessions: each `agentgate run` (and each enrolled cgroup) is itself recorded, with
the processes it exec'd, the connects the egress guard refused, and its exit code."""
from __future__ import annotations

import logging
import os
import pwd
import shlex
import uuid
from pathlib import Path

from agentgate.events import SESSION_END, SESSION_START
from hostagent.intercept.loader import KernelEvent
from hostagent.recording.recorder import SessionRecorder
from hostagent.recording.spool import Spool, SpoolError

log = logging.getLogger("agentgate.hostagent")


def new_group() -> str:
    return uuid.uuid4().hex[:12]


class RunSession:
    def __init__(self, spool: Spool, *, host: str, argv: list[str], user: str | None,
                 cgroup: Path, group: str, mode: str, requested_by: str = ""):
        self.cgroup = cgroup
        self.group = group
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
        try:
            self.rec.record(ev.kind, {"pid": ev.pid, "uid": ev.uid, "comm": ev.comm,
                                      "filename": ev.filename, "address": ev.addr})
        except SpoolError as exc:
            log.error("cannot record %s event: %s", ev.kind, exc)

    def end(self, exit_code: int | None, *, lost: int = 0, refused: int = 0,
            reason: str = "exited") -> None:
        end = {"reason": reason, "exit_code": exit_code, "refused_connections": refused}
        if lost:
            log.warning("%d kernel events were lost: the recording is incomplete", lost)
            end.update(incomplete=True, lost_events=lost)
        self.rec.record(SESSION_END, end)


class Runs:
    """Run sessions by cgroup id, so kernel events find theirs."""

    def __init__(self) -> None:
        self.by_cgroup: dict[int, RunSession] = {}

    def add(self, cgroup_id: int, run: RunSession) -> None:
        self.by_cgroup[cgroup_id] = run

    def pop(self, cgroup_id: int) -> RunSession | None:
        return self.by_cgroup.pop(cgroup_id, None)

    def on_event(self, ev: KernelEvent) -> None:
        run = self.by_cgroup.get(ev.cgroup_id)
        if run is not None:
            run.event(ev)
        elif ev.kind not in ("exec", "exit"):
            log.info("%s pid %d (%s) %s", ev.kind, ev.pid, ev.comm, ev.addr)
