"""MySQL through the proxy, end to end on the real kernel: enrolled agents (the mariadb
CLI, PyMySQL, mysql-connector-python pure and C) reach a real MariaDB 10.11 through the
eBPF redirect; the proxy logs in for them, judges every statement and records it before
it runs, masks what policy masks."""
import json
import os
import subprocess

import pytest

from tests.hostagent.intercept.conftest import EchoServer, Host
from tests.mysql_server import MariaDbServer
from tests.support import BIN, pending_approvals, run_cli, wait_for

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
reason = "no server files"
flags = ["server_files"]
[[rules]]
name = "ask-before-delete"
action = "review"
reason = "deletes need a human"
statements = ["DELETE"]
[[masks]]
name = "pii"
columns = ["customers.email", "customers.card"]
[[masks]]
name = "secrets"
detectors = ["aws_access_key"]
"""


@pytest.fixture(scope="module")
def db():
    server = MariaDbServer().start()
    server.sql("CREATE TABLE orders (id INT PRIMARY KEY, item VARCHAR(40));"
               "INSERT INTO orders VALUES (1, 'book'), (2, 'pen');"
               "CREATE TABLE customers (id INT PRIMARY KEY, name VARCHAR(40), "
               "email VARCHAR(80), card BIGINT, note TEXT);"
               "INSERT INTO customers VALUES (1, 'ann', 'ann@example.com', 4111111111111111, "
               "'key AKIAABCDEFGHIJKLMNOP here'), (2, 'bob', 'bob@example.com', NULL, 'hi');",
               db="shop")
    yield server
    server.stop()


def make_host(tmp_path, collector, db, *, extra: str = "", policy: str = POLICY,
              target: str = "") -> tuple[Host, EchoServer]:
    echo = EchoServer()
    h = Host(tmp_path, collector, echo)
    secret = tmp_path / "mysql-password"            # root's alone: the agent can't read it
    secret.write_text("app-secret-pw\n")
    pol = tmp_path / "policy.toml"
    pol.write_text(policy)
    h.config = h.write("mysql", extra=target or f'''[[targets]]
name = "shop-db"
protocol = "mysql"
address = "127.0.0.1:{db.port}"
user = "app"
password_file = "{secret}"
tls = "disable"
{extra}''')
    h.config.write_text(f'policy = "{pol}"\n' + h.config.read_text())
    return h, echo


@pytest.fixture
def make(tmp_path, collector, db):
    made = []

    def factory(**kw) -> Host:
        h, echo = make_host(tmp_path, collector, db, **kw)
        made.append((h, echo))
        return h
    yield factory
    for h, echo in made:
        h.cleanup()
        echo.close()


@pytest.fixture
def host(make):
    return make()


def mariadb(h, db, sql: str, user="nobody", args=()):
    """The mariadb CLI under `agentgate run`, reading `sql` on stdin (with -e it stops at
    the first error even with --force)."""
    cmd = [str(BIN / "agentgate"), "run", "--config", str(h.config), "--user", user, "--",
           "mariadb", "-h", "127.0.0.1", "-P", str(db.port), "-u", "whoever", "-pnot-the-password",
           "--batch", "--skip-column-names", "--connect-timeout=20", *args, "shop"]
    return subprocess.run(cmd, input=sql + ";\n", capture_output=True, text=True, timeout=90,
                          env={"PATH": os.environ["PATH"]})


def run_py(h, code: str, name: str = "agent.py", timeout: float = 120):
    script = h.public / name
    script.write_text(code)
    script.chmod(0o644)
    return subprocess.run([str(BIN / "agentgate"), "run", "--config", str(h.config), "--user",
                           "nobody", "--", VENV_PY, str(script)], capture_output=True,
                          text=True, timeout=timeout)


def events(h, kind: str) -> list[dict]:
    return [f for s in h.sessions("mysql") for k, f in s["events"] if k == kind]


def orders_count(db) -> int:
    return int(db.sql("SELECT COUNT(*) FROM orders", db="shop").strip())


def test_the_mariadb_cli_gets_in_with_injected_credentials(host, db):
    p = mariadb(host, db, "SELECT CURRENT_USER(), COUNT(*) FROM orders")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["app@%", "2"]         # the server saw the injected user
    (s,) = host.sessions("mysql")
    startup = next(f for k, f in s["events"] if k == "startup")
    assert startup["user"] == "whoever" and startup["upstream_user"] == "app"
    assert startup["server_version"].endswith(db.version)   # (MariaDB greets with 5.5.5-)
    kinds = [k for k, _ in s["events"]]
    cmd = next(f for k, f in s["events"] if k == "command"
               and f["text"].startswith("SELECT CURRENT_USER"))
    assert cmd["decision"]["action"] == "allow" and cmd["tables"] == ["orders"]
    out = [f for k, f in s["events"] if k == "output"]
    assert any(o.get("sample") == [["app@%", "2"]] for o in out), out
    assert kinds.index("command") < kinds.index("output")


@pytest.mark.parametrize("sql", [
    "/* c */ DrOp TABLE orders",
    "SELECT 1; DROP TABLE orders",
    "/*!50000 DROP TABLE orders */",
    "PREPARE s FROM 'DROP TABLE orders'",
    "SELECT * FROM orders INTO OUTFILE '/tmp/agentgate-mysql-leak'",
    "SELECT LOAD_FILE('/etc/passwd')",
])
def test_denied_statements_never_run_and_the_session_goes_on(host, db, sql):
    p = mariadb(host, db, f"{sql}; SELECT 'next', COUNT(*) FROM orders",
                args=("--force",))
    assert "agentgate: denied by rule" in p.stderr, p.stderr
    assert "ERROR 1142 (42000)" in p.stderr               # a real ERR packet
    assert p.stdout.split()[-2:] == ["next", "2"], p.stderr    # the session goes on
    assert orders_count(db) == 2
    assert not os.path.exists("/tmp/agentgate-mysql-leak")
    decisions = [f["decision"]["action"] for f in events(host, "command")]
    assert "deny" in decisions


def test_pymysql_and_connector_prepared_and_text(host, db):
    p = run_py(host, f'''
import json, pymysql, mysql.connector
from pymysql.constants import CLIENT
out = {{}}
c = pymysql.connect(host="127.0.0.1", port={db.port}, user="x", password="y", database="shop",
                    client_flag=CLIENT.MULTI_STATEMENTS)
cur = c.cursor()
cur.execute("SELECT item FROM orders WHERE id = %s", (2,))
out["pymysql"] = cur.fetchall()
try:
    cur.execute("DROP TABLE orders")
except pymysql.MySQLError as e:
    out["pymysql_denied"] = [e.args[0], e.args[1]]
try:   # smuggled behind a harmless statement, in one COM_QUERY
    cur.execute("SELECT 1; DROP TABLE orders")
except pymysql.MySQLError as e:
    out["smuggled"] = e.args[0]
cur.execute("SELECT 1; SELECT 2")
out["multi"] = [cur.fetchall()]
cur.nextset()
out["multi"].append(cur.fetchall())
cur.execute("SELECT COUNT(*) FROM orders")
out["after"] = cur.fetchone()[0]
for pure in (True, False):
    cn = mysql.connector.connect(host="127.0.0.1", port={db.port}, user="x", password="y",
                                 database="shop", use_pure=pure)
    k = cn.cursor(prepared=True)
    k.execute("SELECT id, item FROM orders WHERE id > ? ORDER BY id", (0,))
    out[f"connector_{{pure}}"] = [list(r) for r in k.fetchall()]
    try:
        k.execute("DROP TABLE orders")
    except mysql.connector.Error as e:
        out[f"connector_{{pure}}_denied"] = [e.errno, e.msg]
    k.close()
    cn.close()
print(json.dumps(out))
''')
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["pymysql"] == [["pen"]]
    assert out["pymysql_denied"][0] == 1142 and "no-ddl" in out["pymysql_denied"][1]
    assert out["after"] == 2 and out["smuggled"] == 1142
    assert out["multi"] == [[[1]], [[2]]]
    for pure in ("True", "False"):
        assert out[f"connector_{pure}"] == [[1, "book"], [2, "pen"]]
        # (the C extension reports a failed prepare as errno -1, from a server too)
        errno, msg = out[f"connector_{pure}_denied"]
        assert errno == (1142 if pure == "True" else -1) and 'rule "no-ddl"' in msg
    assert orders_count(db) == 2
    binds = events(host, "bind")
    assert any(b["params"] == ["0"] for b in binds), binds
    prepares = [f for f in events(host, "command") if f.get("protocol") == "prepare"]
    assert any(f["decision"]["action"] == "deny" for f in prepares)


def test_masking_in_the_text_and_binary_protocols(host, db):
    p = run_py(host, f'''
import json, pymysql, mysql.connector
c = pymysql.connect(host="127.0.0.1", port={db.port}, user="x", password="y", database="shop")
cur = c.cursor()
out = {{}}
cur.execute("SELECT id, name, email, card, note FROM customers ORDER BY id")
out["text"] = [list(r) for r in cur.fetchall()]
cur.execute("SELECT CONCAT(email, '!') FROM customers ORDER BY id")
out["expr"] = [list(r) for r in cur.fetchall()]
cur.execute("SELECT x FROM (SELECT email AS x FROM customers) d ORDER BY x")
out["derived"] = [list(r) for r in cur.fetchall()]
cn = mysql.connector.connect(host="127.0.0.1", port={db.port}, user="x", password="y",
                             database="shop", use_pure=True)
k = cn.cursor(prepared=True)
k.execute("SELECT id, email, card, note FROM customers WHERE id >= ? ORDER BY id", (1,))
out["binary"] = [[v.decode() if isinstance(v, (bytes, bytearray)) else v for v in r]
                 for r in k.fetchall()]
try:
    cur.execute("CREATE TABLE leak AS SELECT email FROM customers")
except pymysql.MySQLError as e:
    out["copy"] = e.args[0]
print(json.dumps(out))
''')
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["text"] == [[1, "ann", "****", "****", "key **** here"], [2, "bob", "****", None, "hi"]]
    assert out["expr"] == [["****"], ["****"]]
    assert out["derived"] == [["****"], ["****"]]
    assert out["binary"] == [[1, "****", "****", "key **** here"], [2, "****", None, "hi"]]
    assert out["copy"] == 1142
    assert "leak" not in db.sql("SHOW TABLES", db="shop").split()
    masked = [o["masked"] for o in events(host, "output") if o.get("masked")]
    assert any("pii:column" in m_ for m_ in masked) and any("secrets:aws_access_key" in m_ for m_ in masked)
    samples = json.dumps([o.get("sample") for o in events(host, "output")])
    assert "ann@example.com" not in samples and "AKIAABCDEFGHIJKLMNOP" not in samples


def test_a_held_delete_runs_once_approved_and_not_when_denied(host, db, collector):
    db.sql("CREATE TABLE IF NOT EXISTS scratch (id INT); DELETE FROM scratch; "
           "INSERT INTO scratch VALUES (1), (2)", db="shop")
    script = f'''
import pymysql
c = pymysql.connect(host="127.0.0.1", port={db.port}, user="x", password="y", database="shop",
                    autocommit=True)
cur = c.cursor()
for i in (1, 2):
    try:
        cur.execute(f"DELETE FROM scratch WHERE id = {{i}}")
        print("deleted", i)
    except pymysql.MySQLError as e:
        print("refused", i, e.args[0], e.args[1])
'''
    script_path = host.public / "held.py"
    script_path.write_text(script)
    script_path.chmod(0o644)
    proc = subprocess.Popen([str(BIN / "agentgate"), "run", "--config", str(host.config),
                             "--user", "nobody", "--", VENV_PY, str(script_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        decided: set = set()
        for verdict in ("approve", "deny"):
            pending = wait_for(lambda: [a for a in pending_approvals(collector)
                                        if a["id"] not in decided], timeout=60,
                               what="a pending approval")
            p = run_cli("approvals", verdict, pending[0]["id"], "--reason", "test",
                        collector=collector)
            assert p.returncode == 0, p.stderr
            decided.add(pending[0]["id"])
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = out.splitlines()
    assert lines[0] == "deleted 1", (out, err)
    assert lines[1].startswith("refused 2 1142"), (out, err)
    assert db.sql("SELECT id FROM scratch", db="shop").split() == ["2"]


def test_load_data_local_is_refused_by_default_and_allowed_by_a_rule(make, db):
    db.sql("CREATE TABLE IF NOT EXISTS loaded (v VARCHAR(20)); DELETE FROM loaded", db="shop")
    h = make()
    data = h.public / "rows.txt"
    data.write_text("alpha\nbeta\n")
    data.chmod(0o644)
    stmt = f"LOAD DATA LOCAL INFILE '{data}' INTO TABLE loaded"
    p = mariadb(h, db, f"{stmt}; SELECT COUNT(*) FROM loaded", args=("--local-infile=1", "--force"))
    assert "ERROR 1148 (42000)" in p.stderr and "refused" in p.stderr, p.stderr
    assert p.stdout.split() == ["0"]
    (rec,) = events(h, "local_file")
    assert rec["path"] == str(data) and rec["decision"]["action"] == "deny"
    allowed = make(policy=POLICY + f'''
[[rules]]
name = "loads-from-public"
action = "allow"
reason = "test data"
flags = ["local_files"]
paths = ["{h.public}/*"]
''')
    allowed.public = h.public
    p = mariadb(allowed, db, f"{stmt}; SELECT COUNT(*) FROM loaded", args=("--local-infile=1",))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["2"]
    recs = events(allowed, "local_file")    # (both hosts' sessions: one collector)
    assert any(r.get("decision", {}).get("action") == "allow" for r in recs)
    assert any(r.get("bytes") == len("alpha\nbeta\n") and r.get("sent") for r in recs)


def test_kill_query_reaches_only_a_session_of_the_same_agent(host, db):
    p = run_py(host, f'''
import json, threading, time, pymysql
kw = dict(host="127.0.0.1", port={db.port}, user="x", password="y", database="shop")
a = pymysql.connect(**kw)
b = pymysql.connect(**kw)
res = {{}}
def sleep():
    cur = a.cursor()
    try:
        cur.execute("SELECT SLEEP(60)")
        res["sleep"] = cur.fetchone()[0]
    except pymysql.MySQLError as e:
        res["sleep"] = e.args[0]
t = threading.Thread(target=sleep)
t.start()
watch = b.cursor()
for _ in range(600):
    watch.execute("SELECT COUNT(*) FROM information_schema.processlist WHERE info = 'SELECT SLEEP(60)'")
    if watch.fetchone()[0]:
        break
    time.sleep(0.05)
try:
    watch.execute("KILL QUERY 12345")
except pymysql.MySQLError as e:
    res["unknown"] = e.args[0]
watch.execute(f"KILL QUERY {{a.thread_id()}}")
t.join(30)
res["alive"] = t.is_alive()
print(json.dumps(res))
''')
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    # SLEEP() interrupted returns 1 (MySQL) or fails with 1317 (MariaDB); the unknown
    # stand-in got the server's own error
    assert res["unknown"] == 1094 and res["sleep"] in (1, 1317) and not res["alive"], res
    kills = events(host, "kill")
    assert [k["matched"] for k in kills] == [False, True]


def test_a_32_mib_row_goes_both_ways(host, db):
    """In as a prepared statement's parameter (a text statement that long is not judged:
    unparseable), out in both protocols; and a blob in a text statement's _binary literal
    (bytes that are not UTF-8) under the cap."""
    p = run_py(host, f'''
import hashlib, pymysql, mysql.connector
big = bytes(range(256)) * (128 << 10)
# (the C extension: the pure one cuts binary-protocol values over 16 MiB, direct too)
cn = mysql.connector.connect(host="127.0.0.1", port={db.port}, user="x", password="y",
                             database="shop", use_pure=False, ssl_disabled=True)
k = cn.cursor(prepared=True)
k.execute("CREATE TABLE IF NOT EXISTS big (id INT PRIMARY KEY, b LONGBLOB)")
k.execute("REPLACE INTO big VALUES (?, ?)", (1, big))
cn.commit()
k.execute("SELECT b FROM big WHERE id = ?", (1,))
binary = bytes(k.fetchall()[0][0])
c = pymysql.connect(host="127.0.0.1", port={db.port}, user="x", password="y", database="shop",
                    max_allowed_packet=64 << 20)
cur = c.cursor()
cur.execute("SELECT b FROM big WHERE id = 1")
text = cur.fetchone()[0]
cur.execute("REPLACE INTO big VALUES (2, %s)", (big[:300000],))
c.commit()
cur.execute("SELECT b FROM big WHERE id = 2")
small = cur.fetchone()[0]
print(len(binary), binary == big, text == big, small == big[:300000])
''')
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[-4:] == [str(32 << 20), "True", "True", "True"]
    binds = [b for b in events(host, "bind") if b["text"].startswith("REPLACE")]
    assert binds and len(binds[0]["params"][1]) <= 1024          # recorded, cut


def test_statements_are_kept_while_the_collector_is_down(host, db, tmp_path):
    host.collector.kill()
    p = mariadb(host, db, "SELECT 'while down'")
    assert p.returncode == 0 and p.stdout.strip() == "while down", p.stderr
    assert "stays in the spool" in p.stderr
    host.collector.restart()
    daemon_log = tmp_path / "daemon.log"
    daemon = subprocess.Popen([str(BIN / "agentgate-hostagent"), "serve", "--config",
                               str(host.config)], stderr=open(daemon_log, "w"))
    from tests.support import logs
    logs.watch_file(daemon_log)
    try:
        wait_for(lambda: any(f.get("text") == "SELECT 'while down'" for f in events(host, "command")),
                 timeout=60, what="the spooled statement")
    finally:
        daemon.terminate()
        daemon.wait(30)


@pytest.mark.log_allows(r"ProtocolError|malformed|closing the session")
def test_malformed_packets_close_only_that_session(host, db):
    p = run_py(host, f'''
import socket, pymysql
s = socket.create_connection(("127.0.0.1", {db.port}))
s.recv(4096)                                            # the greeting
s.sendall(b"\\x05\\x00\\x00\\x01\\xff\\xff\\xff\\xff\\xff")  # a response that is no response
s.settimeout(20)
while s.recv(4096):                                     # closed by the proxy (no timeout)
    pass
print("closed")
c = pymysql.connect(host="127.0.0.1", port={db.port}, user="x", password="y", database="shop")
cur = c.cursor()
cur.execute("SELECT COUNT(*) FROM orders")
print("other session", cur.fetchone()[0])
''')
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["closed", "other", "session", "2"]
    ends = [s_["end_reason"] for s_ in host.sessions("mysql")]
    assert any(e.startswith("protocol error") for e in ends), ends


def test_a_server_whose_sql_mode_reads_text_otherwise_is_refused(host, db):
    saved = db.sql("SELECT @@GLOBAL.sql_mode").strip()
    db.sql("SET GLOBAL sql_mode = CONCAT(@@GLOBAL.sql_mode, ',NO_BACKSLASH_ESCAPES')")
    try:
        p = mariadb(host, db, "SELECT 'never'")
    finally:
        db.sql(f"SET GLOBAL sql_mode = '{saved}'")
    assert p.returncode != 0 and "never" not in p.stdout
    assert "sql_mode NO_BACKSLASH_ESCAPES would make the server read" in p.stderr, p.stderr


def test_masked_values_do_not_leak_through_ctes_warnings_or_procedures(host, db):
    db.sql("CREATE PROCEDURE IF NOT EXISTS admins() SELECT id, card FROM customers ORDER BY id",
           db="shop")
    p = run_py(host, f'''
import json, pymysql
c = pymysql.connect(host="127.0.0.1", port={db.port}, user="x", password="y", database="shop")
cur = c.cursor()
out = {{}}
cur.execute("WITH d AS (SELECT * FROM customers) SELECT id, email, card FROM d ORDER BY id")
out["cte"] = [list(r) for r in cur.fetchall()]
cur.execute("WITH d AS (SELECT HEX(email) h FROM customers) SELECT h FROM d")
out["hex"] = [list(r) for r in cur.fetchall()]
cur.execute("SELECT CAST(card AS DATE) FROM customers WHERE id = 1")
cur.execute("SELECT 1")              # uses no table: the server keeps the warnings
cur.execute("SHOW WARNINGS")
out["warnings"] = [list(r) for r in cur.fetchall()]
try:   # a procedure whose body reads a masked table, created by the agent
    cur.execute("CREATE PROCEDURE leaky() SELECT * FROM customers UNION ALL SELECT * FROM customers")
    out["create"] = "created"
except pymysql.MySQLError as e:
    out["create"] = e.args[0]
cur.execute("CALL admins()")         # one an admin created: its results masked whole
out["call"] = [list(r) for r in cur.fetchall()]
print(json.dumps(out))
''')
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.splitlines()[-1])
    # (a CTE's columns prove nothing about their source: all masked, id too)
    assert out["cte"] == [["****", "****", "****"], ["****", "****", None]]
    assert out["hex"] == [["****"], ["****"]]
    assert out["warnings"] and "4111111111111111" not in json.dumps(out["warnings"])
    assert out["create"] == 1142
    assert out["call"] == [["****", "****"], ["****", None]]


def test_disguised_destruction_and_charset_tricks_are_refused(host, db):
    db.sql("CREATE TABLE IF NOT EXISTS victim (x INT); INSERT INTO victim VALUES (1)", db="shop")
    p = run_py(host, f'''
import json, pymysql
out = {{}}
c = pymysql.connect(host="127.0.0.1", port={db.port}, user="x", password="y", database="shop")
cur = c.cursor()
for name, sql in [("replace", "CREATE OR REPLACE TABLE victim (x INT)"),
                  ("rename", "RENAME TABLE victim TO victim_gone"),
                  ("kill", "PREPARE k FROM 'KILL CONNECTION 1'")]:
    try:
        cur.execute(sql)
        out[name] = "ran"
    except pymysql.MySQLError as e:
        out[name] = e.args[0]
# latin1 (where 0xA0 is a space, a letter to a UTF-8 reader): PyMySQL's SET NAMES latin1
try:
    pymysql.connect(host="127.0.0.1", port={db.port}, user="x", password="y", database="shop",
                    charset="latin1")
    out["latin1"] = "connected"
except pymysql.MySQLError as e:
    out["latin1"] = e.args[0]
print(json.dumps(out))
''')
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.splitlines()[-1])
    assert out == {"replace": 1142, "rename": 1142, "kill": 1142, "latin1": 1142}, out
    assert db.sql("SELECT COUNT(*) FROM victim", db="shop").strip() == "1"


def test_the_database_named_at_login_is_judged(make, db):
    h = make(policy=POLICY + '''
[[rules]]
name = "not-mysql"
action = "deny"
reason = "the system schema is off limits"
databases = ["mysql"]
''')
    p = subprocess.run([str(BIN / "agentgate"), "run", "--config", str(h.config), "--user",
                        "nobody", "--", "mariadb", "-h", "127.0.0.1", "-P", str(db.port), "-u", "x",
                        "-py", "--batch", "-e", "SELECT 1", "mysql"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "ERROR 1044 (42000)" in p.stderr and "not-mysql" in p.stderr, p.stderr


def test_an_agent_on_tls_learns_at_once_that_the_server_went_away(host, db):
    script = host.public / "gone.py"
    script.write_text(f'''
import time, sys, pymysql
c = pymysql.connect(host="127.0.0.1", port={db.port}, user="x", password="y", database="shop",
                    read_timeout=30)
cur = c.cursor()
cur.execute("SELECT CONNECTION_ID()")
print(cur.fetchone()[0], c._sock.version(), flush=True)
sys.stdin.readline()                         # the test kills the server thread
t = time.monotonic()
try:
    cur.execute("SELECT 1")
    print("ran")
except pymysql.MySQLError as e:
    print(e.args[0], time.monotonic() - t < 10)
''')
    script.chmod(0o644)
    proc = subprocess.Popen([str(BIN / "agentgate"), "run", "--config", str(host.config),
                             "--user", "nobody", "--", VENV_PY, str(script)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        thread, version = proc.stdout.readline().split()
        assert version.startswith("TLSv1.")          # the agent's leg is TLS
        db.sql(f"KILL {int(thread)}")
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert out.split()[-1] == "True", (out, err)     # an error, not a 30 s read timeout
