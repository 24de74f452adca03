#!/usr/bin/env python3
"""PostgreSQL through agentgate, in one run, against direct access and pgbouncer
(session mode): pgbench -S (simple and prepared, 1 and 8 clients), pgbench's TPC-B-like
script (4 clients), a 1,000,000-row SELECT and COPY TO STDOUT, and masking's cost on
10,000 rows x 8 columns. agentgate parses, judges (a policy of a few rules) and records
every statement, in two configurations:

  host  the host agent alone: its shipper sends to a collector that acks and discards
        (in real deployments the collector is on another machine)
  full  the collector on this machine too, storing everything (SQLite)

Strict mode (an fsync before each statement goes on) is reported beside. Prints a table,
or with --json one object of ratios. Needs root.

    .venv/bin/python bench/pg.py [--seconds 5] [--json] [--profile DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"

from bench import discard  # noqa: E402
from tests.pg import PgServer, _ids  # noqa: E402

POLICY = """
default = "allow"
unparseable = "deny"
[[rules]]
name = "no-ddl"
action = "deny"
statements = ["DROP", "TRUNCATE", "ALTER"]
[[rules]]
name = "no-server-files"
action = "deny"
flags = ["copy_program", "server_files"]
[[rules]]
name = "no-unbounded-writes"
action = "deny"
flags = ["no_where"]
"""
MASKS = """
[[masks]]
name = "pii"
columns = ["*.ssn", "*.email"]
detectors = ["email", "credit_card"]
"""
FETCH = """
import sys, time, psycopg
best = None
with psycopg.connect(host="127.0.0.1", port=int(sys.argv[1]), dbname="bench", user="app",
                     password="app-secret-pw", sslmode="disable") as c:
    for _ in range(5):
        t = time.perf_counter()
        rows = c.execute("SELECT * FROM wide").fetchall()
        took = time.perf_counter() - t
        best = took if best is None else min(best, took)
print(best, len(rows))
"""
BIG = """
import sys, time, psycopg
with psycopg.connect(host="127.0.0.1", port=int(sys.argv[1]), dbname="bench", user="app",
                     password="app-secret-pw", sslmode="disable") as c:
    t = time.perf_counter()
    n = 0
    with c.cursor(name="big") as cur:        # server-side cursor: rows stream as iterated
        cur.itersize = 10000
        for _ in cur.execute("SELECT * FROM big"):
            n += 1
    select = time.perf_counter() - t
    t = time.perf_counter()
    size = 0
    with c.cursor().copy("COPY big TO STDOUT") as copy:
        for block in copy:
            size += len(block)
    print(select, time.perf_counter() - t, n, size)
