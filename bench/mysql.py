#!/usr/bin/env python3
"""MySQL (MariaDB) through agentgate, in one run, against direct access to the same server
(tests/mysql_server.py: Debian's MariaDB 10.11 on loopback): sysbench's oltp_read_only
and oltp_read_write, each with server-side prepared statements (--db-ps-mode=auto: the
binary protocol) and as text queries (--db-ps-mode=disable); 2 tables of 10,000 rows,
4 threads.

agentgate parses, judges (bench/pg.py's policy) and records every statement, in the
"host" configuration of bench/pg.py: the host agent alone, its shipper sending to a
collector that acks and discards (bench/discard.py). It logs in to MariaDB as `app`
itself (password_file); sysbench's own credentials go to the proxy. Each run is one
sysbench (`agentgate run --config CFG -- sysbench ...`: its BPF start-up is outside the
interval sysbench times), one each, direct first. Prints tps, average latency and the
agentgate/direct ratio per workload, or with --json one object. A failed run is reported
in one line on stderr (exit status 1); with --direct-only agentgate is not run.
Needs root and sysbench.

    .venv/bin/python bench/mysql.py [--seconds 10] [--threads 4] [--direct-only] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import discard  # noqa: E402
from bench.pg import BIN, POLICY  # noqa: E402
from tests.mysql_server import MariaDbServer  # noqa: E402

SYSBENCH = "/usr/bin/sysbench"
TREE = "agentgate-mysqlbench"
RUN_AS = "nobody"    # sysbench runs unprivileged, direct and under agentgate alike
WORKLOADS = [(f"{script.removeprefix('oltp_')}_{mode}", script, ps)
             for script in ("oltp_read_only", "oltp_read_write")
             for mode, ps in (("prepared", "auto"), ("text", "disable"))]


class RunFailed(Exception):
    """One line: what failed and its last words."""


def _last_words(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def sysbench(prefix: list[str], script: str, port: int, *, action: str = "run",
             ps_mode: str = "auto", seconds: int = 10, threads: int = 4,
             timeout: float | None = None) -> dict:
    cmd = prefix + [SYSBENCH, script, "--mysql-host=127.0.0.1", f"--mysql-port={port}",
                    "--mysql-user=app", "--mysql-password=app-secret-pw", "--mysql-db=shop",
                    "--mysql-ssl=off", "--tables=2", "--table-size=10000",
                    f"--threads={threads}", f"--time={seconds}", f"--db-ps-mode={ps_mode}",
                    action]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                           timeout=timeout or seconds + 120)
    except subprocess.TimeoutExpired:
        raise RunFailed(f"timed out: {' '.join(cmd)}") from None
    if p.returncode != 0:
        raise RunFailed(f"exit {p.returncode}: {_last_words(p.stderr + p.stdout)}")
    if action != "run":
        return {}
    try:
        tps = float(re.search(r"transactions:\s+\d+\s+\(([\d.]+) per sec", p.stdout).group(1))
        qps = float(re.search(r"queries:\s+\d+\s+\(([\d.]+) per sec", p.stdout).group(1))
        lat = float(re.search(r"avg:\s+([\d.]+)", p.stdout).group(1))
        errors = int(re.search(r"ignored errors:\s+(\d+)", p.stdout).group(1))
    except AttributeError:
        raise RunFailed(f"no statistics in sysbench's output: {_last_words(p.stdout + p.stderr)}"
                        ) from None
    if tps <= 0:
        raise RunFailed(f"no transactions: {_last_words(p.stderr + p.stdout)}")
    return {"tps": tps, "qps": qps, "latency_ms": lat, "ignored_errors": errors}


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="agentgate-mysqlbench-"))
        os.chmod(self.tmp, 0o755)
        self.db: MariaDbServer | None = None
        self.discard = None
        self.configs: list[Path] = []
        self.failures: list[str] = []

    def start(self) -> None:
        try:
            self.db = MariaDbServer().start()
        except RuntimeError as exc:
            raise SystemExit(f"bench/mysql.py: MariaDB did not start: {exc}") from None
        self.say("sysbench prepare (direct): 2 tables x 10,000 rows")
        try:
            sysbench([], "oltp_read_write", self.db.port, action="prepare",
                     threads=2, timeout=300)
        except RunFailed as exc:
            raise SystemExit(f"bench/mysql.py: sysbench prepare failed: {exc}") from None
        self.discard, self.discard_address, self.discarded = discard.start()
        secret = self.tmp / "pw"
        secret.write_text("app-secret-pw\n")
        secret.chmod(0o600)

    def config(self, name: str) -> Path:
        policy = self.tmp / f"policy-{name}.toml"
        policy.write_text(POLICY)
        cfg = self.tmp / f"hostagent-{name}.toml"
        cfg.write_text(f"""policy = "{policy}"
