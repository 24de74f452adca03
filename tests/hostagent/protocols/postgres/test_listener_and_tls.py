"""Client-side TLS terminated by the proxy (a certificate from the host agent's local CA
naming the host the client dialed), and the plain per-target listener that works
without eBPF: psql, psycopg, asyncpg and pgbench through it, attributed from /proc,
serving only whom the target's listen_allow names (root alone by default); cancel keys
good only within their own target, and from their session's user."""
import grp
import os
import socket
import struct
import subprocess
import threading
import time
import uuid

import pytest

from hostagent.intercept import cgroups
from tests.hostagent.protocols.postgres.test_proxy import make_host as proxy_host
from tests.hostagent.protocols.postgres.test_proxy import cancel_script, orders_exists, pg  # noqa: F401
from tests.support import BIN, logs, run_cli, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (eBPF, runuser)")
VENV_PY = str(BIN / "python")
PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"
PSQL = "/usr/lib/postgresql/15/bin/psql"   # not the wrapper: perl refuses to run setgid


def make_host(tmp_path, collector, pg, extra: str = ""):  # noqa: F811
    return proxy_host(tmp_path, collector, pg, host="localhost", extra=extra)


@pytest.fixture
def tlshost(tmp_path, collector, pg):  # noqa: F811
    h, echo = make_host(tmp_path, collector, pg)
    # the admin hands the CA's certificate to the agent (here: a file it can read)
    out = subprocess.run([str(BIN / "agentgate-hostagent"), "ca-cert", "--config", str(h.config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("-----BEGIN CERTIFICATE-----")
    h.ca = h.public / "agentgate-ca.pem"
    h.ca.write_text(out.stdout)
    h.ca.chmod(0o644)
    yield h
    h.cleanup()
    echo.close()


def psql_conninfo(h, pg, conninfo: str, *sql: str):  # noqa: F811
    args = [str(BIN / "agentgate"), "run", "--config", str(h.config), "--user", "nobody", "--",
            "psql", "-X", "-A", "-t", conninfo]
    for s in sql:
        args += ["-c", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "PGCONNECT_TIMEOUT": "10"})


def test_verify_full_works_when_the_client_trusts_the_agentgate_ca(tlshost, pg):  # noqa: F811
    conn = (f"host=localhost hostaddr=127.0.0.1 port={pg.port} user=x dbname=shop "
            f"sslmode=verify-full sslrootcert={tlshost.ca}")
    p = psql_conninfo(tlshost, pg, conn, "\\conninfo", "SELECT count(*) FROM orders",
                      "DROP TABLE orders")
    assert "SSL connection (protocol: TLSv1." in p.stdout, p.stdout + p.stderr
    assert p.stdout.strip().splitlines()[-1] == "2"
    assert 'denied by rule "no-ddl"' in p.stderr          # inspected all the same
    assert orders_exists(pg)
    (s,) = tlshost.sessions("postgres")
    startup = next(f for k, f in s["events"] if k == "startup")
    assert startup["client_tls"] is True
    tls = next(f for k, f in s["events"] if k == "tls")
    assert tls["side"] == "client" and tls["version"].startswith("TLSv1.")


def test_verify_full_refuses_a_name_the_target_does_not_have(tlshost, pg):  # noqa: F811
    conn = (f"host=elsewhere.example hostaddr=127.0.0.1 port={pg.port} user=x dbname=shop "
            f"sslmode=verify-full sslrootcert={tlshost.ca}")
    p = psql_conninfo(tlshost, pg, conn, "SELECT 1")
    assert p.returncode != 0
    assert "does not match host name" in p.stderr, p.stderr


def test_a_client_requiring_tls_is_refused_when_the_target_declines_it(tmp_path, collector, pg):  # noqa: F811
    h, echo = make_host(tmp_path, collector, pg, extra='client_tls = "decline"')
    try:
        p = psql_conninfo(h, pg, f"host=127.0.0.1 port={pg.port} user=x dbname=shop "
                          "sslmode=require", "SELECT 1")
        assert p.returncode != 0
        assert "server does not support SSL" in p.stderr, p.stderr
        plain = psql_conninfo(h, pg, f"host=127.0.0.1 port={pg.port} user=x dbname=shop "
                              "sslmode=prefer", "SELECT 1")
        assert plain.returncode == 0 and plain.stdout.strip() == "1", plain.stderr
    finally:
        h.cleanup()
        echo.close()


class Daemon:
    """agentgate-hostagent without interception: the plain listeners only."""

    def __init__(self, cfg, listeners: int = 1):
        self.lines: list[str] = []
        self.proc = subprocess.Popen([str(BIN / "agentgate-hostagent"), "serve", "--config",
                                      str(cfg)], stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        logs.watch("agentgate-hostagent (listeners)", lambda: "".join(self.lines))

        def up():
            found = [ln for ln in list(self.lines) if "plain listener on" in ln]
            return found if len(found) >= listeners else self.proc.poll() is not None
        found = wait_for(up, timeout=60, what="the plain listeners")
        assert isinstance(found, list), "".join(self.lines)
        # "... target NAME: plain listener on HOST:PORT"
        self.ports = {ln.split("target ", 1)[1].split(":", 1)[0]: int(ln.rsplit(":", 1)[1])
                      for ln in found}
        self.port = int(found[0].rsplit(":", 1)[1])

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture
def listener(tmp_path, collector, pg):  # noqa: F811
    h, echo = listening_host(tmp_path, collector, pg, extra='listen_allow = ["user:nobody"]')
    d = Daemon(h.config)
    yield h, d
    d.stop()
    h.cleanup()
    echo.close()


def as_nobody(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "nobody", "--", *args], capture_output=True,
                          text=True, timeout=timeout, env={"PATH": os.environ["PATH"]})


def test_plain_listener_serves_psql_psycopg_asyncpg_and_pgbench(listener, pg):  # noqa: F811
    h, d = listener
    p = as_nobody("psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(d.port), "-U", "x",
                  "-d", "shop", "-c", "SELECT current_user, count(*) FROM orders",
                  "-c", "/* c */ DrOp TABLE orders")
    assert p.stdout.strip() == "app|2", p.stderr
    assert 'denied by rule "no-ddl"' in p.stderr
    script = h.public / "clients.py"
    script.write_text(f'''
import asyncio, asyncpg, psycopg
with psycopg.connect(host="127.0.0.1", port={d.port}, dbname="shop", user="x") as conn:
    print(conn.execute("SELECT item FROM orders WHERE id = %s", (2,), prepare=True).fetchone()[0])
async def main():
    conn = await asyncpg.connect(host="127.0.0.1", port={d.port}, database="shop", user="x",
                                 ssl=False)
    print(await conn.fetchval("SELECT item FROM orders WHERE id = $1", 1))
    await conn.close()
asyncio.run(main())
''')
    script.chmod(0o644)
    p = as_nobody(VENV_PY, str(script))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["pen", "book"]
    pg.sql("CREATE DATABASE bench_listener OWNER app")
    init = subprocess.run(["runuser", "-u", "postgres", "--", PGBENCH, "-i", "-q", "-s", "1",
                           "-h", str(pg.dir), "-p", str(pg.port), "-U", "postgres",
                           "bench_listener"], capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    pg.sql("GRANT SELECT ON ALL TABLES IN SCHEMA public TO app", db="bench_listener")
    p = as_nobody(PGBENCH, "-S", "-n", "-t", "100", "-M", "prepared", "-h", "127.0.0.1",
                  "-p", str(d.port), "-U", "x", "bench_listener")
    assert "number of transactions actually processed: 100/100" in p.stdout, p.stderr
    assert orders_exists(pg)
    sessions = wait_for(lambda: [s for s in h.sessions("postgres")
                                 if s["end_reason"]] if len(h.sessions("postgres")) >= 4 and
                        all(s["end_reason"] for s in h.sessions("postgres")) else None,
                        timeout=60, what="the four sessions in the collector")
    for s in sessions:
        assert s["start"]["via"] == "listener"
        proc = s["start"]["process"]
        assert proc["user"] == "nobody" and proc["attested"] == "proc"   # not the kernel's
    exes = {s["start"]["process"].get("exe", "") for s in sessions}
    assert any(e.endswith("psql") for e in exes) and any(e.endswith("pgbench") for e in exes)


def test_plain_listener_terminates_tls_with_verify_full(listener, pg):  # noqa: F811
    h, d = listener
    out = subprocess.run([str(BIN / "agentgate-hostagent"), "ca-cert", "--path", "--config",
                          str(h.config)], capture_output=True, text=True, timeout=60)
    ca = h.public / "ca.pem"
    ca.write_text(open(out.stdout.strip()).read())
    ca.chmod(0o644)
    p = as_nobody("psql", "-X", "-A", "-t",
                  f"host=127.0.0.1 port={d.port} user=x dbname=shop sslmode=verify-full "
                  f"sslrootcert={ca}", "-c", "\\conninfo", "-c", "SELECT count(*) FROM orders")
    assert p.returncode == 0, p.stderr
    assert "SSL connection" in p.stdout and p.stdout.strip().endswith("2")


def test_a_listener_must_be_on_loopback(tmp_path, collector, pg):  # noqa: F811
    h, echo = make_host(tmp_path, collector, pg, extra='listen = "0.0.0.0:0"')
    h.config.write_text(h.config.read_text().replace("[intercept]",
                                                     "[intercept]\nenabled = false", 1))
    try:
        p = subprocess.run([str(BIN / "agentgate-hostagent"), "serve", "--config",
                            str(h.config)], capture_output=True, text=True, timeout=60)
        assert p.returncode == 1
        assert "'listen' must be a loopback address" in p.stderr
        assert "Traceback" not in p.stderr
    finally:
        h.cleanup()
        echo.close()


# ---------------------------------------------------------------- whom a listener serves

def listening_host(tmp_path, collector, pg, extra: str = "", second: str = ""):  # noqa: F811
    """Listeners alone (no eBPF) for the orders-db target; `second`: the name of another
    target configured as orders-db is (same server, same credentials), with its own."""
    h, echo = make_host(tmp_path, collector, pg, extra='listen = "127.0.0.1:0"\n' + extra)
    text = h.config.read_text().replace("[intercept]", "[intercept]\nenabled = false", 1)
    head, _, target = text.partition('[[targets]]\nname = "orders-db"\n')
    if not any(ln.startswith("tls =") for ln in target.splitlines()):
        target = 'tls = "disable"\n' + target      # the test server offers no TLS
    target = '[[targets]]\nname = "orders-db"\n' + target
    if second:
        target += "\n" + target.replace('name = "orders-db"', f'name = "{second}"')
    h.config.write_text(head + target)
    return h, echo


def psql_as(prefix: list[str], port: int) -> subprocess.CompletedProcess:
    """psql through the listener, run under `prefix` (runuser, setpriv, sh -c ...)."""
    return subprocess.run([*prefix, PSQL, "-X", "-A", "-t", "-h", "127.0.0.1", "-p",
                           str(port), "-U", "x", "-d", "shop", "-c", "SELECT current_user"],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "PGCONNECT_TIMEOUT": "10"})


def ended(h, n: int) -> list[dict]:
    return wait_for(lambda: (lambda ss: ss if len(ss) >= n and all(s["end_reason"] for s in ss)
                             else None)(h.sessions("postgres")),
                    timeout=60, what=f"{n} ended sessions in the collector")


def test_a_plain_listener_serves_root_alone_by_default_and_records_whom_it_refuses(
        tmp_path, collector, pg):  # noqa: F811
    h, echo = listening_host(tmp_path, collector, pg)
    d = Daemon(h.config)
    try:
        p = psql_as([], d.port)
        assert p.returncode == 0 and p.stdout.strip() == "app", p.stderr
        p = psql_as(["runuser", "-u", "nobody", "--"], d.port)
        assert p.returncode != 0 and "app" not in p.stdout
        assert "server closed the connection unexpectedly" in p.stderr, p.stderr
        sessions = ended(h, 2)
    finally:
        d.stop()
        h.cleanup()
        echo.close()
    (root,) = [s for s in sessions if not s["end_reason"].startswith("refused")]
    (nobody,) = [s for s in sessions if s["end_reason"].startswith("refused")]
    assert root["start"]["process"]["allowed_by"] == "uid:0"
    assert "startup" in [k for k, _ in root["events"]]
    # refused before a byte went upstream: a session that starts and ends, nothing else
    assert [k for k, _ in nobody["events"]] == ["session_start", "session_end"]
    assert nobody["target"] == "orders-db" and nobody["start"]["via"] == "listener"
    proc = nobody["start"]["process"]
    assert proc["user"] == "nobody" and proc["exe"].endswith("psql")
    assert nobody["end_reason"].startswith("refused: at the orders-db listener: user nobody "
                                           f"(uid 65534, pid {proc['pid']}, ")
    assert nobody["end_reason"].endswith(") is not in listen_allow (uid:0)")
    assert any("WARNING refused a connection" in ln and "nobody" in ln for ln in d.lines)
    listed = run_cli("sessions", "list", collector=collector)
    assert "refused: at the orders-db listener: user nobody" in listed.stdout, listed.stdout


def _other_group() -> grp.struct_group:
    """A group of this host that nobody isn't in."""
    for name in ("voice", "fax", "tape", "floppy", "audio", "users"):
        try:
            g = grp.getgrnam(name)
        except KeyError:
            continue
        if "nobody" not in g.gr_mem and g.gr_gid != 65534:
            return g
    pytest.skip("no spare group on this host")


def test_listen_allow_admits_by_user_uid_group_and_unit_and_no_one_else(
        tmp_path, collector, pg):  # noqa: F811
    """Real clients under each kind of entry; systemd isn't here, so the units are cgroups
    made as systemd makes them (/X.slice/U.service), and a user manager's namesake
    (/X.slice/user@65534.service/app.slice/U.service) that must not pass for it."""
    g = _other_group()
    tag = uuid.uuid4().hex[:8]
    unit = f"agentgate-test-{tag}.service"
    slice_ = cgroups.make_cgroup(cgroups.cgroup2_mount(), f"agentgate-test-{tag}.slice")
    system = cgroups.make_cgroup(slice_, unit)
    manager = cgroups.make_cgroup(slice_, "user@65534.service")
    namesake = cgroups.make_cgroup(cgroups.make_cgroup(manager, "app.slice"), unit)
    h, echo = listening_host(tmp_path, collector, pg, extra=(
        f'listen_allow = ["user:daemon", "uid:2", "group:{g.gr_name}", "unit:{unit}"]'))
    d = Daemon(h.config)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]

    def in_cgroup(cg, prefix):
        return ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh", *prefix]
    admitted = {
        "user:daemon": ["runuser", "-u", "daemon", "--"],
        "uid:2": ["setpriv", "--reuid=2", "--regid=2", "--clear-groups", "--"],
        f"group:{g.gr_name}": ["setpriv", "--reuid=65534", "--regid=65534",
                               f"--groups={g.gr_gid}", "--"],
        f"unit:{unit}": in_cgroup(system, nobody),
    }
    refused = {
        "nobody": nobody,
        "root (a given list replaces the default)": [],
        "nobody with the group as its effective gid only": [
            "setpriv", "--reuid=65534", "--rgid=65534", f"--egid={g.gr_gid}",
            "--clear-groups", "--"],
        "nobody in a user manager's unit of the same name": in_cgroup(namesake, nobody),
    }
    try:
        for entry, prefix in admitted.items():
            p = psql_as(prefix, d.port)
            assert p.returncode == 0 and p.stdout.strip() == "app", (entry, p.stderr)
        for who, prefix in refused.items():
            p = psql_as(prefix, d.port)
            assert p.returncode != 0 and "app" not in p.stdout, who
            assert "server closed the connection unexpectedly" in p.stderr, (who, p.stderr)
        sessions = ended(h, len(admitted) + len(refused))
    finally:
        d.stop()
        h.cleanup()
        echo.close()
        for cg in (namesake, namesake.parent, manager, system, slice_):
            cgroups.remove(cg)
    by = sorted(s["start"]["process"].get("allowed_by", "") for s in sessions
                if not s["end_reason"].startswith("refused"))
    assert by == sorted(admitted)
    reasons = [s["end_reason"] for s in sessions if s["end_reason"].startswith("refused")]
    assert len(reasons) == len(refused)
    assert all(r.endswith(f"is not in listen_allow (user:daemon, uid:2, group:{g.gr_name}, "
                          f"unit:{unit})") for r in reasons), reasons
    assert sum("user root (uid 0" in r for r in reasons) == 1
    assert any(f"cgroup /agentgate-test-{tag}.slice/user@65534.service/app.slice/{unit}" in r
               for r in reasons)
    assert any(", gids 65534, " in r and "/psql" in r for r in reasons)   # egid: not counted


def test_an_unknown_user_in_listen_allow_stops_the_daemon_in_one_line(
        tmp_path, collector, pg):  # noqa: F811
    h, echo = listening_host(tmp_path, collector, pg,
                             extra='listen_allow = ["uid:0", "user:no-such-user-x"]')
    try:
        p = subprocess.run([str(BIN / "agentgate-hostagent"), "serve", "--config",
                            str(h.config)], capture_output=True, text=True, timeout=60)
        assert p.returncode == 1
        assert ("target orders-db: listen_allow entry 'user:no-such-user-x': no such user on "
                "this host") in p.stderr
        assert "Traceback" not in p.stderr
    finally:
        h.cleanup()
        echo.close()


# ---------------------------------------------------------------- cancel keys

CANCEL_REQUEST = 80877102


def test_cancel_keys_in_the_layer_per_target_per_user_and_only_while_their_session_lives():
    """Through the protocol harness: the driver gives each target its own key table."""
    import gc
    from hostagent.protocols import Close, Record
    from hostagent.protocols.postgres import messages as m
    from hostagent.protocols.postgres.layer import new_cancel_key
    from tests.hostagent.protocols.playbook import CLIENT, feed, to_upstream
    from tests.hostagent.protocols.postgres.test_layer import new_layer, ready_layer

    def cancel(keys, uid, key):
        out = feed(new_layer(cancel_keys=keys, identity={"uid": uid}), CLIENT,
                   m.cancel_request(*key))
        (rec,) = [c.fields for c in out if isinstance(c, Record)]
        (close,) = [c.reason for c in out if isinstance(c, Close)]
        return rec, close, to_upstream(out)

    target_a, target_b = {}, {}
    owner = ready_layer(cancel_keys=target_a, identity={"uid": 1000})
    ((fake, real),) = target_a.items()
    assert real == (1, 2) and fake != real
    assert cancel(target_b, 1000, fake) == (
        {"matched": False}, "cancel with a key no live session of this target holds", b"")
    assert cancel(target_a, 1001, fake) == (
        {"matched": True, "forwarded": False},
        "cancel refused: the key is uid 1000's session's, sent by uid 1001", b"")
    assert cancel(target_a, 1000, fake) == (
        {"matched": True}, "cancel request forwarded", m.cancel_request(1, 2))
    owner.close()                                    # the session ended
    assert target_a == {}
    assert cancel(target_a, 1000, fake)[0] == {"matched": False}
    lost = ready_layer(cancel_keys=target_a, identity={"uid": 1000})
    ((fake, _),) = target_a.items()
    del lost                                         # ended without a word to the layer
    gc.collect()
    assert cancel(target_a, 1000, fake)[0] == {"matched": False} and target_a == {}
    # stand-ins: random, 62 bits (a positive pid, a secret over all 32 bits), never reused
    keys: dict = {}
    for _ in range(4000):
        keys[new_cancel_key(keys)] = (1, 2)
    assert len(keys) == 4000
    assert all(0 < pid < 1 << 31 for pid, _ in keys)
    secrets_ = [secret for _, secret in keys]
    assert min(secrets_) < -(1 << 30) and max(secrets_) > 1 << 30


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def _message(s: socket.socket) -> tuple[bytes, bytes]:
    head = _recv_exact(s, 5)
    return head[:1], _recv_exact(s, struct.unpack("!i", head[1:])[0] - 4)


def raw_session(port: int) -> tuple[socket.socket, tuple[int, int]]:
    """A client of the wire protocol itself, to hold the backend key psycopg hides."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    params = b"user\0x\0database\0shop\0\0"
    s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    key = None
    while True:
        kind, body = _message(s)
        assert kind != b"E", body
        if kind == b"K":
            key = struct.unpack("!ii", body)
        if kind == b"Z":
            return s, key


def send_cancel(port: int, key: tuple[int, int]) -> bytes:
    """A CancelRequest; the answer is the connection closing (never any bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        c.sendall(struct.pack("!iiii", 16, CANCEL_REQUEST, *key))
        return c.recv(100)


def sleeping(pg) -> bool:  # noqa: F811
    return pg.sql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' "
                  "AND state = 'active'", db="shop").strip() != "0"


def test_cancel_keys_work_only_within_their_target_and_from_their_user(
        tmp_path, collector, pg):  # noqa: F811
    """Two targets on the same server. A key of a session on A sent to B's listener is
    unknown there, from another user to A it is refused, and neither cancels anything;
    from its user to A it cancels; once its session has ended it is gone. psycopg's own
    cancel works through the listener."""
    h, echo = listening_host(tmp_path, collector, pg, second="orders-b",
                             extra='listen_allow = ["user:root", "user:nobody"]')
    d = Daemon(h.config, listeners=2)
    a, b = d.ports["orders-db"], d.ports["orders-b"]
    try:
        s, key = raw_session(a)
        assert key is not None
        s.sendall(b"Q" + struct.pack("!i", 4 + 20) + b"SELECT pg_sleep(30)\0")
        wait_for(lambda: sleeping(pg), timeout=30, what="the sleep to run")
        assert send_cancel(b, key) == b""                       # another target's key
        other = subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c",
                                f"import socket, struct; c = socket.create_connection(("
                                f"'127.0.0.1', {a})); c.sendall(struct.pack('!iiii', 16, "
                                f"{CANCEL_REQUEST}, {key[0]}, {key[1]})); print(c.recv(100))"],
                               capture_output=True, text=True, timeout=60)
        assert other.stdout.strip() == "b''", other.stderr       # another user's key
        time.sleep(1.0)
        assert sleeping(pg)                                      # still running
        started = time.monotonic()
        assert send_cancel(a, key) == b""                        # its own: cancelled
        kind, body = _message(s)
        while kind == b"T":                                      # the sleep's columns
            kind, body = _message(s)
        assert kind == b"E" and b"C57014\0" in body, body
        assert time.monotonic() - started < 20
        assert _message(s)[0] == b"Z"
        s.sendall(b"X\0\0\0\4")
        s.close()
        wait_for(lambda: any(x["end_reason"] and any(k == "startup" for k, _ in x["events"])
                             for x in h.sessions("postgres")), timeout=30,
                 what="the session to end")     # (the client or the server closed first)
        assert send_cancel(a, key) == b""                        # gone with its session
        script = h.public / "cancel.py"
        script.write_text(cancel_script(a, 30))
        p = subprocess.run([VENV_PY, str(script)], capture_output=True, text=True, timeout=90)
        assert p.stdout.splitlines()[-1:] == ["cancelled"], p.stdout + p.stderr
        sessions = ended(h, 8)
    finally:
        d.stop()
        h.cleanup()
        echo.close()
    cancels = {}
    for x in sessions:
        for k, f in x["events"]:
            if k == "cancel":
                cancels.setdefault(x["target"], []).append(
                    (x["start"]["process"]["user"], f, x["end_reason"]))
    assert cancels["orders-b"] == [
        ("root", {"matched": False}, "cancel with a key no live session of this target holds")]
    a_cancels = sorted(cancels["orders-db"], key=lambda c: c[2])
    assert ("nobody", {"matched": True, "forwarded": False},
            "cancel refused: the key is uid 0's session's, sent by uid 65534") in a_cancels
    assert [c for c in a_cancels if c[2] == "cancel request forwarded"] == [
        ("root", {"matched": True}, "cancel request forwarded")] * 2   # raw, then psycopg
    assert ("root", {"matched": False},
            "cancel with a key no live session of this target holds") in a_cancels
    assert len(a_cancels) == 4