"""


def pgbench(prefix: list[str], port: int, clients: int, seconds: int, *, proto="prepared",
            select_only=True, env: dict | None = None) -> tuple[float, float]:
    cmd = prefix + [PGBENCH, "-n", "-T", str(seconds), "-c", str(clients), "-j",
                    str(clients), "-M", proto, "-h", "127.0.0.1", "-p", str(port), "-U", "app",
                    "bench"] + (["-S"] if select_only else [])
    # plaintext everywhere: PostgreSQL and pgbouncer here have no TLS, and the proxy
    # would otherwise terminate TLS (libpq's default sslmode=prefer) and pay for it alone
    p = subprocess.run(cmd, capture_output=True, text=True,
                       env={**os.environ, "PGSSLMODE": "disable", **(env or {})})
    if p.returncode != 0:
        raise SystemExit(f"pgbench failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    tps = float(re.search(r"tps = ([\d.]+)", p.stdout).group(1))
    lat = float(re.search(r"latency average = ([\d.]+) ms", p.stdout).group(1))
    return tps, lat


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="agentgate-pgbench-"))
        os.chmod(self.tmp, 0o755)
        self.pg = None
        self.procs: list[subprocess.Popen] = []
        self.discard = None

    # ------------------------------------------------------------------ set-up

    def start(self) -> None:
        pg = self.pg = PgServer().start()
        pg.sql("CREATE DATABASE bench OWNER app")
        subprocess.run(["runuser", "-u", "postgres", "--", PGBENCH, "-i", "-q", "-s", "10",
                        "-h", str(pg.dir), "-p", str(pg.port), "-U", "postgres", "bench"],
                       check=True, capture_output=True)
        pg.sql("CREATE TABLE wide AS SELECT g AS id, 'name ' || g AS name, "
               "'user' || g || '@example.com' AS email, '123-45-' || lpad((g % 10000)::text, 4, "
               "'0') AS ssn, 'note ' || g AS note, 'card 4111 1111 1111 1111' AS payment, "
               "md5(g::text) AS hash, now()::text AS at FROM generate_series(1, 10000) g",
               db="bench")
        pg.sql("CREATE TABLE big AS SELECT g AS id, md5(g::text) AS h, g * 2 AS n "
               "FROM generate_series(1, 1000000) g", db="bench")
        pg.sql("GRANT ALL ON ALL TABLES IN SCHEMA public TO app", db="bench")
        self.bport = self._pgbouncer()
        ready = self.tmp / "ready"
        self.procs.append(subprocess.Popen(
            [str(BIN / "agentgate-collector"), "--listen", "127.0.0.1:0", "--database",
             str(self.tmp / "c.db"), "--ready-file", str(ready), "--log-level", "error"]))
        deadline = time.monotonic() + 30
        while not ready.exists():
            if time.monotonic() > deadline:
                raise SystemExit("the collector did not start")
            time.sleep(0.05)
        self.collector = ready.read_text().split()[0]
        self.discard, self.discard_address, self.discarded = discard.start()
        secret = self.tmp / "pw"
        secret.write_text("app-secret-pw\n")
        secret.chmod(0o600)
        (self.tmp / "policy.toml").write_text(POLICY)

    def _pgbouncer(self) -> int:
        """pgbouncer, session mode, as postgres (it refuses root)."""
        bport = self.pg.port + 1
        bdir = self.tmp / "pgbouncer"
        bdir.mkdir()
        os.chown(bdir, *_ids("postgres"))
        (bdir / "userlist.txt").write_text('"app" ""\n')
        (bdir / "pgbouncer.ini").write_text(f"""[databases]
bench = host=127.0.0.1 port={self.pg.port} dbname=bench user=app password=app-secret-pw
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {bport}
unix_socket_dir =
auth_type = trust
auth_file = {bdir}/userlist.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 20
logfile = {bdir}/pgbouncer.log
pidfile = {bdir}/pgbouncer.pid
""")
        self.procs.append(subprocess.Popen(["runuser", "-u", "postgres", "--", "pgbouncer",
                                            "-q", str(bdir / "pgbouncer.ini")]))
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", bport), timeout=1).close()
                return bport
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("pgbouncer did not start")
                time.sleep(0.05)

    def config(self, name: str, *, collector: str, strict: bool = False,
               masks: bool = False) -> Path:
        policy = self.tmp / f"policy-{name}.toml"
        policy.write_text(POLICY + (MASKS if masks else ""))
        cfg = self.tmp / f"hostagent-{name}.toml"
        cfg.write_text(f"""policy = "{policy}"
