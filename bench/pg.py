#!/usr/bin/env python3
"""PostgreSQL through agentgate, in one run: pgbench -S (simple and prepared, 1 and 8
clients) straight to PostgreSQL, through pgbouncer (session mode), and through agentgate
(eBPF redirect, every statement parsed, judged by a policy of a few rules and recorded).
Prints TPS, average latency and the agentgate/pgbouncer ratios. Needs root.

    .venv/bin/python bench/pg.py [--seconds 8]
"""
from __future__ import annotations

import argparse
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
with psycopg.connect(host="127.0.0.1", port=int(sys.argv[1]), dbname="bench", user="x",
                     sslmode="disable") as c:
    for _ in range(5):
        t = time.perf_counter()
        rows = c.execute("SELECT * FROM wide").fetchall()
        took = time.perf_counter() - t
        best = took if best is None else min(best, took)
print(best, len(rows))
"""


def fetch_time(cfg: Path, port: int, tmp: Path) -> float:
    script = tmp / "fetch.py"
    script.write_text(FETCH)
    script.chmod(0o644)
    p = subprocess.run([str(BIN / "agentgate"), "run", "--config", str(cfg), "--user",
                        "postgres", "--", str(BIN / "python"), str(script), str(port)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"fetch failed: {p.stderr[-2000:]}")
    best, rows = p.stdout.split()
    assert int(rows) == 10_000
    return float(best)


def pgbench(prefix: list[str], port: int, clients: int, proto: str, seconds: int,
            env: dict | None = None) -> tuple[float, float]:
    cmd = prefix + [PGBENCH, "-S", "-n", "-T", str(seconds), "-c", str(clients), "-j",
                    str(clients), "-M", proto, "-h", "127.0.0.1", "-p", str(port), "-U", "app",
                    "bench"]
    # plaintext everywhere: PostgreSQL and pgbouncer here have no TLS, and the proxy
    # would otherwise terminate TLS (libpq's default sslmode=prefer) and pay for it alone
    p = subprocess.run(cmd, capture_output=True, text=True,
                       env={**os.environ, "PGSSLMODE": "disable", **(env or {})})
    if p.returncode != 0:
        raise SystemExit(f"pgbench failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    tps = float(re.search(r"tps = ([\d.]+)", p.stdout).group(1))
    lat = float(re.search(r"latency average = ([\d.]+) ms", p.stdout).group(1))
    return tps, lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--profile", metavar="DIR", help="also record py-spy profiles of the "
                    "agentgate process (collapsed stacks per run, for flamegraph.pl) into DIR")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/pg.py needs root (BPF programs, and PostgreSQL as its user)")
    pg = PgServer().start()
    tmp = Path(tempfile.mkdtemp(prefix="agentgate-pgbench-"))
    os.chmod(tmp, 0o755)
    bouncer = None
    coll = None
    try:
        pg.sql("CREATE DATABASE bench OWNER app")
        subprocess.run(["runuser", "-u", "postgres", "--", PGBENCH, "-i", "-q", "-s", "10",
                        "-h", str(pg.dir), "-p", str(pg.port), "-U", "postgres", "bench"],
                       check=True, capture_output=True)
        pg.sql("CREATE TABLE wide AS SELECT g AS id, 'name ' || g AS name, "
               "'user' || g || '@example.com' AS email, '123-45-' || lpad((g % 10000)::text, 4, "
               "'0') AS ssn, 'note ' || g AS note, 'card 4111 1111 1111 1111' AS payment, "
               "md5(g::text) AS hash, now()::text AS at FROM generate_series(1, 10000) g",
               db="bench")
        pg.sql("GRANT SELECT ON ALL TABLES IN SCHEMA public TO app", db="bench")
        # pgbouncer, session mode, as postgres (it refuses root)
        bport = pg.port + 1
        bdir = tmp / "pgbouncer"
        bdir.mkdir()
        os.chown(bdir, *_ids("postgres"))
        (bdir / "userlist.txt").write_text('"app" ""\n')
        (bdir / "pgbouncer.ini").write_text(f"""[databases]
