"""TLS on both legs and the upstream logins: verify-full towards a MariaDB with TLS (and
refusals when it can't be verified), the agent's own TLS terminated with the host
agent's CA, MariaDB's client_ed25519 for the injected user, and COM_CHANGE_USER, which
logs in again with the injected credentials."""
import json
import os
import subprocess

import pytest

from tests.hostagent.protocols.mysql.test_proxy import (VENV_PY, db, events, make,  # noqa: F401
                                                        mariadb, run_py)
from tests.mysql_server import MariaDbServer
from tests.support import BIN

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF interception needs root")


@pytest.fixture(scope="module")
def tlsdb():
    server = MariaDbServer(tls=True).start()
    server.sql("CREATE TABLE t (id INT); INSERT INTO t VALUES (7)", db="shop")
    yield server
    server.stop()


def tls_target(tmp_path, server, extra: str) -> str:
    secret = tmp_path / "tls-password"
    secret.write_text("app-secret-pw\n")
    return f'''[[targets]]
name = "tls-db"
protocol = "mysql"
address = "127.0.0.1:{server.port}"
user = "app"
password_file = "{secret}"
{extra}'''


def test_verify_full_towards_a_server_with_tls(make, tlsdb, tmp_path):
    h = make(target=tls_target(tmp_path, tlsdb, f'ca = "{tlsdb.ca.pem}"\nserver_name = "localhost"'))
    p = mariadb(h, tlsdb, "SELECT id FROM t; SHOW STATUS LIKE 'Ssl_version'")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "7" and lines[1].startswith("Ssl_version\tTLSv1.")   # the server's view
    tls = [f for f in events(h, "tls") if f["side"] == "upstream"]
    assert tls and tls[0]["verified"] is True


@pytest.mark.log_allows(r"upstream TLS failed|does not offer TLS|certificate verify failed")
def test_a_server_that_cannot_be_verified_is_refused(make, tlsdb, db, tmp_path):
    # the system's store does not know the test CA
    h = make(target=tls_target(tmp_path, tlsdb, 'server_name = "localhost"'))
    p = mariadb(h, tlsdb, "SELECT 1")
    assert p.returncode != 0 and "upstream TLS failed (verify-full)" in p.stderr, p.stderr
    # a server without TLS, under the default mode
    h = make(target=tls_target(tmp_path, db, ""))
    p = mariadb(h, db, "SELECT 1")
    assert "the server does not offer TLS" in p.stderr and 'tls = "disable"' in p.stderr


def test_the_agents_tls_is_terminated_with_the_local_ca(make, db):
    h = make()
    out = subprocess.run([str(BIN / "agentgate-hostagent"), "ca-cert", "--config", str(h.config)],
                         capture_output=True, text=True, timeout=60)
    ca = h.public / "agentgate-ca.pem"
    ca.write_text(out.stdout)
    ca.chmod(0o644)
    p = run_py(h, f'''
import json, pymysql
c = pymysql.connect(host="127.0.0.1", port={db.port}, user="x", password="y", database="shop",
                    ssl={{"ca": "{ca}"}}, ssl_verify_cert=True, ssl_verify_identity=True)
cur = c.cursor()
cur.execute("SELECT COUNT(*) FROM orders")
print(json.dumps([cur.fetchone()[0], c._sock.version()]))
''')
    assert p.returncode == 0, p.stderr
    count, version = json.loads(p.stdout.splitlines()[-1])
    assert count == 2 and version.startswith("TLSv1.")
    assert any(f["side"] == "client" for f in events(h, "tls"))


def test_the_injected_user_may_log_in_with_ed25519(make, db, tmp_path):
    secret = tmp_path / "ed-password"
    secret.write_text("ed-secret-pw\n")
    h = make(target=f'''[[targets]]
name = "ed-db"
protocol = "mysql"
address = "127.0.0.1:{db.port}"
user = "edu"
password_file = "{secret}"
tls = "disable"''')
    p = mariadb(h, db, "SELECT CURRENT_USER()")
    assert p.returncode == 0 and p.stdout.strip() == "edu@%", p.stderr
    (auth,) = events(h, "auth")
    assert auth["method"] == "client_ed25519"


def test_change_user_logs_in_again_with_the_injected_credentials(make, db):
    h = make()
    p = run_py(h, f'''
import json, mysql.connector
out = []
cn = mysql.connector.connect(host="127.0.0.1", port={db.port}, user="x", password="y",
                             database="shop", use_pure=True, ssl_disabled=True)
k = cn.cursor()
k.execute("SET @mark = 1")
cn.cmd_change_user(username="root", password="guess", database="shop")
k = cn.cursor()
k.execute("SELECT CURRENT_USER(), @mark")
out.append(list(k.fetchone()))
k.execute("DROP TABLE orders") if False else None
print(json.dumps(out))
''')
    assert p.returncode == 0, p.stderr
    # still the injected user, and a fresh session (the user variable is gone)
    assert json.loads(p.stdout.splitlines()[-1]) == [["app@%", None]]
    starts = [f for f in events(h, "startup") if f.get("change_user")]
    assert starts and starts[0]["user"] == "root" and starts[0]["upstream_user"] == "app"
