"""Collector start-up: config errors, the open (no token) mode, health checking."""
import subprocess

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentgate.client import open_channel
from tests.support import BIN


def start(tmp_path, config_text=None, *args):
    cmd = [str(BIN / "agentgate-collector"), "--database", str(tmp_path / "c.db")]
    if config_text is not None:
        cfg = tmp_path / "collector.toml"
        cfg.write_text(config_text)
        cmd += ["--config", str(cfg)]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=30)


def one_line_error(r, *fragments):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agentgate-collector: error:"), r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_open_mode_refuses_a_non_loopback_address(tmp_path):
    one_line_error(start(tmp_path, None, "--listen", "0.0.0.0:0"), "no tokens", "0.0.0.0:0")


def test_bad_configs_get_one_line_errors(tmp_path):
    one_line_error(start(tmp_path, "lisen = 'x'\n"), "unknown key 'lisen'")
    one_line_error(start(tmp_path, "listen = [\n"), "invalid TOML")
    one_line_error(start(tmp_path, '[[tokens]]\nname = "a"\nrole = "boss"\ntoken = "0123456789abcdefg"\n'),
                   "'role' must be one of")
    one_line_error(start(tmp_path, '[[tokens]]\nname = "a"\nrole = "admin"\ntoken = "short"\n'),
                   "too short")
    one_line_error(start(tmp_path, 'approval_ttl_seconds = "soon"\n'), "must be int")
    one_line_error(start(tmp_path, '[tls]\ncert = "/nonexistent.pem"\nkey = "/nonexistent.key"\n'),
                   "cannot read TLS key /nonexistent.key")
    r = subprocess.run([str(BIN / "agentgate-collector"), "--config", str(tmp_path / "missing.toml")],
                       capture_output=True, text=True, timeout=30)
    one_line_error(r, "no such file")


def test_health_service_answers_without_a_token(collector_factory):
    c = collector_factory('[[tokens]]\nname = "a"\nrole = "admin"\ntoken = "0123456789abcdefg"\n').start()
    stub = health_pb2_grpc.HealthStub(open_channel(c.addr()))
    for service in ("", "agentgate.v1.Ingest", "agentgate.v1.Approvals"):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    try:
        stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        raise AssertionError("unknown service reported healthy")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND


def test_example_configs_load():
    from collector.config import load_config as collector_config
    from hostagent.config import load_config as hostagent_config
    from tests.support import ROOT
    cfg = collector_config(str(ROOT / "examples" / "collector.toml"))
    cfg.validate()
    assert cfg.listen == "127.0.0.1:7421" and cfg.approval_ttl_s == 300
    h = hostagent_config(str(ROOT / "examples" / "hostagent.toml"))
    assert h.spool.fsync_interval_ms == 50 and not h.spool.strict
