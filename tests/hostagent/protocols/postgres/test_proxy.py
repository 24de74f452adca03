"""PostgreSQL through the proxy, end to end on the real kernel: an enrolled agent (psql,
psycopg) reaches a real PostgreSQL 15 through the eBPF redirect; the proxy injects the
credentials, judges every statement and records it before it runs."""
import os
import subprocess

import pytest

from tests.hostagent.intercept.conftest import EchoServer, Host
from tests.pg import PgServer
from tests.support import BIN, pending_approvals

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF interception needs root")
VENV_PY = str(BIN / "python")
POLICY = """
default = "allow"
unparseable = "deny"
[[rules]]
name = "no-ddl"
action = "deny"
reason = "agents may not change the schema"
statements = ["DROP", "TRUNCATE", "ALTER"]
[[rules]]
name = "no-server-files"
action = "deny"
reason = "no server files or programs"
flags = ["copy_program", "server_files"]
"""


@pytest.fixture(scope="module")
def pg():
    server = PgServer().start()
    server.sql("CREATE TABLE orders (id int PRIMARY KEY, item text); "
               "INSERT INTO orders VALUES (1, 'book'), (2, 'pen'); "
               "ALTER TABLE orders OWNER TO app", db="shop")
    yield server
    server.stop()


def make_host(tmp_path, collector, pg, *, host: str = "127.0.0.1",
              extra: str = "") -> tuple[Host, EchoServer]:
    """A host agent config with the orders-db target (injected credentials) and POLICY."""
    echo = EchoServer()
    h = Host(tmp_path, collector, echo)
    secret = tmp_path / "pg-password"           # root's alone: the agent can't read it
    secret.write_text("app-secret-pw\n")
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    # the test server has no TLS (loopback): an explicit opt-out, unless `extra` says
    tls = "" if any(ln.split("=")[0].strip() == "tls" for ln in extra.splitlines()) \
        else 'tls = "disable"'
    h.config = h.write("pg", extra=f'''[[targets]]
name = "orders-db"
protocol = "postgres"
address = "{host}:{pg.port}"
user = "app"
password_file = "{secret}"
{tls}
{extra}''')
    h.config.write_text(f'policy = "{policy}"\n' + h.config.read_text())
    return h, echo


@pytest.fixture
def pghost(tmp_path, collector, pg):
    h, echo = make_host(tmp_path, collector, pg)
    yield h
    h.cleanup()
    echo.close()


def psql(h, pg, *sql, user="nobody"):
    args = [str(BIN / "agentgate"), "run", "--config", str(h.config), "--user", user, "--",
            "psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "whoever",
            "-d", "shop"]
    for s in sql:
        args += ["-c", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "PGCONNECT_TIMEOUT": "10"})


def orders_exists(pg) -> bool:
    return pg.sql("SELECT to_regclass('public.orders') IS NOT NULL", db="shop").strip() == "t"


def test_psql_gets_in_with_injected_credentials(pghost, pg):
    p = psql(pghost, pg, "SELECT current_user, count(*) FROM orders")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "app|2"            # the server saw the injected user
    (s,) = [x for x in pghost.sessions("postgres")]
    startup = next(f for k, f in s["events"] if k == "startup")
    assert startup["user"] == "whoever" and startup["upstream_user"] == "app"
    assert startup["credentials"] == "injected"
    kinds = [k for k, _ in s["events"]]
    cmd = kinds.index("command")
    assert s["events"][cmd][1]["decision"]["action"] == "allow"
    assert "output" in kinds[cmd + 1:]
    assert next(f for k, f in s["events"] if k == "output")["summary"] == "SELECT 1"


@pytest.mark.parametrize("sql", ["/* c */ DrOp TABLE orders", "SELECT 1; DROP TABLE orders",
                                 "DO $$ BEGIN DROP TABLE orders; END $$",
                                 "COPY orders TO PROGRAM 'cat > /tmp/agentgate-leak'"])
