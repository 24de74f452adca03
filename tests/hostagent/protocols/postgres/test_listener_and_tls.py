"""Client-side TLS terminated by the proxy (a certificate from the host agent's local CA
naming the host the client dialed), and the plain per-target listener that works
without eBPF: psql, psycopg, asyncpg and pgbench through it, attributed from /proc."""
import os
import subprocess
import threading

import pytest

from tests.hostagent.protocols.postgres.test_proxy import make_host as proxy_host
from tests.hostagent.protocols.postgres.test_proxy import orders_exists, pg  # noqa: F401
from tests.support import BIN, logs, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (eBPF, runuser)")
VENV_PY = str(BIN / "python")
PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"


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

    def __init__(self, cfg):
        self.lines: list[str] = []
        self.proc = subprocess.Popen([str(BIN / "agentgate-hostagent"), "serve", "--config",
                                      str(cfg)], stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        logs.watch("agentgate-hostagent (listeners)", lambda: "".join(self.lines))
        line = wait_for(lambda: next((ln for ln in self.lines if "plain listener on" in ln),
                                     None) or self.proc.poll() is not None,
                        timeout=60, what="the plain listener")
        assert isinstance(line, str), "".join(self.lines)
        self.port = int(line.rsplit(":", 1)[1])

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture
def listener(tmp_path, collector, pg):  # noqa: F811
    h, echo = make_host(tmp_path, collector, pg, extra='listen = "127.0.0.1:0"')
    h.config.write_text(h.config.read_text().replace("[intercept]",
                                                     "[intercept]\nenabled = false", 1))
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
