"""Test helpers: real collector processes on port 0, the real CLI, waiting on conditions."""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from agentgate.client import CollectorAddress
from agentgate.events import SESSION_END, SESSION_START

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def wait_for(cond: Callable[[], object], timeout: float = 20.0, interval: float = 0.02,
             what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# What the processes a test starts must not log unless the test says it expects it: a
# traceback, an exception asyncio dropped, an ERROR or CRITICAL record (the basicConfig
# formats: "agentgate-collector: ERROR ...", "agentgate-hostagent: ERROR ..."; gRPC's C
# core writes its own, "E1202 04:25:35.017845  27344 file.cc:12] ...").
LOG_PROBLEM = re.compile(r"Traceback \(most recent call last\)|Task exception was never retrieved"
                         r"|Exception in callback|^agentgate[\w-]*: (ERROR|CRITICAL) "
                         r"|^[EF]\d{4} \d\d:\d\d:\d\d", re.M)
LOG_RECORD = re.compile(r"^(agentgate[\w -]*: |[DIWEF]\d{4} \d\d:\d\d:\d\d)", re.M)


def log_records(text: str) -> list[str]:
    """Split a log into records; a traceback belongs to the record it follows (logging
    writes it right after the message)."""
    starts = [m.start() for m in LOG_RECORD.finditer(text)]
    if starts[:1] != [0]:
        starts.insert(0, 0)
    parts = (text[a:b].rstrip() for a, b in zip(starts, starts[1:] + [len(text)]))
    return [r for r in parts if r]


class Logs:
    """The logs of the processes the current test started (see _check_logs in conftest)."""

    def __init__(self):
        self.sources: dict[str, Callable[[], str]] = {}

    def watch(self, name: str, read: Callable[[], str]) -> None:
        self.sources[name] = read

    def watch_file(self, path: Path) -> None:
        self.watch(str(path), lambda: path.read_text(errors="replace") if path.exists() else "")

    def problems(self, allowed: list[str]) -> list[str]:
        """Records with a problem that no `allowed` regex finds (re.search on the whole
        record, its traceback included)."""
        return [f"{name}:\n{rec}" for name, read in self.sources.items()
                for rec in log_records(read())
                if LOG_PROBLEM.search(rec) and not any(re.search(a, rec, re.M) for a in allowed)]


logs = Logs()


@dataclass
class CollectorProc:
    tmp: Path
    config: Path | None = None
    listen: str = "127.0.0.1:0"
    database: Path = None
    proc: subprocess.Popen | None = None
    addresses: list[str] = field(default_factory=list)
    log: Path = None

    @property
    def address(self) -> str:
        return self.addresses[0]

    def start(self, listen: str | None = None) -> "CollectorProc":
        ready = self.tmp / "collector.ready"
        ready.unlink(missing_ok=True)
        self.log = self.tmp / "collector.log"
        logs.watch_file(self.log)
        args = [str(BIN / "agentgate-collector"), "--listen", listen or self.listen,
                "--database", str(self.database), "--ready-file", str(ready)]
        if self.config:
            args += ["--config", str(self.config)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"), cwd=self.tmp)
        wait_for(lambda: ready.exists() or self.proc.poll() is not None, what="collector ready")
        if self.proc.poll() is not None:
            raise AssertionError(f"collector exited: {self.log.read_text()}")
        self.addresses = ready.read_text().split()
        return self

    def restart(self) -> "CollectorProc":
        """Start again on the same address(es)."""
        return self.start(listen=self.address)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.database, timeout=30)

    def event_rows(self):
        with self.db() as c:
            return c.execute("SELECT s.id, e.seq, e.kind FROM events e JOIN sessions s "
                             "ON s.pk = e.session_pk ORDER BY s.id, e.seq").fetchall()

    def addr(self, **kw) -> CollectorAddress:
        return CollectorAddress(target=self.address, **kw)


def run_cli(*args: str, collector: CollectorProc | str | None = None, token: str | None = None,
            timeout: float = 60, env: dict | None = None, input: str | None = None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTGATE_")}
    if collector is not None:
        full_env["AGENTGATE_COLLECTOR"] = collector if isinstance(collector, str) else collector.address
    if token:
        full_env["AGENTGATE_TOKEN"] = token
    full_env.update(env or {})
    return subprocess.run([str(BIN / "agentgate"), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, input=input)


def pending_approvals(collector) -> list[dict]:
    """The collector's pending approval requests, as `agentgate approvals list` gives them
    ([] while it can't be asked)."""
    import json
    r = run_cli("approvals", "list", "--pending", "--json", collector=collector)
    return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else []


def record_sessions(spool_dir: Path, address: CollectorAddress, sessions: list[list[tuple]],
                    timeout: float = 30.0, **spool_kw) -> list[str]:
    """Record sessions (lists of (kind, fields)) through a real spool + shipper, and wait
    until the collector has acked all of it. Returns the session ids."""
    from hostagent.recording.recorder import SessionRecorder
    from hostagent.recording.shipper import Shipper
    from hostagent.recording.spool import Spool

    spool = Spool(spool_dir, **spool_kw)
    ids = []

    async def go():
        shipper = Shipper(spool, address, backoff_max=0.5)
        task = asyncio.create_task(shipper.run())
        for events in sessions:
            rec = SessionRecorder(spool)
            ids.append(rec.session_id)
            for kind, fields in events:
                rec.record(kind, fields)
        ok = await shipper.drain(timeout)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert ok, f"collector did not ack everything: {shipper.last_error}"

    try:
        asyncio.run(go())
    finally:
        spool.close()
    return ids


def pg_session(n_commands: int = 3, target: str = "orders-db", user: str = "alice",
               host: str = "build-1") -> list[tuple]:
    evs = [(SESSION_START, {"host": host, "target": target, "protocol": "postgres",
                            "process": {"pid": 4242, "user": user, "uid": 1000,
                                        "exe": "/usr/bin/psql", "argv": ["psql", "-c", "..."]}})]
    for i in range(n_commands):
        evs.append(("command", {"text": f"SELECT {i} FROM orders", "database": "shop"}))
        evs.append(("decision", {"action": "allow", "rule": "", "reason": ""}))
        evs.append(("output", {"summary": "SELECT 1", "rows_returned": 1, "duration_us": 420,
                               "columns": ["id", "email"], "sample": [[str(i), "****"]],
                               "masked": {"pii:column": 1}}))
    evs.append(("data", {"dir": "out", "data": b"hello from the terminal\r\n"}))
    evs.append((SESSION_END, {"reason": "client closed", "bytes_in": 120, "bytes_out": 640}))
    return evs


@contextlib.contextmanager
def raw_echo():
    """A TCP server on 127.0.0.1 sending back every byte it gets, until EOF; its port."""
    ls = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return

            def one(c=c):
                with c:
                    while d := c.recv(65536):
                        c.sendall(d)
            threading.Thread(target=one, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield ls.getsockname()[1]
    finally:
        ls.close()
