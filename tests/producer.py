"""A host agent's recording side in a process of its own, for crash/restart tests.

Records `--total` numbered commands (text "cmd N") over `--sessions` sessions through a
real spool + shipper, printing "appended N" as it goes, then ends the sessions, waits
for every ack and prints "drained". With --resume it first ends the sessions a killed
run left open, and numbers from --first.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time

from agentgate.client import CollectorAddress
from agentgate.events import SESSION_END, SESSION_START
from hostagent.recording.recorder import SessionRecorder, close_orphans
from hostagent.recording.shipper import Shipper
from hostagent.recording.spool import Spool


async def main(args) -> None:
    spool = Spool(args.spool, segment_bytes=args.segment_bytes)
    if args.resume:
        close_orphans(spool)
    shipper = Shipper(spool, CollectorAddress(args.collector), backoff_min=0.05, backoff_max=0.3,
                      batch_events=500)
    task = asyncio.create_task(shipper.run())
    recs = [SessionRecorder(spool) for _ in range(args.sessions)]
    for r in recs:
        r.record(SESSION_START, {"host": "producer", "target": "db", "protocol": "postgres"})
    t0 = time.monotonic()
    for n in range(args.first, args.first + args.total):
        recs[n % len(recs)].record("command", {"text": f"cmd {n}"})
        if n % args.chunk == 0:
            print(f"appended {n}", flush=True)
            # pace the run so a test can kill something in the middle of it
            await asyncio.sleep(max(0.0, t0 + (n - args.first) / args.rate - time.monotonic()))
    for r in recs:
        r.record(SESSION_END, {"reason": "done"})
    print(f"appended {args.first + args.total - 1}", flush=True)
    ok = await shipper.drain(120)
    print("drained" if ok else f"not drained: {shipper.last_error}", flush=True)
    task.cancel()
    spool.close()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--spool", required=True)
    ap.add_argument("--collector", required=True)
    ap.add_argument("--total", type=int, default=20_000)
    ap.add_argument("--first", type=int, default=1)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--rate", type=float, default=8000.0, help="commands per second")
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--segment-bytes", type=int, default=64 << 10)
    ap.add_argument("--resume", action="store_true")
    asyncio.run(main(ap.parse_args()))