bench = host=127.0.0.1 port={pg.port} dbname=bench user=app password=app-secret-pw
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
        bouncer = subprocess.Popen(["runuser", "-u", "postgres", "--", "pgbouncer",
                                    str(bdir / "pgbouncer.ini")])
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", bport), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or bouncer.poll() is not None:
                    raise SystemExit("pgbouncer did not start")
                time.sleep(0.05)
        # agentgate: a collector, a host agent config with the target and the policy
        ready = tmp / "ready"
        coll = subprocess.Popen([str(BIN / "agentgate-collector"), "--listen", "127.0.0.1:0",
                                 "--database", str(tmp / "c.db"), "--ready-file", str(ready),
                                 "--log-level", "warning"])
        while not ready.exists():
            time.sleep(0.05)
        secret = tmp / "pw"
        secret.write_text("app-secret-pw\n")
        secret.chmod(0o600)
        (tmp / "policy.toml").write_text(POLICY)

        def config(strict: bool) -> Path:
            cfg = tmp / f"hostagent-{strict}.toml"
            cfg.write_text(f"""policy = "{tmp}/policy.toml"
state_dir = "{tmp}/state"
[collector]
address = "{ready.read_text().split()[0]}"
[spool]
strict = {str(strict).lower()}
max_bytes = {8 << 30}
[intercept]
tree = "agentgate-pgbench"
socket = "{tmp}/none.sock"
[[targets]]
name = "bench-db"
protocol = "postgres"
address = "127.0.0.1:{pg.port}"
user = "app"
password_file = "{secret}"
tls = "disable"
""")
            return cfg

        as_pg = ["runuser", "-u", "postgres", "--"]
        results = {}

        def agentgate(cfg: Path, name: str) -> list[str]:
            run = [str(BIN / "agentgate"), "run", "--config", str(cfg), "--user", "postgres", "--"]
            if not args.profile:
                return run
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            return [str(BIN / "py-spy"), "record", "-r", "200", "-f", "raw", "-o",
                    str(Path(args.profile) / f"{name}.folded"), "--"] + run

        for clients in (1, 8):
            for proto in ("simple", "prepared"):
                key = (clients, proto)
                print(f"c={clients} {proto}: direct, pgbouncer, agentgate ...", flush=True)
                results[key] = {
                    "direct": pgbench(as_pg + ["env", "PGPASSWORD=app-secret-pw"],
                                      pg.port, clients, proto, args.seconds),
                    "pgbouncer": pgbench(as_pg, bport, clients, proto, args.seconds),
                    "agentgate": pgbench(agentgate(config(False), f"c{clients}-{proto}"),
                                         pg.port, clients, proto, args.seconds),
                }
        strict = {c: pgbench([str(BIN / "agentgate"), "run", "--config", str(config(True)),
                              "--user", "postgres", "--"], pg.port, c, "prepared", args.seconds)
                  for c in (1, 8)}
        print("masking: 10,000 rows x 8 columns, unmasked vs masked ...", flush=True)
        masking = {}
        for name, extra in (("unmasked", ""), ("masked", MASKS)):
            (tmp / "policy.toml").write_text(POLICY + extra)
            masking[name] = fetch_time(config(False), pg.port, tmp)
    finally:
        if bouncer:
            bouncer.terminate()
            bouncer.wait()
        if coll:
            coll.terminate()
            coll.wait()
        pg.stop()
        subprocess.run([str(BIN / "agentgate-hostagent"), "cleanup", "--config",
                        str(tmp / "hostagent-False.toml")], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"{'pgbench -S':<16}{'direct':>18}{'pgbouncer':>18}{'agentgate':>18}"
          f"{'ag/pgb TPS':>12}{'added lat':>12}")
    for (clients, proto), r in results.items():
        cells = "".join(f"{r[k][0]:>9.0f} {r[k][1]:>6.3f}ms" for k in ("direct", "pgbouncer",
                                                                        "agentgate"))
        ratio = r["agentgate"][0] / r["pgbouncer"][0]
        added = (r["agentgate"][1] - r["pgbouncer"][1]) * 1000
        print(f"c={clients} {proto:<12}{cells}{ratio:>12.2f}{added:>10.0f}us")
    for c, (tps, lat) in strict.items():
        print(f"strict mode (fsync before each statement), c={c} prepared: {tps:.0f} TPS, "
              f"{lat:.3f} ms")
    print(f"masking 10,000 rows x 8 columns (2 masked, detectors on text): "
          f"{masking['unmasked'] * 1000:.1f} ms unmasked, {masking['masked'] * 1000:.1f} ms "
          f"masked: +{(masking['masked'] - masking['unmasked']) * 1000:.1f} ms (goal <= 20 ms)")
    print("\n(TPS and average latency; goals: c=8 TPS >= 0.95x pgbouncer, "
          "c=1 added latency within 15 us of pgbouncer's)")


if __name__ == "__main__":
    main()
