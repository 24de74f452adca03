"""Live views: `agentgate tail` and `agentgate agents list` against running daemons."""
import json
import subprocess
import threading

from tests.support import BIN, pg_session, record_sessions, run_cli, wait_for


def collect(proc, lines):
    for line in proc.stdout:
        lines.append(line)


def test_tail_shows_new_events_as_they_arrive(collector, tmp_path):
    p = subprocess.Popen([str(BIN / "agentgate"), "--collector", collector.address, "tail", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    threading.Thread(target=collect, args=(p, lines), daemon=True).start()
    try:
        # the stream is up once an event shipped after starting it shows up
        def shipped_and_seen():
            record_sessions(tmp_path / f"spool{len(lines)}", collector.addr(), [pg_session(1)])
            return any('"session_end"' in line for line in lines)
        wait_for(shipped_and_seen, timeout=30, interval=0.2, what="tail output")
        ev = [json.loads(line) for line in lines]
        kinds = [e["kind"] for e in ev]
        assert "session_start" in kinds and "command" in kinds
        cmd = next(e for e in ev if e["kind"] == "command")
        assert cmd["target"] == "orders-db" and cmd["host"] == "build-1"
        assert cmd["fields"]["text"] == "SELECT 0 FROM orders"
    finally:
        p.terminate()
        p.wait(10)


def test_tail_filters_by_target(collector, tmp_path):
    p = subprocess.Popen([str(BIN / "agentgate"), "--collector", collector.address, "tail",
                          "--target", "billing-db"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    threading.Thread(target=collect, args=(p, lines), daemon=True).start()
    try:
        def shipped_and_seen():
            record_sessions(tmp_path / f"s{len(lines)}", collector.addr(),
                            [pg_session(1, target="orders-db"), pg_session(1, target="billing-db")])
            return any("session_end" in line for line in lines)
        wait_for(shipped_and_seen, timeout=30, interval=0.2, what="tail output")
        assert lines and all("billing-db" in line for line in lines)
    finally:
        p.terminate()
        p.wait(10)


def test_agents_list_shows_a_running_host_agent(collector, tmp_path):
    cfg = tmp_path / "hostagent.toml"
    cfg.write_text(f'host = "web-7"\nstate_dir = "{tmp_path}/state"\n'
                   f'[collector]\naddress = "{collector.address}"\n[intercept]\nenabled = false\n')
    r = run_cli("agents", "list", collector=collector)
    assert r.returncode == 0 and "no host agents" in r.stderr
    daemon_log = tmp_path / "daemon.log"
    p = subprocess.Popen([str(BIN / "agentgate-hostagent"), "serve", "--config", str(cfg)],
                         stdout=subprocess.DEVNULL, stderr=open(daemon_log, "w"), text=True)
    from tests.support import logs
    logs.watch_file(daemon_log)
    try:
        def listed():
            out = run_cli("agents", "list", "--json", collector=collector)
            return out.returncode == 0 and json.loads(out.stdout)
        (agent,) = wait_for(listed, what="host agent registration")
        assert agent["host"] == "web-7" and agent["online"] and "recording" in agent["capabilities"]
        table = run_cli("agents", "list", collector=collector).stdout
        assert "web-7" in table and "online" in table
        assert (tmp_path / "state" / "agent-id").read_text().strip() == agent["agent_id"]
    finally:
        p.terminate()
        assert p.wait(20) == 0, daemon_log.read_text()