state_dir = "{self.tmp}/state-{name}"
[collector]
address = "{collector}"
[spool]
strict = {str(strict).lower()}
max_bytes = {8 << 30}
[intercept]
tree = "agentgate-pgbench"
socket = "{self.tmp}/none.sock"
[[targets]]
name = "bench-db"
protocol = "postgres"
address = "127.0.0.1:{self.pg.port}"
user = "app"
password_file = "{self.tmp}/pw"
tls = "disable"
""")
        return cfg

    def agentgate(self, cfg: Path, name: str) -> list[str]:
        run = [str(BIN / "agentgate"), "run", "--config", str(cfg), "--user", "postgres", "--"]
        if not self.args.profile:
            return run
        Path(self.args.profile).mkdir(parents=True, exist_ok=True)
        return [str(BIN / "py-spy"), "record", "-r", "250", "-f", "raw", "-o",
                str(Path(self.args.profile) / f"{name}.folded"), "--"] + run

    def script(self, prefix: list[str], code: str, *args: str) -> list[str]:
        path = self.tmp / "script.py"
        path.write_text(code)
        path.chmod(0o644)
        p = subprocess.run(prefix + [str(BIN / "python"), str(path), *args],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"script failed: {p.stderr[-2000:]}")
        # the script's own line (py-spy, when profiling, talks on stdout too)
        return next(line.split() for line in reversed(p.stdout.splitlines())
                    if re.fullmatch(r"[\d.e+\- ]+", line.strip()))

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
            p.wait()
        if self.discard:
            self.discard.stop(0)
        if self.pg:
            self.pg.stop()
        for cfg in self.tmp.glob("hostagent-*.toml"):
            subprocess.run([str(BIN / "agentgate-hostagent"), "cleanup", "--config", str(cfg)],
                           capture_output=True)
            break
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ runs

    def quick(self) -> dict:
        """pgbench -S through pgbouncer and agentgate (host) alone: a step's quick check."""
        s = self.args.seconds
        host = self.config("host", collector=self.discard_address)
        out = {}
        for key, clients, proto in (("c1_prepared", 1, "prepared"), ("c8_prepared", 8, "prepared"),
                                    ("c8_simple", 8, "simple")):
            pgb = pgbench(["runuser", "-u", "postgres", "--"], self.bport, clients, s, proto=proto)
            ag = pgbench(self.agentgate(host, f"{key}-host"), self.pg.port, clients, s, proto=proto)
            out[key] = {"pgbouncer": pgb, "host": ag, "ratio": round(ag[0] / pgb[0], 3),
                        "added_us": round((ag[1] - pgb[1]) * 1000, 1)}
        return out

    def run(self) -> dict:
        s = self.args.seconds
        as_pg = ["runuser", "-u", "postgres", "--"]
        direct_env = {"PGPASSWORD": "app-secret-pw"}
        host = self.config("host", collector=self.discard_address)
        full = self.config("full", collector=self.collector)
        out: dict = {"pgbench": {}}
        for clients in (1, 8):
            for proto in ("simple", "prepared"):
                key = f"c{clients}_{proto}"
                self.say(f"pgbench -S {key}: direct, pgbouncer, agentgate host, full")
                out["pgbench"][key] = {
                    "direct": pgbench(as_pg, self.pg.port, clients, s, proto=proto,
                                      env=direct_env),
                    "pgbouncer": pgbench(as_pg, self.bport, clients, s, proto=proto),
                    "host": pgbench(self.agentgate(host, f"{key}-host"), self.pg.port, clients,
                                    s, proto=proto),
                    "full": pgbench(self.agentgate(full, f"{key}-full"), self.pg.port, clients,
                                    s, proto=proto),
                }
        self.say("pgbench TPC-B-like c=4: direct, pgbouncer, agentgate full")
        out["tpcb_c4"] = {
            "direct": pgbench(as_pg, self.pg.port, 4, s, select_only=False, env=direct_env),
            "pgbouncer": pgbench(as_pg, self.bport, 4, s, select_only=False),
            "full": pgbench(self.agentgate(full, "tpcb-full"), self.pg.port, 4, s,
                            select_only=False),
        }
        self.say("strict mode, pgbench -S prepared c=1 and c=8 (full)")
        strict = self.config("strict", collector=self.collector, strict=True)
        out["strict"] = {f"c{c}": pgbench(self.agentgate(strict, f"strict-c{c}"), self.pg.port,
                                          c, s) for c in (1, 8)}
        self.say("1,000,000-row SELECT and COPY TO STDOUT: direct, agentgate full")
        d = self.script(as_pg, BIG, str(self.pg.port))
        a = self.script(self.agentgate(full, "big-full"), BIG, str(self.pg.port))
        assert d[2] == a[2] == "1000000" and d[3] == a[3], (d, a)
        out["big"] = {"direct": [float(d[0]), float(d[1])], "full": [float(a[0]), float(a[1])]}
        self.say("10,000 rows x 8 columns: unmasked, masked (full)")
        masked = self.config("masked", collector=self.collector, masks=True)
        out["masking"] = {
            "unmasked": float(self.script(self.agentgate(full, "fetch"), FETCH,
                                          str(self.pg.port))[0]),
            "masked": float(self.script(self.agentgate(masked, "fetch-masked"), FETCH,
                                        str(self.pg.port))[0]),
        }
        return out

    def say(self, what: str) -> None:
        if not self.args.json:
            print(what, "...", flush=True)