def test_denied_statements_never_run_and_the_session_goes_on(pghost, pg, sql):
    p = psql(pghost, pg, sql, "SELECT count(*) FROM orders")
    assert "agentgate: denied by rule" in p.stderr, p.stderr
    assert "ERROR:  agentgate" in p.stderr           # a real ErrorResponse
    assert p.stdout.strip() == "2"                   # the next statement ran
    assert orders_exists(pg)
    assert not os.path.exists("/tmp/agentgate-leak")
    s = pghost.sessions("postgres")[0]
    decisions = [f["decision"] for k, f in s["events"] if k == "command"]
    assert any(d["action"] == "deny" for d in decisions)


def test_a_denial_inside_a_transaction_aborts_it_as_the_server_would(pghost, pg):
    p = psql(pghost, pg, "BEGIN; UPDATE orders SET item = 'x' WHERE id = 1; DROP TABLE orders; COMMIT",
             "SELECT item FROM orders WHERE id = 1")
    assert "denied by rule" in p.stderr
    assert p.stdout.strip() == "book"                # the transaction never committed


def test_psycopg_extended_protocol_and_a_prepared_drop(pghost, pg, tmp_path):
    script = pghost.public / "pg_agent.py"
    script.write_text(f'''
import psycopg
with psycopg.connect(host="127.0.0.1", port={pg.port}, dbname="shop", user="nobody-knows",
                     connect_timeout=10) as conn:
    cur = conn.cursor()
    cur.execute("SELECT item FROM orders WHERE id = %s", (2,), prepare=True)
    print("item", cur.fetchone()[0])
    try:
        cur.execute("DROP TABLE orders", prepare=True)
    except psycopg.errors.InsufficientPrivilege as exc:
        print("denied", exc.diag.message_primary)
    conn.rollback()
    cur.execute("SELECT count(*) FROM orders WHERE id > %s", (0,))
    print("count", cur.fetchone()[0])
''')
    script.chmod(0o644)
    p = subprocess.run([str(BIN / "agentgate"), "run", "--config", str(pghost.config), "--user",
                        "nobody", "--", VENV_PY, str(script)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "item pen"
    assert lines[1].startswith("denied agentgate: denied by rule \"no-ddl\"")
    assert lines[2] == "count 2"
    assert orders_exists(pg)
    s = pghost.sessions("postgres")[0]
    binds = [f for k, f in s["events"] if k == "bind"]
    # bind parameters are recorded as sent (psycopg sends this int2 in binary)
    assert {"statement": binds[0]["statement"], "portal": "", "params": [b"\x00\x02"],
            "formats": [1]} in binds


def run_py(h, code: str):
    script = h.public / "pg_agent.py"
    script.write_text(code)
    script.chmod(0o644)
    return subprocess.run([str(BIN / "agentgate"), "run", "--config", str(h.config), "--user",
                           "nobody", "--", VENV_PY, str(script)], capture_output=True,
                          text=True, timeout=90)


def cancel_script(port: int, seconds: int = 60) -> str:
    """A psycopg agent that sleeps on the server and cancels itself once the server
    reports the sleep running (no guessing at timing). It prints its backend pid as it
    sees it, then "cancelled" or "not cancelled"."""
    return f'''
import threading, time, psycopg
conn = psycopg.connect(host="127.0.0.1", port={port}, dbname="shop", user="x")
print("key", conn.info.backend_pid)
def cancel_when_running():
    with psycopg.connect(host="127.0.0.1", port={port}, dbname="shop", user="y") as watch:
        for _ in range(600):
            if watch.execute("SELECT count(*) FROM pg_stat_activity WHERE query = "
                             "'SELECT pg_sleep({seconds})' AND state = 'active'").fetchone()[0]:
                conn.cancel()
                return
            time.sleep(0.05)
threading.Thread(target=cancel_when_running).start()
try:
    conn.execute("SELECT pg_sleep({seconds})")
    print("not cancelled")
except psycopg.errors.QueryCanceled:
    print("cancelled")
'''


def test_cancel_reaches_the_server_without_the_agent_knowing_its_key(pghost, pg):
    p = run_py(pghost, cancel_script(pg.port))
    assert p.returncode == 0, p.stderr
    key_line, cancelled = p.stdout.splitlines()
    assert cancelled == "cancelled"
    agent_pid = int(key_line.split()[1])
    real_pids = pg.sql("SELECT pid FROM pg_stat_activity WHERE usename = 'app'", db="shop")
    assert str(agent_pid) not in real_pids.split()      # the agent holds a stand-in key
    events = [k for s in pghost.sessions("postgres") for k, f in s["events"]]
    assert "cancel" in events


def test_asyncpg_binary_results(pghost, pg):
    p = run_py(pghost, f'''
import asyncio, asyncpg
async def main():
    conn = await asyncpg.connect(host="127.0.0.1", port={pg.port}, database="shop", user="x",
                                 ssl=False)
    rows = await conn.fetch("SELECT id, item FROM orders WHERE id > $1 ORDER BY id", 0)
    print([tuple(r) for r in rows])
    try:
        await conn.execute("TRUNCATE orders")
    except asyncpg.exceptions.InsufficientPrivilegeError as exc:
        print("denied")
    print(await conn.fetchval("SELECT count(*) FROM orders"))
    await conn.close()
asyncio.run(main())
''')
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["[(1, 'book'), (2, 'pen')]", "denied", "2"]


def test_a_full_spool_refuses_the_statement_with_an_error(pghost, pg):
    cfg = pghost.config
    text = cfg.read_text().replace("[intercept]", "[spool]\nmax_bytes = 32768\n"
                                   "segment_bytes = 16384\n[intercept]", 1)
    cfg.write_text(text)
    sql = pghost.public / "big.sql"       # not on the command line: argv is recorded too
    sql.write_text(f"INSERT INTO orders VALUES (3, '{'x' * 70000}');\n")
    sql.chmod(0o644)
    p = subprocess.run([str(BIN / "agentgate"), "run", "--config", str(cfg), "--user", "nobody",
                        "--", "psql", "-X", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "x",
                        "-d", "shop", "-f", str(sql)], capture_output=True, text=True, timeout=60)
    assert "recording could not be stored" in p.stderr, p.stderr
    assert pg.sql("SELECT count(*) FROM orders", db="shop").strip() == "2"   # never ran


def test_pgbench_runs_through_the_proxy(pghost, pg):
    pg.sql("CREATE DATABASE bench OWNER app")
    init = subprocess.run(["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pgbench",
                           "-i", "-q", "-s", "1", "-h", str(pg.dir), "-p", str(pg.port), "-U",
                           "postgres", "bench"], capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    pg.sql("GRANT SELECT ON ALL TABLES IN SCHEMA public TO app", db="bench")
    for proto in ("simple", "prepared"):
        p = subprocess.run([str(BIN / "agentgate"), "run", "--config", str(pghost.config),
                            "--user", "nobody", "--", "/usr/lib/postgresql/15/bin/pgbench",
                            "-S", "-n", "-t", "200", "-M", proto, "-h", "127.0.0.1", "-p",
                            str(pg.port), "-U", "x", "bench"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert "number of transactions actually processed: 200/200" in p.stdout


def test_copy_in_and_out(pghost, pg):
    p = run_py(pghost, f'''
import psycopg
with psycopg.connect(host="127.0.0.1", port={pg.port}, dbname="shop", user="x") as conn:
    with conn.cursor().copy("COPY orders (id, item) FROM STDIN") as copy:
        copy.write_row((10, "lamp"))
        copy.write_row((11, "desk"))
    conn.commit()
    out = b""
    with conn.cursor().copy("COPY (SELECT item FROM orders WHERE id >= 10 ORDER BY id) TO STDOUT") as copy:
        for data in copy:
            out += bytes(data)
    print(out.decode().split())
    conn.execute("DELETE FROM orders WHERE id >= 10")
''')
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "['lamp', 'desk']"
    commands = [f["text"] for s in pghost.sessions("postgres") for k, f in s["events"]
                if k == "command"]
    assert any(c.startswith("COPY orders") for c in commands)


def test_statements_are_kept_while_the_collector_is_down(pghost, pg, tmp_path):
    pghost.collector.kill()
    cfg = pghost.config
    p = psql(pghost, pg, "SELECT 'while down'")
    assert p.returncode == 0 and p.stdout.strip() == "while down", p.stderr
    assert "stays in the spool" in p.stderr
    assert pghost.sessions("postgres") == []
    # The run shipped nothing (no collector) and left its spool. A host agent started on
    # the same spool, with the collector back, delivers it.
    pghost.collector.restart()
    daemon_log = tmp_path / "daemon.log"
    daemon = subprocess.Popen([str(BIN / "agentgate-hostagent"), "serve", "--config", str(cfg)],
                              stderr=open(daemon_log, "w"))
    from tests.support import logs
    logs.watch_file(daemon_log)
    try:
        from tests.support import wait_for
        wait_for(lambda: any(f.get("text") == "SELECT 'while down'"
                             for s in pghost.sessions("postgres") for k, f in s["events"]
                             if k == "command"), timeout=60, what="the spooled statement")
    finally:
        daemon.terminate()
        daemon.wait(30)


REVIEW = """
[[rules]]
name = "deletes-need-a-human"
action = "review"
reason = "deleting orders needs approval"
statements = ["DELETE"]
"""


def held_psql(h, pg, sql):
    args = [str(BIN / "agentgate"), "run", "--config", str(h.config), "--user", "nobody", "--",
            "psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "x", "-d",
            "shop", "-c", sql, "-c", "SELECT count(*) FROM orders"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pending(h) -> list[dict]:
    return pending_approvals(h.collector)


@pytest.fixture
def review_host(pghost, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("review_ttl_seconds = 30\n" + POLICY + REVIEW)
    return pghost


def test_a_held_delete_runs_once_approved(review_host, pg):
    from tests.support import run_cli, wait_for
    pg.sql("INSERT INTO orders VALUES (5, 'held')", db="shop")
    p = held_psql(review_host, pg, "DELETE FROM orders WHERE id = 5")
    try:
        (req,) = wait_for(lambda: pending(review_host), what="the approval request")
        assert req["command"] == "DELETE FROM orders WHERE id = 5"
        assert req["rule"] == "deletes-need-a-human" and req["requested_by"] == "nobody"
        assert pg.sql("SELECT count(*) FROM orders WHERE id = 5", db="shop").strip() == "1"
        r = run_cli("approvals", "approve", req["id"], "--reason", "cleanup",
                    collector=review_host.collector)
        assert r.returncode == 0, r.stderr
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert f"held for approval {req['id']}" in err          # a NoticeResponse while held
    assert out.split() == ["DELETE", "1", "2"]          # it ran, then the session went on
    assert pg.sql("SELECT count(*) FROM orders WHERE id = 5", db="shop").strip() == "0"
    events = [(k, f) for s in review_host.sessions("postgres") for k, f in s["events"]]
    states = [f["state"] for k, f in events if k == "approval"]
    assert states == ["pending", "approved"]


def test_a_held_delete_denied_or_expired_never_runs(review_host, pg, tmp_path):
    from tests.support import run_cli, wait_for
    pg.sql("INSERT INTO orders VALUES (6, 'keep')", db="shop")
    p = held_psql(review_host, pg, "DELETE FROM orders WHERE id = 6")
    (req,) = wait_for(lambda: pending(review_host), what="the approval request")
    r = run_cli("approvals", "deny", req["id"], "--reason", "not now",
                collector=review_host.collector)
    assert r.returncode == 0
    out, err = p.communicate(timeout=60)
    assert "denied by local: not now" in err and out.split() == ["3"]
    # expiry: a short time to live
    policy = tmp_path / "policy.toml"
    policy.write_text(policy.read_text().replace("review_ttl_seconds = 30",
                                                 "review_ttl_seconds = 1"))
    p = held_psql(review_host, pg, "DELETE FROM orders WHERE id = 6")
    out, err = p.communicate(timeout=60)
    assert "not approved in time" in err and out.split() == ["3"]
    assert pg.sql("SELECT count(*) FROM orders WHERE id = 6", db="shop").strip() == "1"
    pg.sql("DELETE FROM orders WHERE id = 6", db="shop")


@pytest.fixture(scope="module")
def pg_tls():
    server = PgServer(tls=True).start()
    yield server
    server.stop()


def tls_host(tmp_path, collector, pg, mode: str, ca: str | None = None) -> Host:
    echo = EchoServer()
    h = Host(tmp_path, collector, echo)
    secret = tmp_path / "pg-password"
    secret.write_text("app-secret-pw\n")
    h.config = h.write(f"tls-{mode}", extra=f'''[[targets]]
name = "tls-db"
protocol = "postgres"
address = "127.0.0.1:{pg.port}"
user = "app"
password_file = "{secret}"
tls = "{mode}"
{f'ca = "{ca}"' if ca else ""}
''')
    h._echo = echo
    return h


def upstream_ssl(h, pg) -> subprocess.CompletedProcess:
    return psql(h, pg, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")


@pytest.mark.parametrize("mode", ["require", "verify-full"])
def test_upstream_tls_modes(tmp_path, collector, pg_tls, mode):
    h = tls_host(tmp_path, collector, pg_tls, mode, str(pg_tls.ca.pem))
    try:
        p = upstream_ssl(h, pg_tls)
        assert p.returncode == 0 and p.stdout.strip() == "t", p.stderr   # encrypted upstream
    finally:
        h.cleanup()
        h._echo.close()


def test_verify_full_refuses_a_server_it_cannot_verify(tmp_path, collector, pg_tls):
    from tests.certs import CA
    other = CA(tmp_path / "other", "other-ca")
    h = tls_host(tmp_path, collector, pg_tls, "verify-full", str(other.pem))
    try:
        p = upstream_ssl(h, pg_tls)
        assert p.returncode != 0 and "upstream TLS failed (verify-full)" in p.stderr
    finally:
        h.cleanup()
        h._echo.close()


def test_require_refuses_a_server_without_tls(tmp_path, collector, pg):
    h = tls_host(tmp_path, collector, pg, "require")
    try:
        p = upstream_ssl(h, pg)
        assert p.returncode != 0 and "does not offer TLS" in p.stderr
    finally:
        h.cleanup()
        h._echo.close()


MASKS = """
[[masks]]
name = "pii"
columns = ["*.ssn"]
detectors = ["email", "credit_card"]
"""


@pytest.fixture
def masked_host(pghost, pg, tmp_path):
    pg.sql("DROP TABLE IF EXISTS people; CREATE TABLE people (id int, name text, ssn text, "
           "note text); INSERT INTO people VALUES (1, 'bob', '123-45-6789', "
           "'mail bob@example.com, card 4111 1111 1111 1111, order 1234 5678 9012 3456'); "
           "ALTER TABLE people OWNER TO app", db="shop")
    (tmp_path / "policy.toml").write_text(POLICY + MASKS)
    return pghost


EXPECTED = (1, "bob", "****", "mail ****, card ****, order 1234 5678 9012 3456")  # not Luhn-valid


def test_masking_text_and_binary_with_psycopg(masked_host, pg):
    p = run_py(masked_host, f'''
import psycopg
with psycopg.connect(host="127.0.0.1", port={pg.port}, dbname="shop", user="x") as conn:
    print(conn.execute("SELECT id, name, ssn, note FROM people").fetchone())
    cur = conn.cursor(binary=True)
    print(cur.execute("SELECT id, name, ssn, note FROM people WHERE id = %s", (1,)).fetchone())
    try:
        with conn.cursor().copy("COPY people TO STDOUT") as copy:
            for _ in copy:
                pass
    except psycopg.errors.InsufficientPrivilege as exc:
        print("copy refused")
''')
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == repr(EXPECTED) and lines[1] == repr(EXPECTED)
    assert lines[2] == "copy refused"
    outputs = [f for s in masked_host.sessions("postgres") for k, f in s["events"]
               if k == "output" and "masked" in f]
    assert outputs and outputs[0]["masked"] == {"pii:column": 1, "pii:email": 1,
                                                "pii:credit_card": 1}


def test_masking_with_asyncpg_binary_results(masked_host, pg):
    p = run_py(masked_host, f'''
import asyncio, asyncpg
async def main():
    conn = await asyncpg.connect(host="127.0.0.1", port={pg.port}, database="shop", user="x",
                                 ssl=False)
    row = await conn.fetchrow("SELECT id, name, ssn, note FROM people WHERE id = $1", 1)
    print(tuple(row))
    await conn.close()
asyncio.run(main())
''')
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == repr(EXPECTED)


def test_errors_quoting_row_data_are_masked_too(masked_host, pg):
    pg.sql("DROP TABLE IF EXISTS contacts; CREATE TABLE contacts (email text UNIQUE); "
           "INSERT INTO contacts VALUES ('alice@example.com'); "
           "ALTER TABLE contacts OWNER TO app", db="shop")
    p = run_py(masked_host, f'''
import psycopg
with psycopg.connect(host="127.0.0.1", port={pg.port}, dbname="shop", user="x") as conn:
    try:
        conn.execute("INSERT INTO contacts VALUES ('alice@example.com')")
    except psycopg.errors.UniqueViolation as exc:
        print(exc.diag.message_detail)
''')
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "Key (email)=(****) already exists."


def test_masking_follows_columns_through_aliases_expressions_and_subqueries(masked_host, pg):
    p = run_py(masked_host, f'''
import psycopg
with psycopg.connect(host="127.0.0.1", port={pg.port}, dbname="shop", user="x") as conn:
    for sql in ["SELECT ssn AS s FROM people",
                "SELECT upper(p.ssn) FROM people p",
                "SELECT x.t FROM (SELECT ssn || '' AS t FROM people) x",
                "WITH c AS (SELECT ssn AS hidden FROM people) SELECT * FROM c",
                "SELECT name AS who FROM people"]:
        print(conn.execute(sql).fetchone()[0])
''')
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["****", "****", "****", "****", "bob"]
    assert "123-45-6789" not in p.stdout


def test_outputs_carry_a_masked_sample_duration_and_counts(masked_host, pg):
    p = run_py(masked_host, f'''
import psycopg
with psycopg.connect(host="127.0.0.1", port={pg.port}, dbname="shop", user="x") as conn:
    conn.execute("SELECT name, ssn FROM people").fetchall()
    conn.execute("UPDATE people SET name = name WHERE id = 1")
''')
    assert p.returncode == 0, p.stderr
    sessions = masked_host.sessions("postgres")
    # (run as nobody with root's HOME, libpq's TLS attempt fails on ~/.postgresql and
    # it retries in the clear: a second, empty session)
    found = [s for s in sessions if any(k == "output" for k, _ in s["events"])]
    assert len(found) == 1, [(x["end_reason"], [k for k, _ in x["events"]]) for x in sessions]
    s = found[0]
    outs = [f for k, f in s["events"] if k == "output"]
    select = next(o for o in outs if o.get("summary") == "SELECT 1")
    assert select["columns"] == ["name", "ssn"] and select["sample"] == [["bob", "****"]]
    assert isinstance(select["duration_us"], int) and select["duration_us"] >= 0
    update = next(o for o in outs if o.get("summary") == "UPDATE 1")
    assert update["rows_affected"] == 1
    # the recording never holds the unmasked value either
    assert "123-45-6789" not in repr(s["events"])


def test_a_table_qualified_mask_follows_aliases_and_spares_other_tables(masked_host, pg, tmp_path):
    (tmp_path / "policy.toml").write_text(POLICY + '[[masks]]\nname = "pii"\n'
                                          'columns = ["people.ssn"]\n')
    pg.sql("DROP TABLE IF EXISTS decoy; CREATE TABLE decoy (ssn text); "
           "INSERT INTO decoy VALUES ('not-secret'); ALTER TABLE decoy OWNER TO app", db="shop")
    p = run_py(masked_host, f'''
import psycopg
with psycopg.connect(host="127.0.0.1", port={pg.port}, dbname="shop", user="x",
                     sslmode="disable") as conn:
    for sql in ["SELECT ssn AS s FROM people", "SELECT coalesce(p.ssn, '') FROM people p",
                "SELECT ssn FROM decoy", "SELECT row_to_json(p) FROM people p"]:
        print(conn.execute(sql).fetchone()[0])
''')
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["****", "****", "not-secret", "****"]


def test_settings_that_would_make_the_server_read_statements_otherwise_are_refused(pghost, pg):
    # SJIS: the server would end a string where the parser sees an escaped quote
    args = [str(BIN / "agentgate"), "run", "--config", str(pghost.config), "--user", "nobody",
            "--", "psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "x",
            "-d", "shop", "-c", "SELECT 1"]
    env = {"PATH": os.environ["PATH"], "PGCONNECT_TIMEOUT": "10", "PGSSLMODE": "disable"}
    p = subprocess.run(args, capture_output=True, text=True, timeout=60,
                       env={**env, "PGCLIENTENCODING": "SJIS"})
    assert p.returncode != 0 and "client_encoding SJIS is refused" in p.stderr, p.stderr
    # a database default the server reports at start-up: refused too (fail closed)
    pg.sql("ALTER DATABASE shop SET standard_conforming_strings = off")
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
        assert p.returncode != 0 and "standard_conforming_strings" in p.stderr, p.stderr
    finally:
        pg.sql("ALTER DATABASE shop RESET standard_conforming_strings")
    p = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0 and p.stdout.strip() == "1", p.stderr


def psql_local(h, pg, *sql, user="postgres"):
    """psql to the server's local socket (its directory as -h), as libpq does by default."""
    args = [str(BIN / "agentgate"), "run", "--config", str(h.config), "--user", user, "--",
            "psql", "-X", "-A", "-t", "-h", str(pg.dir), "-p", str(pg.port), "-U", "postgres",
            "-d", "shop"]
    for s in sql:
        args += ["-c", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "PGCONNECT_TIMEOUT": "10"})


def test_the_local_socket_is_proxied_like_the_address(tmp_path, collector, pg):
    """The server trusts its local socket for `postgres` (a superuser, no password): an
    agent running as postgres would walk in. With the socket listed under the target,
    it reaches the proxy instead: injected credentials, judged statements."""
    sock = f"{pg.dir}/.s.PGSQL.{pg.port}"
    h, echo = make_host(tmp_path, collector, pg, extra=f'unix = "{sock}"')
    try:
        p = psql_local(h, pg, "SELECT current_user, count(*) FROM orders", "DROP TABLE orders",
                       "SELECT 1")
        assert p.stdout.split() == ["app|2", "1"], p.stderr
        assert "agentgate: denied by rule" in p.stderr
        assert orders_exists(pg)
        (s,) = h.sessions("postgres")
        assert s["start"]["via"] == "unix"
        assert s["start"]["process"]["user"] == "postgres"
        assert s["start"]["process"]["exe"].endswith("/psql")
        startup = next(f for k, f in s["events"] if k == "startup")
        assert startup["user"] == "postgres" and startup["upstream_user"] == "app"
        assert startup["credentials"] == "injected"
    finally:
        h.cleanup()
        echo.close()


def test_the_local_socket_of_a_target_that_does_not_list_it_is_refused(pghost, pg):
    p = psql_local(pghost, pg, "SELECT current_user")
    assert p.returncode != 0
    assert "Operation not permitted" in p.stderr, p.stderr
    (run,) = pghost.sessions("run")
    assert [f["address"] for k, f in run["events"] if k == "unix_denied"] == \
        [f"{pg.dir}/.s.PGSQL.{pg.port}"]
    assert not pghost.sessions("postgres")
