#!/usr/bin/env python3
"""Ingest throughput: durable events/s through the real gRPC ingest into SQLite, beside
the raw ceiling (plain executemany into the same schema, same batch size, same
durability), and the whole host-agent path (spool append -> shipper -> collector).

    .venv/bin/python bench/ingest.py [--events 200000] [--batch 2000]
"""
from __future__ import annotations

import argparse
import asyncio
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentgate.client import CollectorAddress, open_aio_channel  # noqa: E402
from agentgate.events import GENESIS, make_event, pack_payload  # noqa: E402
from agentgate.wire import event_to_pb, pb, rpc  # noqa: E402
from collector.storage.sqlite import INSERT_EVENT, SCHEMA  # noqa: E402


def make_events(n: int, sessions: int):
    prev = {f"bench-{i:04d}": GENESIS for i in range(sessions)}
    sids = list(prev)
    out = []
    for i in range(n):
        sid = sids[i % sessions]
        seq = i // sessions + 1
        ev = make_event(sid, seq, time.time_ns(), i * 1000, "command",
                        pack_payload({"text": f"SELECT * FROM orders WHERE id = {i}",
                                      "database": "shop"}), prev[sid])
        prev[sid] = ev.hash
        out.append(ev)
    return out


def start_collector(tmp: Path, name: str) -> tuple[subprocess.Popen, str]:
    ready = tmp / f"{name}.ready"
    proc = subprocess.Popen([sys.executable, "-m", "collector.server", "--listen", "127.0.0.1:0",
                             "--database", str(tmp / f"{name}.db"), "--ready-file", str(ready),
                             "--log-level", "warning"], cwd=ROOT)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("collector did not start")
        time.sleep(0.05)
    return proc, ready.read_text().split()[0]


async def grpc_ingest(address: str, batches: list, window: int) -> float:
    channel = open_aio_channel(CollectorAddress(address))
    call = rpc.IngestStub(channel).Stream()
    sem = asyncio.Semaphore(window)
    acked = asyncio.Event()
    last = len(batches)

    async def receive():
        async for ack in call:
            sem.release()
            if ack.batch_id == last:
                acked.set()
                return

    t0 = time.perf_counter()
    rx = asyncio.create_task(receive())
    for b in batches:
        await sem.acquire()
        await call.write(b)
    await acked.wait()
    elapsed = time.perf_counter() - t0
    await call.done_writing()
    await rx
    await channel.close()
    return elapsed


def raw_ceiling(db: Path, events, batch: int) -> float:
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=FULL")
    c.executescript(SCHEMA)
    pks = {}
    for ev in events:
        if ev.session_id not in pks:
            pks[ev.session_id] = c.execute("INSERT INTO sessions (id) VALUES (?)",
                                           (ev.session_id,)).lastrowid
    # the same rows the collector stores, search text included
    rows = [(pks[e.session_id], e.seq, e.wall_time_ns, e.mono_ns, e.kind, e.payload,
             e.prev_hash, e.hash, e.fields().get("text")) for e in events]
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch):
        c.execute("BEGIN")
        c.executemany(INSERT_EVENT, rows[i:i + batch])
        c.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    c.close()
    return elapsed


async def spool_path(address: str, events, tmp: Path) -> tuple[float, float]:
    from hostagent.recording.shipper import Shipper
    from hostagent.recording.spool import Spool
    spool = Spool(tmp / "spool")
    shipper = Shipper(spool, CollectorAddress(address))
    task = asyncio.create_task(shipper.run())
    t0 = time.perf_counter()
    for i, ev in enumerate(events):
        spool.append(ev)
        if i % 5000 == 0:
            await asyncio.sleep(0)
    t_append = time.perf_counter() - t0
    assert await shipper.drain(300), shipper.last_error
    t_all = time.perf_counter() - t0
    task.cancel()
    spool.close()
    return t_append, t_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs")
    args = ap.parse_args()
    n = args.events
    print(f"preparing {n} events in {args.sessions} sessions ...", flush=True)
    events = make_events(n, args.sessions)
    batches = [pb.IngestBatch(batch_id=i // args.batch + 1,
                              events=[event_to_pb(e) for e in events[i:i + args.batch]])
               for i in range(0, n, args.batch)]
    with tempfile.TemporaryDirectory(prefix="agentgate-bench-") as d:
        tmp = Path(d)
        raw_runs, grpc_runs = [], []
        for i in range(args.repeat):   # best of N, each on a fresh database
            print(f"run {i + 1}/{args.repeat}: raw executemany into the collector schema ...",
                  flush=True)
            raw_runs.append(raw_ceiling(tmp / f"raw{i}.db", events, args.batch))
            proc, address = start_collector(tmp, f"collector{i}")
            try:
                print(f"run {i + 1}/{args.repeat}: gRPC ingest into a running collector ...",
                      flush=True)
                grpc_runs.append(asyncio.run(grpc_ingest(address, batches, args.window)))
                if i == args.repeat - 1:
                    print("host agent path: spool append -> shipper -> collector ...", flush=True)
                    events2 = [e.__class__("x" + e.session_id, *e.as_tuple()[1:]) for e in events]
                    t_append, t_all = asyncio.run(spool_path(address, events2, tmp))
            finally:
                proc.terminate()
                proc.wait()
        raw, grpc_s = min(raw_runs), min(grpc_runs)
    print()
    print(f"{'path':<44}{'events/s':>12}")
    print(f"{'raw ceiling (executemany, same schema)':<44}{n / raw:>12,.0f}")
    print(f"{'gRPC ingest, durable (acked)':<44}{n / grpc_s:>12,.0f}")
    print(f"{'spool append (crash-safe)':<44}{n / t_append:>12,.0f}")
    print(f"{'spool -> shipper -> collector, acked':<44}{n / t_all:>12,.0f}")
    print()
    print(f"best of {args.repeat}; ratio gRPC ingest / raw ceiling: {raw / grpc_s:.2f}  "
          f"(goals: >= 50,000 events/s and >= 0.5x)")


if __name__ == "__main__":
    main()
