import os
import subprocess
import sys
import textwrap

import pytest

from agentgate.events import SESSION_END, verify_chain
from hostagent.recording.recorder import SessionRecorder, close_orphans
from hostagent.recording.spool import Spool, SpoolError, SpoolFull


def read_all(spool):
    out, pos = [], spool.start()
    while True:
        evs, pos = spool.read(pos, 1000)
        if not evs:
            return out
        out.extend(evs)


def test_round_trip_across_segments(tmp_path):
    spool = Spool(tmp_path, segment_bytes=4096)
    rec = SessionRecorder(spool)
    for i in range(500):
        rec.record("command", {"text": f"SELECT {i}"})
    assert spool.segment_count() > 5
    evs = read_all(spool)
    assert [e.seq for e in evs] == list(range(1, 501))
    assert verify_chain(evs).ok
    spool.close()


def test_torn_tail_is_cut_and_the_rest_recovered(tmp_path):
    spool = Spool(tmp_path)
    rec = SessionRecorder(spool)
    for i in range(10):
        rec.record("command", {"text": f"q{i}"})
    path = spool._active.path
    spool.close()
    with open(path, "ab") as fh:   # a crash in the middle of a frame
        fh.write(b"\x40\x00\x00\x00\x12\x34")
    spool = Spool(tmp_path)
    evs = read_all(spool)
    assert [e.seq for e in evs] == list(range(1, 11))
    assert spool.tails[rec.session_id][:2] == (10, rec.prev_hash)
    # and the chain goes on where it stopped
    SessionRecorder.resume(spool, rec.session_id).record("command", {"text": "q10"})
    assert verify_chain(read_all(spool)).ok
    spool.close()


