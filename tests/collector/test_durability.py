"""Crash and restart in the middle of a 20,000-event run: nothing lost, nothing twice."""
import re
import subprocess
import sys
import threading

from agentgate.events import GENESIS, Event, verify_chain
from tests.support import ROOT, wait_for

TOTAL = 20_000


class Producer:
    def __init__(self, spool, collector, *extra):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.producer", "--spool", str(spool), "--collector",
             collector.address, "--total", str(TOTAL), *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.appended = 0
        self.lines = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.strip())
            m = re.match(r"appended (\d+)", line)
            if m:
                self.appended = int(m.group(1))

    def wait(self, timeout=120):
        rc = self.proc.wait(timeout)
        assert rc == 0, f"producer failed: {self.lines[-3:]} {self.proc.stderr.read()[-2000:]}"


def stored(collector):
    """session -> list of (seq, kind, text)"""
    with collector.db() as c:
        rows = c.execute("SELECT s.id, e.seq, e.kind, e.text, e.wall_ns, e.mono_ns, e.payload, "
                         "e.prev_hash, e.hash FROM events e JOIN sessions s ON s.pk = e.session_pk "
                         "ORDER BY s.id, e.seq").fetchall()
    out = {}
    for sid, seq, kind, text, wall, mono, payload, prev, h in rows:
        out.setdefault(sid, []).append(Event(sid, seq, wall, mono, kind, bytes(payload),
                                             bytes(prev), bytes(h)))
    return out


def check_complete(collector, expect_numbers):
    sessions = stored(collector)
    numbers = []
    for sid, evs in sessions.items():
        assert [e.seq for e in evs] == list(range(1, len(evs) + 1)), f"gap in {sid}"
        assert evs[0].prev_hash == GENESIS
        report = verify_chain(evs)
        assert report.ok, report.problem
        assert evs[-1].kind == "session_end"
        numbers += [int(e.fields()["text"].split()[1]) for e in evs if e.kind == "command"]
    assert len(numbers) == len(set(numbers)), "an event was stored twice"
    assert set(numbers) >= expect_numbers
    return sessions


def test_collector_sigkill_mid_run_loses_nothing(collector, tmp_path):
    prod = Producer(tmp_path / "spool", collector)
    wait_for(lambda: prod.appended >= TOTAL // 3, what="a third of the run")
    collector.kill()
    with collector.db() as c:
        (before,) = c.execute("SELECT count(*) FROM events").fetchone()
    assert 0 < before < TOTAL, "the kill must land in the middle of the run"
    wait_for(lambda: prod.appended >= TOTAL * 2 // 3, what="more appends while the collector is down")
    collector.restart()
    prod.wait()
    check_complete(collector, set(range(1, TOTAL + 1)))
    # acked segments were deleted: only the active one is left
    assert len(list((tmp_path / "spool").glob("seg-*.log"))) == 1


def test_host_agent_sigkill_mid_run_loses_nothing(collector, tmp_path):
    spool = tmp_path / "spool"
    first = Producer(spool, collector)
    wait_for(lambda: first.appended >= TOTAL // 2, what="half of the run")
    first.proc.kill()
    first.proc.wait()
    done = first.appended          # appends known to have returned before the kill
    assert 0 < done < TOTAL
    # The restarted host agent ships what the killed one spooled, ends its orphaned
    # sessions, and records the rest of the run (numbered apart, to tell them from
    # commands the first run appended after its last progress line).
    rest = TOTAL - done
    second = Producer(spool, collector, "--resume", "--first", "1000001", "--total", str(rest))
    second.wait()
    sessions = check_complete(collector, set(range(1, done + 1)) | set(range(1000001, 1000001 + rest)))
    reasons = {evs[-1].fields()["reason"] for evs in sessions.values()}
    assert reasons == {"done", "hostagent_restart"}


def test_reconnect_skips_acked_events_without_stalling(collector, tmp_path):
    """After a reconnect the shipper reads past what was acked at once, not once per
    housekeeping period."""
    import asyncio
    from hostagent.recording.recorder import SessionRecorder
    from hostagent.recording.shipper import Shipper
    from hostagent.recording.spool import Spool

    spool = Spool(tmp_path / "spool", segment_bytes=4096)

    async def go():
        shipper = Shipper(spool, collector.addr(), batch_events=20, housekeeping=3600,
                          backoff_min=0.05, backoff_max=0.1)
        task = asyncio.create_task(shipper.run())
        rec = SessionRecorder(spool)
        for i in range(500):
            rec.record("command", {"text": f"cmd {i}"})
        assert await shipper.drain(30)
        collector.kill()
        collector.restart()               # the stream breaks; everything so far is acked
        rec.record("command", {"text": "after the reconnect"})
        ok = await shipper.drain(20)      # would take an hour per acked chunk if it stalled
        task.cancel()
        return ok

    try:
        assert asyncio.run(go())
    finally:
        spool.close()
    with collector.db() as c:
        assert c.execute("SELECT count(*) FROM events").fetchone() == (501,)
