"""caching_sha2_password's full path through the proxy (MariaDB 10.11 has no server
plugin for it): upstream, a fake MySQL 8 that speaks it faithfully (tests/mysql_fake.py);
towards the agent, a client that insists on the plugin."""
import json
import os

import pytest

from tests.hostagent.protocols.mysql.test_proxy import make, run_py  # noqa: F401
from tests.mysql_fake import FakeMySQL
from tests.mysql_server import MariaDbServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF interception needs root")


@pytest.fixture(scope="module")
def db():   # (make's fixture wants one; these tests' target is the fake)
    server = MariaDbServer().start()
    yield server
    server.stop()


@pytest.fixture
def fake():
    with FakeMySQL() as f:
        yield f


def target(tmp_path, fake, extra: str = "") -> str:
    secret = tmp_path / "fake-password"
    secret.write_text("app-secret-pw\n")
    return f'''[[targets]]
name = "mysql8"
protocol = "mysql"
address = "127.0.0.1:{fake.port}"
user = "app"
password_file = "{secret}"
tls = "disable"
{extra}'''


AGENT = '''
import json, mysql.connector
out = []
for i in range(2):
    try:
        cn = mysql.connector.connect(host="127.0.0.1", port={port}, user="x", password="y",
                                     use_pure=True, auth_plugin="caching_sha2_password",
                                     ssl_disabled=True)
        k = cn.cursor()
        k.execute("SELECT 1")
        out.append(k.fetchall()[0][0])
        cn.close()
    except mysql.connector.Error as e:
        out.append([e.errno, e.msg])
print(json.dumps(out))
'''


def test_the_full_path_with_the_pinned_key_then_the_fast_path(make, fake, tmp_path):
    key = tmp_path / "server.pem"
    key.write_bytes(fake.public_pem)
    h = make(target=target(tmp_path, fake, f'server_public_key = "{key}"'))
    p = run_py(h, AGENT.format(port=fake.port))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[-1]) == [1, 1]
    logins = [lg for lg in fake.logins if lg.ok]
    assert [lg.path for lg in logins] == ["full-rsa", "fast"]
    assert not any(lg.key_requested for lg in fake.logins)   # the pinned key was used
    assert all(lg.user == "app" for lg in logins)
    auths = [f for s in h.sessions("mysql") for k, f in s["events"] if k == "auth"]
    assert sorted(a["path"] for a in auths) == ["fast", "rsa"]
    assert next(a for a in auths if a["path"] == "rsa")["server_key"] == "pinned"


@pytest.mark.log_allows(r"refus|weak_password_auth")
def test_a_key_the_server_sends_is_used_only_when_weak_auth_is_allowed(make, fake, tmp_path):
    h = make(target=target(tmp_path, fake))
    p = run_py(h, AGENT.format(port=fake.port))
    assert p.returncode == 0, p.stderr
    errno, msg = json.loads(p.stdout.splitlines()[-1])[0]
    assert "weak_password_auth" in msg, msg
    assert not any(lg.ok for lg in fake.logins)      # no password went to the "server"
    allowing = make(target=target(tmp_path, fake, 'weak_password_auth = "allow"'))
    p = run_py(allowing, AGENT.format(port=fake.port))
    assert json.loads(p.stdout.splitlines()[-1]) == [1, 1], p.stderr
    assert [lg.path for lg in fake.logins if lg.ok] == ["full-rsa", "fast"]
    assert any(lg.key_requested for lg in fake.logins)