state_dir = "{self.tmp}/state-{name}"
[collector]
address = "{self.discard_address}"
[spool]
max_bytes = {8 << 30}
[intercept]
tree = "{TREE}"
socket = "{self.tmp}/none.sock"
[[targets]]
name = "shop-db"
protocol = "mysql"
address = "127.0.0.1:{self.db.port}"
user = "app"
password_file = "{self.tmp}/pw"
tls = "disable"
""")
        self.configs.append(cfg)
        return cfg

    def run(self) -> dict:
        a = self.args
        direct = ["runuser", "-u", RUN_AS, "--"]
        agentgate = None if a.direct_only else \
            [str(BIN / "agentgate"), "run", "--config", str(self.config("host")),
             "--user", RUN_AS, "--"]
        out: dict = {}
        for key, script, ps in WORKLOADS:
            row = out[key] = {}
            for who, prefix in (("direct", direct), ("agentgate", agentgate)):
                if prefix is None:
                    continue
                self.say(f"{key}: {who}")
                try:
                    row[who] = sysbench(prefix, script, self.db.port, ps_mode=ps,
                                        seconds=a.seconds, threads=a.threads)
                except RunFailed as exc:
                    if str(exc) not in self.failures:   # one line per distinct failure
                        print(f"bench/mysql.py: {key} ({who}) failed: {exc}", file=sys.stderr,
                              flush=True)
                    self.failures.append(str(exc))
            if "direct" in row and "agentgate" in row:
                row["ratio"] = round(row["agentgate"]["tps"] / row["direct"]["tps"], 3)
        return out

    def stop(self) -> None:
        if self.discard:
            self.discard.stop(0)
        if self.db:
            self.db.stop()
        for cfg in self.configs[:1]:
            subprocess.run([str(BIN / "agentgate-hostagent"), "cleanup", "--config", str(cfg)],
                           capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def say(self, what: str) -> None:
        if not self.args.json:
            print(what, "...", flush=True)


def table(r: dict) -> None:
    print()
    print(f"{'sysbench':<22}{'direct tps':>12}{'lat':>9}{'agentgate tps':>15}{'lat':>9}"
          f"{'ratio':>8}")
    for key, row in r.items():
        cells = ""
        for who in ("direct", "agentgate"):
            if who in row:
                w = 12 if who == "direct" else 15
                cells += f"{row[who]['tps']:>{w}.0f}{row[who]['latency_ms']:>7.2f}ms"
            else:
                cells += f"{'-':>{12 if who == 'direct' else 15}}{'':>9}"
        ratio = f"{row['ratio']:>7.2f}x" if "ratio" in row else f"{'-':>8}"
        print(f"{key:<22}{cells}{ratio}")
    errors = {f"{k} {w}": row[w]["ignored_errors"] for k, row in r.items()
              for w in ("direct", "agentgate") if row.get(w, {}).get("ignored_errors")}
    if errors:
        print("ignored errors (deadlocks sysbench retried): "
              + ", ".join(f"{k}={n}" for k, n in errors.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=10, help="each sysbench run (default 10)")
    ap.add_argument("--threads", type=int, default=4, help="sysbench threads (default 4)")
    ap.add_argument("--direct-only", action="store_true",
                    help="only the direct runs (no agentgate)")
    ap.add_argument("--json", action="store_true", help="print one JSON object: the ratios, "
                    "and the raw numbers under 'raw'")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/mysql.py needs root (BPF programs, MariaDB as its user)")
    if not os.access(SYSBENCH, os.X_OK):
        raise SystemExit(f"bench/mysql.py needs {SYSBENCH} (apt-get install sysbench)")
    b = Bench(args)
    try:
        b.start()
        raw = b.run()
    finally:
        b.stop()
    ratios = {f"{k}_ratio": row["ratio"] for k, row in raw.items() if "ratio" in row}
    if args.json:
        print(json.dumps({**ratios, "raw": raw}))
    else:
        table(raw)
        if ratios:
            print("\n" + "  ".join(f"{k}={v}" for k, v in ratios.items()))
    if b.failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