def ratios(r: dict) -> dict:
    pgb = r["pgbench"]

    def tps(key, who):
        return pgb[key][who][0]

    def added_us(key, who):
        return round((pgb[key][who][1] - pgb[key]["pgbouncer"][1]) * 1000, 1)
    big = r["big"]
    return {
        "c8_prepared_ratio_host": round(tps("c8_prepared", "host") / tps("c8_prepared", "pgbouncer"), 3),
        "c8_prepared_ratio_full": round(tps("c8_prepared", "full") / tps("c8_prepared", "pgbouncer"), 3),
        "c1_prepared_added_us": added_us("c1_prepared", "host"),
        "c1_simple_added_us": added_us("c1_simple", "host"),
        "c8_simple_ratio_host": round(tps("c8_simple", "host") / tps("c8_simple", "pgbouncer"), 3),
        "tpcb_c4_ratio_full": round(r["tpcb_c4"]["full"][0] / r["tpcb_c4"]["pgbouncer"][0], 3),
        "masking_added_ms": round((r["masking"]["masked"] - r["masking"]["unmasked"]) * 1000, 1),
        "select_1m_ratio": round(big["direct"][0] / big["full"][0], 3),
        "copy_out_ratio": round(big["direct"][1] / big["full"][1], 3),
        "strict_c8_prepared_ratio": round(r["strict"]["c8"][0] / tps("c8_prepared", "pgbouncer"), 3),
    }


def table(r: dict, q: dict) -> None:
    print()
    print(f"{'pgbench -S':<14}" + "".join(f"{w:>17}" for w in ("direct", "pgbouncer",
                                                               "agentgate host", "agentgate full"))
          + f"{'host/pgb':>10}{'full/pgb':>10}{'host +lat':>11}")
    for key, row in r["pgbench"].items():
        cells = "".join(f"{row[w][0]:>8.0f} {row[w][1]:>6.3f}ms" for w in
                        ("direct", "pgbouncer", "host", "full"))
        pgb = row["pgbouncer"]
        print(f"{key:<14}{cells}{row['host'][0] / pgb[0]:>10.2f}{row['full'][0] / pgb[0]:>10.2f}"
              f"{(row['host'][1] - pgb[1]) * 1000:>9.0f}us")
    t = r["tpcb_c4"]
    print(f"{'TPC-B c=4':<14}{t['direct'][0]:>8.0f} {t['direct'][1]:>6.3f}ms"
          f"{t['pgbouncer'][0]:>8.0f} {t['pgbouncer'][1]:>6.3f}ms{'':>17}"
          f"{t['full'][0]:>8.0f} {t['full'][1]:>6.3f}ms{'':>10}"
          f"{t['full'][0] / t['pgbouncer'][0]:>10.2f}")
    for c, (tps, lat) in r["strict"].items():
        print(f"strict mode (fsync before each statement goes on), {c} prepared, full: "
              f"{tps:.0f} TPS, {lat:.3f} ms")
    b = r["big"]
    print(f"1,000,000-row SELECT (psycopg, iterating): direct {b['direct'][0]:.2f} s, "
          f"agentgate {b['full'][0]:.2f} s ({q['select_1m_ratio']:.2f}x direct's speed)")
    print(f"COPY TO STDOUT of it: direct {b['direct'][1]:.2f} s, agentgate {b['full'][1]:.2f} s "
          f"({q['copy_out_ratio']:.2f}x)")
    m = r["masking"]
    print(f"10,000 rows x 8 columns (2 masked, detectors on text): {m['unmasked'] * 1000:.1f} ms "
          f"unmasked, {m['masked'] * 1000:.1f} ms masked: +{q['masking_added_ms']:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="each pgbench run (default 5)")
    ap.add_argument("--json", action="store_true", help="print one JSON object of ratios "
                    "(and the raw numbers under 'raw')")
    ap.add_argument("--quick", action="store_true", help="pgbench -S through pgbouncer and "
                    "agentgate (host) only, for a quick comparison between changes")
    ap.add_argument("--profile", metavar="DIR", help="also record py-spy profiles of the "
                    "agentgate process (collapsed stacks per run, for flamegraph.pl) into DIR")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/pg.py needs root (BPF programs, and PostgreSQL as its user)")
    if args.profile and not (BIN / "py-spy").exists():
        raise SystemExit(f"--profile needs py-spy: {BIN / 'pip'} install py-spy")
    b = Bench(args)
    try:
        b.start()
        if args.quick:
            print(json.dumps(b.quick(), indent=1))
            return
        raw = b.run()
    finally:
        b.stop()
    q = ratios(raw)
    if args.json:
        print(json.dumps({**q, "raw": raw}))
    else:
        table(raw, q)
        print("\n" + "  ".join(f"{k}={v}" for k, v in q.items()))


if __name__ == "__main__":
    main()
