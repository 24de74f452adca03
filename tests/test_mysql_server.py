"""The MariaDB test server (tests/mysql_server.py) talked to directly, without the proxy."""
from __future__ import annotations

import ssl
import subprocess

import pymysql
import pytest

from tests.mysql_server import CLIENT, MTR_SAMPLE, MariaDbServer


@pytest.fixture(scope="module")
def server():
    s = MariaDbServer().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tls_server():
    s = MariaDbServer(tls=True).start()
    yield s
    s.stop()


def connect(server, **kw) -> pymysql.Connection:
    return pymysql.connect(host=server.host, port=server.port, user="app",
                           password="app-secret-pw", database="shop", connect_timeout=10, **kw)


def test_app_logs_in_over_tcp(server):
    assert server.version.startswith("10.11.") and "MariaDB" in server.version
    with connect(server) as c, c.cursor() as cur:
        cur.execute("CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(20))")
        cur.execute("INSERT INTO t VALUES (1, 'ünïcode'), (2, NULL)")
        c.commit()
        cur.execute("SELECT CURRENT_USER(), DATABASE()")
        assert cur.fetchone() == ("app@%", "shop")
        cur.execute("SELECT * FROM t ORDER BY id")
        assert cur.fetchall() == ((1, "ünïcode"), (2, None))
        cur.execute("DROP TABLE t")
    assert server.sql("SELECT plugin FROM mysql.user WHERE user = 'app'").strip() \
        == "mysql_native_password"


def test_app_has_no_global_privileges(server):
    with connect(server) as c, c.cursor() as cur:
        cur.execute("SHOW GRANTS")
        grants = " ".join(g for (g,) in cur.fetchall())
        assert "GRANT USAGE ON *.*" in grants and "PROCESS" not in grants \
            and "SUPER" not in grants
        cur.execute("SELECT COUNT(*) FROM information_schema.processlist WHERE user <> 'app'")
        assert cur.fetchone() == (0,)
        with pytest.raises(pymysql.err.OperationalError):
            cur.execute("SELECT * FROM mysql.user")


def test_wrong_password_is_refused(server):
    with pytest.raises(pymysql.err.OperationalError) as e:
        pymysql.connect(host=server.host, port=server.port, user="app", password="nope",
                        connect_timeout=10)
    assert e.value.args[0] == 1045


def test_ed25519_user_with_the_cli(server):
    def cli(password: str) -> subprocess.CompletedProcess:
        return subprocess.run([CLIENT, "--no-defaults", "--protocol=tcp", "-h", server.host,
                               "-P", str(server.port), "-u", "edu", f"-p{password}", "--batch",
                               "--skip-column-names", "shop", "-e", "SELECT CURRENT_USER()"],
                              capture_output=True, text=True, timeout=30)
    r = cli("ed-secret-pw")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "edu@%"
    assert server.sql("SELECT plugin FROM mysql.user WHERE user = 'edu'").strip() == "ed25519"
    r = cli("wrong")
    assert r.returncode != 0 and "Access denied" in r.stderr


def test_root_is_socket_only(server):
    assert server.sql("SELECT CURRENT_USER()").strip() == "root@localhost"
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(host=server.host, port=server.port, user="root", password="",
                        connect_timeout=10)
    with pytest.raises(RuntimeError, match="ERROR 1064"):
        server.sql("SELEC 1")


def test_tls(tls_server):
    assert tls_server.ca is not None
    ctx = ssl.create_default_context(cafile=str(tls_server.ca.pem))   # checks 127.0.0.1
    with connect(tls_server, ssl=ctx) as c, c.cursor() as cur:
        cur.execute("SHOW SESSION STATUS LIKE 'Ssl_version'")
        assert cur.fetchone()[1].startswith("TLSv1.")
    # this PyMySQL tries TLS by default (falling back to plaintext when the server has none)
    with connect(tls_server) as c, c.cursor() as cur:
        cur.execute("SHOW SESSION STATUS LIKE 'Ssl_version'")
        assert cur.fetchone()[1].startswith("TLSv1.")
    with connect(tls_server, ssl_disabled=True) as c, c.cursor() as cur:   # plaintext too
        cur.execute("SHOW SESSION STATUS LIKE 'Ssl_version'")
        assert cur.fetchone()[1] == ""


@pytest.mark.timeout(40)
def test_mtr_sample_passes_directly(server):
    results = server.mtr(MTR_SAMPLE, timeout=35)
    assert results == {t: "pass" for t in MTR_SAMPLE}, server.last_mtr_output[-3000:]