def test_append_survives_sigkill(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        from hostagent.recording.spool import Spool
        from hostagent.recording.recorder import SessionRecorder
        spool = Spool({str(tmp_path)!r}, fsync_interval=3600)  # no fsync will have happened
        rec = SessionRecorder(spool, "s1")
        for i in range(2000):
            rec.record("command", {{"text": f"q{{i}}"}})
        print("appended", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == -9 and "appended" in p.stdout
    spool = Spool(tmp_path)
    evs = read_all(spool)
    assert len(evs) == 2000 and verify_chain(evs).ok
    spool.close()


def test_cap_refuses_with_a_clear_error_and_frees_after_ack(tmp_path):
    spool = Spool(tmp_path, max_bytes=8192, segment_bytes=2048)
    rec = SessionRecorder(spool)
    with pytest.raises(SpoolFull, match="spool full"):
        for i in range(10_000):
            rec.record("command", {"text": f"SELECT {i}"})
    appended = rec.seq
    assert spool.bytes_used() <= 8192
    assert len(read_all(spool)) == appended          # nothing dropped, nothing torn
    spool.ack(rec.session_id, appended)
    assert spool.release() >= 1                       # rotated segments, all acked
    rec.record("command", {"text": "fits again"})
    spool.close()


def test_release_deletes_only_fully_acked_segments(tmp_path):
    spool = Spool(tmp_path, segment_bytes=1024)
    a, b = SessionRecorder(spool, "a"), SessionRecorder(spool, "b")
    for i in range(60):
        (a if i % 2 else b).record("command", {"text": f"{i:040d}"})
    n = spool.segment_count()
    spool.ack("a", a.seq)                 # b still unacked everywhere
    assert spool.release() == 0 and spool.segment_count() == n
    spool.ack("b", 5)
    spool.release()
    remaining = read_all(spool)
    assert {e.seq for e in remaining if e.session_id == "b"} >= set(range(6, b.seq + 1))
    a.record(SESSION_END, {"reason": "done"})
    b.record(SESSION_END, {"reason": "done"})
    spool.ack("a", a.seq)
    spool.ack("b", b.seq)
    spool.release()
    assert spool.segment_count() == 1     # only the active segment is left
    spool.rotate_if_acked()
    spool.release()
    assert spool.bytes_used() == 0
    spool.close()


def test_open_sessions_survive_the_release_of_their_segments(tmp_path):
    """So a host agent that dies mid-session can still end it after a restart."""
    spool = Spool(tmp_path, segment_bytes=1024)
    live, done = SessionRecorder(spool, "live"), SessionRecorder(spool, "done")
    live.record("command", {"text": "SELECT 1"})
    for i in range(40):
        done.record("command", {"text": f"{i:040d}"})
    done.record(SESSION_END, {"reason": "done"})
    spool.ack("live", live.seq)
    spool.ack("done", done.seq)
    spool.release()
    spool.rotate_if_acked()
    spool.release()
    assert spool.segment_count() == 1     # all acked: only the new active one is left...
    spool.close()
    spool = Spool(tmp_path)               # ...and its checkpoint still knows "live" is open
    assert close_orphans(spool) == ["live"]
    evs = read_all(spool)
    assert [(e.session_id, e.seq, e.kind) for e in evs] == [("live", 2, SESSION_END)]
    assert evs[0].prev_hash == live.prev_hash
    spool.close()


@pytest.mark.parametrize("budget", [1, 100, 333, 1024, 5000, 1 << 20])
def test_reads_never_skip_whatever_the_byte_budget(tmp_path, budget):
    spool = Spool(tmp_path, segment_bytes=1024)
    rec = SessionRecorder(spool)
    for _ in range(200):
        rec.record("command", {"text": "x" * 50})
    pos, got = spool.start(), []
    while True:
        evs, pos = spool.read(pos, 7, budget)
        if not evs:
            break
        got += [e.seq for e in evs]
    assert got == list(range(1, 201))
    spool.close()


def test_an_event_too_big_to_ship_is_refused(tmp_path):
    spool = Spool(tmp_path)
    with pytest.raises(SpoolError, match="larger than"):
        SessionRecorder(spool).record("data", {"data": b"x" * (33 << 20)})
    spool.close()


def test_one_process_per_spool(tmp_path):
    spool = Spool(tmp_path)
    with pytest.raises(SpoolError, match="in use by another process"):
        Spool(tmp_path)
    spool.close()


def test_strict_mode_returns_after_fsync(tmp_path):
    spool = Spool(tmp_path, strict=True, fsync_interval=3600)
    SessionRecorder(spool).record("command", {"text": "x"})
    assert spool.wait_durable(timeout=0)      # already covered, no waiting
    spool.close()
    lazy = Spool(tmp_path / "lazy", fsync_interval=0.002)
    SessionRecorder(lazy).record("command", {"text": "x"})
    assert lazy.wait_durable(timeout=10)      # group commit catches up by itself
    lazy.close()


def test_close_orphans_ends_open_sessions_on_the_same_chain(tmp_path):
    spool = Spool(tmp_path)
    open_rec, done_rec = SessionRecorder(spool, "open"), SessionRecorder(spool, "done")
    open_rec.record("command", {"text": "q"})
    done_rec.record(SESSION_END, {"reason": "client closed"})
    spool.close()
    spool = Spool(tmp_path)
    assert close_orphans(spool) == ["open"]
    evs = [e for e in read_all(spool) if e.session_id == "open"]
    assert evs[-1].kind == SESSION_END and evs[-1].fields()["reason"] == "hostagent_restart"
    assert verify_chain(evs).ok
    spool.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")
def test_full_disk_fails_cleanly_and_loses_nothing(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        spool = Spool(mnt, max_bytes=1 << 30, segment_bytes=1 << 20)
        try:
            rec = SessionRecorder(spool)
            with pytest.raises(SpoolError, match="No space left"):
                for i in range(100_000):
                    rec.record("command", {"text": f"SELECT {i:060d}"})
            written = rec.seq
        finally:
            spool.close()
        spool = Spool(mnt)  # every acknowledged append is there, intact
        evs = read_all(spool)
        assert len(evs) == written and verify_chain(evs).ok
        spool.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_frames_as_stored_for_the_shipper(tmp_path):
    """read_frames gives the frames as they lie in the segments (checkpoints among them,
    skipped by whoever decodes), within its byte and frame budgets, a frame bigger than
    the whole budget alone; what it gives decodes to exactly what read() gives."""
    from agentgate.frames import iter_frames
    spool = Spool(tmp_path, segment_bytes=4096)
    open_session = SessionRecorder(spool)
    open_session.record("command", {"text": "still open"})   # checkpoints name it
    rec = SessionRecorder(spool)
    for i in range(300):
        rec.record("command", {"text": f"SELECT {i}"})
    rec.record("output", {"blob": "x" * 10_000})               # bigger than the budget
    got, pos, batches = [], spool.start(), 0
    while True:
        data, count, pos = spool.read_frames(pos, max_bytes=2000, max_frames=50)
        if not count:
            break
        batches += 1
        frames = list(iter_frames(data))
        assert len(frames) == count and frames[-1][0] == len(data)
        assert count <= 50 and (len(data) <= 2000 or count == 1)
        got += [ev for _, ev in frames if not isinstance(ev, dict)]
    assert batches > 10
    assert [(e.session_id, e.seq, e.hash) for e in got] == \
        [(e.session_id, e.seq, e.hash) for e in read_all(spool)]
    assert any(len(e.payload) > 2000 for e in got)
    spool.close()
