"""The host agent's config: protocols come from the registry, each target's options are
its protocol's, and a policy rule must be able to match a protocol of its targets. Every
mistake is one line naming the file and the target or rule, before anything runs."""
import subprocess

import pytest

from agentgate.tomlconfig import ConfigError
from hostagent.config import load_config
from tests.support import BIN

PG = '''
[[targets]]
name = "orders-db"
protocol = "{protocol}"
address = "127.0.0.1:5432"
{extra}
'''


def write(tmp_path, text: str, policy: str | None = None):
    cfg = tmp_path / "hostagent.toml"
    if policy is not None:
        (tmp_path / "policy.toml").write_text(policy)
        text = f'policy = "{tmp_path / "policy.toml"}"\n' + text
    cfg.write_text(text)
    return cfg


def error(tmp_path, text: str, policy: str | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(str(write(tmp_path, text, policy)))
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_a_known_protocol_gets_its_own_options(tmp_path):
    cfg = load_config(str(write(tmp_path, PG.format(protocol="postgres", extra='''
user = "app"
tls = "verify-full"
client_tls = "decline"
idle_timeout = 60'''))))
    (t,) = cfg.targets
    assert t.protocol == "postgres" and t.idle_timeout == 60.0
    assert t.options.user == "app" and t.options.tls == "verify-full"
    assert t.options.client_tls == "decline" and t.options.password_file is None


def test_an_unknown_protocol_is_refused_not_relayed(tmp_path):
    msg = error(tmp_path, PG.format(protocol="postgress", extra=""))
    assert "target 'orders-db'" in msg and "unknown protocol 'postgress'" in msg
    assert "postgres" in msg and "tcp" in msg          # what it could have been


def test_an_option_the_protocol_does_not_have_is_refused(tmp_path):
    msg = error(tmp_path, PG.format(protocol="postgres", extra='tsl = "require"'))
    assert "unknown option 'tsl' for protocol postgres" in msg and "tls" in msg
    msg = error(tmp_path, PG.format(protocol="tcp", extra='user = "app"'))
    assert "unknown option 'user' for protocol tcp" in msg
    msg = error(tmp_path, PG.format(protocol="postgres", extra='tls = "maybe"'))
    assert "'tls' must be disable, prefer, require or verify-full" in msg
    msg = error(tmp_path, PG.format(protocol="postgres",
                                    extra='password_file = "a"\npassword_env = "B"'))
    assert "not both" in msg


def test_a_target_must_name_its_protocol(tmp_path):
    msg = error(tmp_path, '[[targets]]\nname = "x"\naddress = "h:1"\n')
    assert "target 'x': a target needs 'protocol'" in msg and "tcp relays raw bytes" in msg


def test_a_rule_that_no_protocol_of_its_targets_can_match_is_refused(tmp_path):
    policy = '''
[[rules]]
name = "no-drop"
action = "deny"
targets = ["raw-*"]
statements = ["DROP"]
'''
    raw = '[[targets]]\nname = "raw-cache"\nprotocol = "tcp"\naddress = "h:6379"\n'
    msg = error(tmp_path, raw, policy)
    assert "rule 'no-drop'" in msg and "matcher 'statements'" in msg and "(tcp)" in msg
    # a rule that would only ever meet raw relays can never judge anything
    msg = error(tmp_path, raw, '[[rules]]\nname = "r"\naction = "deny"\ntargets = ["raw-*"]\n')
    assert "rule 'r': it can apply only to targets relayed raw (tcp)" in msg
    # the same rule is fine where it can apply to a PostgreSQL target
    ok = raw + PG.format(protocol="postgres", extra="").replace('"orders-db"', '"raw-db"')
    assert load_config(str(write(tmp_path, ok, policy))).targets[1].name == "raw-db"


def test_policy_matchers_are_checked_at_load(tmp_path):
    from hostagent.policy import load_policy
    path = tmp_path / "p.toml"
    path.write_text('[[rules]]\nname = "r"\naction = "deny"\ntabels = ["x"]\n')
    with pytest.raises(ConfigError, match="unknown matcher 'tabels'"):
        load_policy(str(path))
    path.write_text('[[rules]]\nname = "r"\naction = "deny"\nprotocols = ["tcp"]\n'
                    'tables = ["x"]\n')
    with pytest.raises(ConfigError, match="matcher 'tables' is supported by none"):
        load_policy(str(path))
    path.write_text('[[rules]]\nname = "r"\naction = "deny"\nprotocols = ["postgress"]\n')
    with pytest.raises(ConfigError, match="unknown protocol 'postgress'"):
        load_policy(str(path))


def test_the_daemon_refuses_a_typo_in_one_line(tmp_path):
    cfg = write(tmp_path, PG.format(protocol="postgress", extra=""))
    p = subprocess.run([str(BIN / "agentgate-hostagent"), "serve", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "unknown protocol 'postgress'" in p.stderr
    assert "Traceback" not in p.stderr


LISTENER = PG.format(protocol="postgres", extra='listen = "127.0.0.1:0"\n{allow}')


@pytest.mark.parametrize("allow,expect", [
    ('listen_allow = []', "'listen_allow' is empty, so nobody could connect"),
    ('listen_allow = "user:alice"', "'listen_allow' must be a list of entries like "
                                    '"user:alice", not str'),
    ('listen_allow = [1001]', 'entries are strings like "user:alice", not 1001'),
    ('listen_allow = ["alice"]', "listen_allow entry 'alice': start it with what it names: "
                                 "user:, uid:, group:, gid:, unit:"),
    ('listen_allow = ["usr:alice"]', "listen_allow entry 'usr:alice': start it with"),
    ('listen_allow = ["user:"]', "listen_allow entry 'user:': nothing after 'user:'"),
    ('listen_allow = ["uid:alice"]', "listen_allow entry 'uid:alice': a uid is a number "
                                     "(for a name, say user:)"),
    ('listen_allow = ["gid:-1"]', "listen_allow entry 'gid:-1': a gid is a number"),
    ('listen_allow = ["unit:ci-runner"]', "listen_allow entry 'unit:ci-runner': a unit's full "
                                          "name, ending in .service, .scope or .slice"),
    ('listen_allow = ["unit:a.slice/b.service"]', "a unit's full name"),
])
def test_listen_allow_is_checked_at_load_in_one_line(tmp_path, allow, expect):
    msg = error(tmp_path, LISTENER.format(allow=allow))
    assert "target 'orders-db'" in msg and expect in msg, msg


def test_listen_allow_needs_a_listener(tmp_path):
    msg = error(tmp_path, PG.format(protocol="postgres", extra='listen_allow = ["uid:0"]'))
    assert "target 'orders-db': 'listen_allow' is for a plain listener: give 'listen' too" in msg


def test_listen_allow_names_are_resolved_at_start_and_root_alone_is_the_default(tmp_path):
    from hostagent.intercept.loader import InterceptError
    from hostagent.proxy.targets import ROOT_ONLY, build_targets
    default = build_targets(load_config(str(write(tmp_path, LISTENER.format(allow="")))))
    assert default.targets[0].listen_allow is ROOT_ONLY
    assert ROOT_ONLY.entries == ("uid:0",)
    assert ROOT_ONLY.admits({"uid": 0}) == "uid:0" and ROOT_ONLY.admits({"uid": 1}) is None
    cfg = load_config(str(write(tmp_path, LISTENER.format(
        allow='listen_allow = ["user:nobody", "uid:1001", "group:root", " gid : 998 ", '
              '"unit:ci-runner.service", "unit:ci.slice"]'))))
    assert cfg.targets[0].listen_allow == [("user", "nobody"), ("uid", "1001"),
                                           ("group", "root"), ("gid", "998"),
                                           ("unit", "ci-runner.service"), ("unit", "ci.slice")]
    allow = build_targets(cfg).targets[0].listen_allow
    assert allow.uids == ((65534, "user:nobody"), (1001, "uid:1001"))
    assert allow.gids == ((0, "group:root"), (998, "gid:998"))
    assert allow.units == (("ci-runner.service", "unit:ci-runner.service"),
                           ("ci.slice", "unit:ci.slice"))
    for entry, what in (("user:no-such-user-x", "user"), ("group:no-such-group-x", "group")):
        cfg = load_config(str(write(tmp_path, LISTENER.format(
            allow=f'listen_allow = ["uid:0", "{entry}"]'))))
        with pytest.raises(InterceptError) as exc:
            build_targets(cfg)
        assert str(exc.value) == (f"target orders-db: listen_allow entry '{entry}': "
                                  f"no such {what} on this host")
