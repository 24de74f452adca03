import json
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from agentgate.events import unpack_payload
from collector.storage import SessionFilter
from collector.storage.sqlite import SqliteStorage
from tests.support import BIN, logs

AGENT = Path(__file__).with_name("agent.py")
PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF interception needs root")


class EchoServer:
    """Answers each line with 'echo: <line>' on 127.0.0.1 and ::1 (same port)."""

    def __init__(self):
        from hostagent.proxy.net import bind_pair
        self.socks = bind_pair(0, privileged=False)
        self.port = self.socks[0].getsockname()[1]
        self.peers = []
        for s in self.socks:
            s.setblocking(True)
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, sock):
        while True:
            try:
                conn, peer = sock.accept()
            except OSError:
                return
            self.peers.append(peer)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn):
        with conn:
            data = conn.recv(4096)
            if data:
                conn.sendall(b"echo: " + data)

    def close(self):
        for s in self.socks:
            s.close()


class UnixServer:
    """A unix stream server answering "ok" (a stand-in for docker.sock, the bus...)."""

    def __init__(self, name: str, group: int | None = None):
        import socket
        import threading
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(name)
        if group is not None and not name.startswith("\0"):
            import os
            os.chown(name, 0, group)
            os.chmod(name, 0o660)      # the agent's group may use it, as docker's does
        self.sock.listen(8)
        self.accepted = 0

        def serve():
            while True:
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    return
                self.accepted += 1
                with conn:
                    conn.recv(10)
                    conn.sendall(b"ok")
        threading.Thread(target=serve, daemon=True).start()

    def close(self):
        import socket
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes the accept() of its thread
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def echo():
    e = EchoServer()
    yield e
    e.close()


class _Run(subprocess.Popen):
    """Hands the stderr that communicate() read to the test's log check (the test reads
    the pipe, so nothing else can)."""

    def communicate(self, *args, **kw):
        out, err = super().communicate(*args, **kw)
        self.on_stderr(err)
        return out, err


class Host:
    """A host agent config of the test's own (own cgroup tree, socket, state), and ways
    to run agents under it."""

    def __init__(self, tmp: Path, collector, echo: EchoServer, mode: str = "deny"):
        self.tmp = tmp
        self.collector = collector
        self.echo = echo
        self.tree = f"agentgate-test-{uuid.uuid4().hex[:8]}"
        # where other users can reach (pytest's tmp_path is root's alone)
        self.public = Path(tempfile.mkdtemp(prefix=f"{self.tree}-"))
        self.public.chmod(0o755)
        self.configs = []
        self.config = self.write("main", mode)
        self.runs = 0
        logs.watch_file(tmp / "daemon.log")     # where test_daemon's Daemon sends stderr

    def write(self, name: str, mode: str = "deny", extra: str = "") -> Path:
        cfg = self.tmp / f"{name}.toml"
        cfg.write_text(f'''
host = "test-host"
state_dir = "{self.tmp}/state-{name}"
[collector]
address = "{self.collector.address}"
[intercept]
mode = "{mode}"
tree = "{self.tree}"
socket = "{self.public}/hostagent.sock"
proxy_port = 0
dns = ["127.0.0.1:53535"]
[[targets]]
name = "echo"
protocol = "tcp"
address = ["127.0.0.1:{self.echo.port}", "[::1]:{self.echo.port}"]
{extra}''')
        self.configs.append(cfg)
        return cfg

    def run(self, *agent_cmd: str, user: str | None = None, config: Path | None = None,
            mode: str | None = None, timeout: float = 60):
        args = [str(BIN / "agentgate"), "run", "--config", str(config or self.config)]
        if user:
            args += ["--user", user]
        if mode:
            args += ["--mode", mode]
        p = subprocess.run(args + ["--", PYTHON, str(AGENT), " ".join(agent_cmd)],
                           capture_output=True, text=True, timeout=timeout)
        self._watch_run(p.stderr)
        return p.returncode, [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")], p.stderr

    def popen(self, *agent_cmd: str, user: str | None = None, config: Path | None = None):
        args = [str(BIN / "agentgate"), "run", "--config", str(config or self.config)]
        if user:
            args += ["--user", user]
        p = _Run(args + ["--", PYTHON, str(AGENT), " ".join(agent_cmd)],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        p.on_stderr = self._watch_run
        return p

    def _watch_run(self, stderr: str | None) -> None:
        """The in-process stack of `agentgate run` logs to its stderr."""
        self.runs += 1
        logs.watch(f"{self.tmp} agentgate run #{self.runs} stderr", lambda: stderr or "")

    def sessions(self, protocol: str | None = None) -> list[dict]:
        store = SqliteStorage(self.collector.database)
        try:
            out = []
            for s in store.list_sessions(SessionFilter(protocol=protocol or "", limit=1000)):
                events = store.events(s.id)
                out.append({"id": s.id, "protocol": s.protocol, "target": s.target,
                            "end_reason": s.end_reason, "start": unpack_payload(s.start_payload),
                            "events": [(e.kind, e.fields()) for e in events]})
            return out
        finally:
            store.close()

    def public_copy(self, cfg: Path) -> Path:
        dst = self.public / cfg.name
        dst.write_text(cfg.read_text())
        dst.chmod(0o644)
        return dst

    def cleanup(self):
        for cfg in self.configs[:1]:
            subprocess.run([str(BIN / "agentgate-hostagent"), "cleanup", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=60)
        shutil.rmtree(self.public, ignore_errors=True)


@pytest.fixture
def host(tmp_path, collector, echo):
    h = Host(tmp_path, collector, echo)
    yield h
    h.cleanup()
