#!/usr/bin/env python3
"""Interception cost, in one run: connect + one 64-byte round trip, and bulk throughput,
from a process enrolled with `agentgate run` (eBPF redirect -> proxy -> upstream, every
byte recorded in the spool) vs the same process not enrolled. Needs root.

    .venv/bin/python bench/connect.py [--connects 2000] [--bulk-mib 256]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "bench" / "connect_client.py"
BIN = Path(sys.executable).parent


def serve(sock: socket.socket, handler) -> None:
    def loop():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()


def echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def sink(conn: socket.socket) -> None:
    with conn:
        total = 0
        while data := conn.recv(1 << 20):
            total += len(data)
        conn.sendall(b"done")


def run(cmd: list[str]) -> dict:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connects", type=int, default=2000)
    ap.add_argument("--bulk-mib", type=int, default=256)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/connect.py needs root (it loads BPF programs)")
    e = socket.create_server(("127.0.0.1", 0), backlog=1024)
    k = socket.create_server(("127.0.0.1", 0))
    serve(e, echo)
    serve(k, sink)
    eport, kport = e.getsockname()[1], k.getsockname()[1]
    client = ["/usr/bin/python3", str(CLIENT), "127.0.0.1", str(eport), str(kport),
              str(args.connects), str(args.bulk_mib)]
    with tempfile.TemporaryDirectory(prefix="agentgate-bench-") as d:
        ready = Path(d) / "ready"
        coll = subprocess.Popen([str(BIN / "agentgate-collector"), "--listen", "127.0.0.1:0",
                                 "--database", f"{d}/c.db", "--ready-file", str(ready),
                                 "--log-level", "warning"], stderr=subprocess.DEVNULL)
        while not ready.exists():
            time.sleep(0.05)
        cfg = Path(d) / "hostagent.toml"
        cfg.write_text(f'''state_dir = "{d}/state"
[collector]
address = "{ready.read_text().split()[0]}"
[intercept]
tree = "agentgate-bench"
socket = "{d}/none.sock"
[spool]
max_bytes = {4 << 30}
[[targets]]
name = "echo"
protocol = "tcp"
address = ["127.0.0.1:{eport}", "127.0.0.1:{kport}"]
''')
        try:
            print(f"direct: {args.connects} connects + round trips, {args.bulk_mib} MiB bulk ...",
                  flush=True)
            direct = run(client)
            print("enrolled (agentgate run, raw TCP relay recording every byte) ...", flush=True)
            enrolled = run([str(BIN / "agentgate"), "run", "--config", str(cfg), "--"] + client)
        finally:
            coll.terminate()
            coll.wait()
            subprocess.run([str(BIN / "agentgate-hostagent"), "cleanup", "--config", str(cfg)],
                           capture_output=True)
    print()
    print(f"{'':<34}{'direct':>12}{'enrolled':>12}{'ratio':>8}")
    print(f"{'connect + 64 B round trip (us)':<34}{direct['connect_rtt_us']:>12.1f}"
          f"{enrolled['connect_rtt_us']:>12.1f}{enrolled['connect_rtt_us'] / direct['connect_rtt_us']:>8.2f}")
    print(f"{'bulk throughput (MiB/s)':<34}{direct['bulk_mib_s']:>12.0f}"
          f"{enrolled['bulk_mib_s']:>12.0f}{enrolled['bulk_mib_s'] / direct['bulk_mib_s']:>8.2f}")


if __name__ == "__main__":
    main()
