"""sessions list/show/replay/export/verify through the real CLI and collector."""
import base64
import json

from agentgate.events import Event, verify_chain
from tests.support import pg_session, record_sessions, run_cli


def ship(collector, tmp_path, *sessions):
    return record_sessions(tmp_path / "spool", collector.addr(), list(sessions))


def test_list_show_and_filters(collector, tmp_path):
    a, b = ship(collector, tmp_path, pg_session(2, target="orders-db", user="alice"),
                pg_session(1, target="billing-db", user="bob", host="build-2"))
    r = run_cli("sessions", "list", collector=collector)
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert header.split()[:3] == ["ID", "STARTED", "HOST"] and len(rows) == 2
    assert rows[0].startswith(b) and rows[1].startswith(a)   # newest first

    r = run_cli("sessions", "list", "--json", collector=collector)
    items = json.loads(r.stdout)
    by_id = {s["id"]: s for s in items}
    assert by_id[a]["target"] == "orders-db" and by_id[a]["commands"] == 2
    assert by_id[a]["events"] == 1 + 2 * 3 + 2 and by_id[a]["end_reason"] == "client closed"
    assert by_id[a]["process"]["exe"] == "/usr/bin/psql" and "alice" in by_id[a]["agent"]

    def ids(*args):
        out = run_cli("sessions", "list", "--json", *args, collector=collector)
        assert out.returncode == 0, out.stderr
        return {s["id"] for s in json.loads(out.stdout)}

    assert ids("--target", "billing-db") == {b}
    assert ids("--host", "build-1") == {a}
    assert ids("--agent", "bob") == {b}
    assert ids("--protocol", "mysql") == set()
    assert ids("--text", "SELECT 1 FROM") == {a}
    assert ids("--since", "1h") == {a, b}
    assert ids("--until", "1h") == set()

    r = run_cli("sessions", "show", a, collector=collector)
    assert r.returncode == 0 and "orders-db" in r.stdout and "SELECT 1 FROM orders" in r.stdout
    shown = json.loads(run_cli("sessions", "show", a, "--json", collector=collector).stdout)
    assert [e["seq"] for e in shown["events"]] == list(range(1, 10))
    assert shown["events"][0]["kind"] == "session_start"


def test_replay_export_and_verify(collector, tmp_path):
    (sid,) = ship(collector, tmp_path, pg_session(3))
    r = run_cli("sessions", "replay", sid, "--speed", "0", collector=collector)
    assert r.returncode == 0, r.stderr
    assert "command: SELECT 2 FROM orders" in r.stdout
    assert "hello from the terminal" in r.stdout     # terminal data written as it was
    assert "output: SELECT 1 (0.42 ms; masked pii:column=1)" in r.stdout
    sample = r.stdout.splitlines()
    at = sample.index(next(ln for ln in sample if ln.strip().startswith("id | email")))
    assert sample[at + 2].split() == ["0", "|", "****"]      # the first command's row
    assert r.stdout.index("SELECT 0") < r.stdout.index("SELECT 2") < r.stdout.index("session_end")

    out = tmp_path / "export.jsonl"
    r = run_cli("sessions", "export", sid, "--format", "jsonl", "-o", str(out), collector=collector)
    assert r.returncode == 0 and "exported 12 events" in r.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[1]["fields"]["text"] == "SELECT 0 FROM orders"
    # the export alone is enough to re-verify the chain
    events = [Event(x["session_id"], x["seq"], x["wall_time_ns"], x["mono_ns"], x["kind"],
                    base64.b64decode(x["payload_b64"]), bytes.fromhex(x["prev_hash"]),
                    bytes.fromhex(x["hash"])) for x in lines]
    assert verify_chain(events).ok

    r = run_cli("sessions", "verify", sid, collector=collector)
    assert r.returncode == 0 and "chain intact" in r.stdout and "12 events" in r.stdout


def test_verify_fails_after_a_row_is_edited(collector, tmp_path):
    (sid,) = ship(collector, tmp_path, pg_session(3))
    assert run_cli("sessions", "verify", sid, collector=collector).returncode == 0
    with collector.db() as c:
        c.execute("UPDATE events SET payload = ? WHERE seq = 5 AND session_pk = "
                  "(SELECT pk FROM sessions WHERE id = ?)", (b"\x81\xa4text\xa4oops", sid))
    r = run_cli("sessions", "verify", sid, collector=collector)
    assert r.returncode == 1
    assert "BROKEN at seq 5" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_verify_fails_when_an_event_is_deleted(collector, tmp_path):
    (sid,) = ship(collector, tmp_path, pg_session(3))
    with collector.db() as c:
        c.execute("DELETE FROM events WHERE seq = 4")
    r = run_cli("sessions", "verify", sid, collector=collector)
    assert r.returncode == 1 and "seq 4 missing" in r.stderr


def test_errors_are_one_line_with_meaningful_exit_codes(collector, tmp_path):
    r = run_cli("sessions", "show", "no-such-session", collector=collector)
    assert r.returncode == 1 and r.stderr.strip() == "agentgate: error: no session no-such-session"
    for cmd in (["sessions", "verify", "nope"], ["sessions", "export", "nope"],
                ["sessions", "replay", "nope"]):
        r = run_cli(*cmd, collector=collector)
        assert r.returncode == 1 and "no session nope" in r.stderr, cmd
    collector.stop()
    for cmd in (["sessions", "list"], ["sessions", "show", "x"], ["agents", "list"],
                ["approvals", "list"], ["tail"]):
        r = run_cli(*cmd, collector=collector)
        assert r.returncode == 3, (cmd, r.stderr)
        assert r.stderr.startswith("agentgate: error: cannot reach the collector")
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = run_cli("sessions", "list", "--since", "yesterday-ish", collector=collector)
    assert r.returncode == 2 and "15m" in r.stderr
