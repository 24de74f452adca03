#!/usr/bin/env python3
"""HTTP and HTTPS through agentgate, in one run, against direct access to the same real
upstream (tests/http_server.js on Node.js): keep-alive requests per second and average
latency with wrk (GET /json, 1 and 8 connections, plain HTTP and HTTP/1.1 over TLS), a
100 MiB download with curl (plain and TLS), and the cost of masking /json's answer
(detectors on) beside. agentgate parses, judges (an allow-all policy) and records every
request, in the "host" configuration of bench/pg.py: the host agent alone, its shipper
sending to a collector that acks and discards (bench/discard.py; in real deployments the
collector is on another machine).

Each configuration is one `agentgate run --config CFG -- runner` (its BPF start-up is
outside every measured interval: wrk and curl time their own). The runner runs wrk and
curl one after the other; the direct numbers come from the same runner, not enrolled.

TLS: through agentgate the agent's leg is terminated with the local CA, which `agentgate
run` puts in SSL_CERT_FILE/CURL_CA_BUNDLE; curl verifies it (and direct curl verifies the
upstream's own CA, --cacert). wrk does not verify certificates at all (it connects to the
upstream's test CA, which nothing trusts, just as well), so its TLS numbers are handshake
and encryption cost, not verification.

Prints a table, or with --json one object of ratios (and the raw numbers under "raw").
Any non-2xx answer (wrk's "Non-2xx or 3xx responses"), failed or short download or
unmasked answer, or fewer requests recorded than wrk counted, is a failure: reported on
stderr, exit status 1. Socket errors (wrk reconnects after them), curl retries after a
failed TLS handshake (two at most), the proxy's stderr and sessions that ended otherwise
than closed (as the collector saw them) are reported on stderr as warnings.
Needs root, wrk, curl and node.

    .venv/bin/python bench/http.py [--seconds 5] [--repeat 3] [--quick] [--json] [--no-masks]
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where this file's name
# would hide the standard library's `http` package (which urllib, grpc, ... import).
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from concurrent import futures

ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
WRK = "/usr/bin/wrk"
CURL = shutil.which("curl") or "/usr/bin/curl"
PYTHON = "/usr/bin/python3"
DOWNLOAD = 100 << 20

POLICY = 'default = "allow"\n'
MASKS = """
[[masks]]
name = "pii"
detectors = ["email", "credit_card", "phone"]
json = ["$.token"]
"""
# Runs each command of a JSON list, one after the other; prints their results as JSON.
# A curl that failed its TLS handshake (exit 35) is tried again, twice at most: the
# retries are counted and reported.
RUNNER = """
import json, subprocess, sys
out = []
for argv, retry in json.load(open(sys.argv[1])):
    tries = 0
    while True:
        tries += 1
        p = subprocess.run(argv, capture_output=True, text=True)
        if not retry or p.returncode != 35 or tries == 3:
            break
    out.append({"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr[-2000:],
                "tries": tries})
print(json.dumps(out))
"""
UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def need_tools() -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench/http.py needs root (agentgate run loads BPF programs)")
    from tests.http_server import NODE
    for what, path in (("wrk", WRK), ("curl", CURL), ("node", NODE), ("python3", PYTHON),
                       ("agentgate", str(BIN / "agentgate"))):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise SystemExit(f"bench/http.py needs {what}: {path} is missing"
                             + (" (apt-get install wrk)" if what == "wrk" else "")
                             + (" (apt-get install nodejs)" if what == "node" else ""))


def _us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def parse_wrk(out: str) -> dict:
    """Requests/s, average/p50/p99 latency (µs), requests, socket errors and non-2xx."""
    try:
        lat = re.search(r"^\s*Latency\s+(\S+)\s", out, re.M).group(1)
        r = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
             "lat_us": _us(lat),
             "requests": int(re.search(r"(\d+) requests in", out).group(1))}
    except (AttributeError, ValueError):
        raise SystemExit(f"cannot read wrk's output:\n{out[-2000:]}") from None
    for pct in ("50", "99"):
        m = re.search(rf"^\s*{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        if m:
            r[f"p{pct}_us"] = _us(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["socket_errors"] = sum(map(int, m.groups())) if m else 0
    r["socket_detail"] = m.group(0) if m else ""
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non2xx"] = int(m.group(1)) if m else 0
    return r


class Collector:
    """bench/discard.py's collector (acks, keeps nothing) that also counts, from the
    events it discards, the requests recorded and how sessions ended."""

    def start(self) -> str:
        import grpc
        from agentgate.events import unpack_payload
        from agentgate.frames import iter_frames
        from agentgate.v1 import agentgate_pb2_grpc as rpc
        from bench import discard

        me = self
        self.commands = 0
        self.ends: Counter = Counter()

        class Counting(discard._Discard):
            def Stream(self, request_iterator, context):
                def batches():
                    for batch in request_iterator:
                        events = list(batch.events) + [
                            ev for _, ev in iter_frames(batch.frames) if not isinstance(ev, dict)]
                        for ev in events:
                            if ev.kind == "command":
                                me.commands += 1
                            elif ev.kind == "session_end":
                                try:
                                    reason = str(unpack_payload(ev.payload).get("reason"))
                                except Exception as exc:   # a payload we can't read
                                    reason = f"(unreadable: {exc})"
                                me.ends[reason] += 1
                        yield batch
                yield from super().Stream(batches(), context)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                                  options=[("grpc.max_receive_message_length", 64 << 20)])
        rpc.add_IngestServicer_to_server(Counting(), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return f"127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.stop(0)


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="agentgate-httpbench-"))
        os.chmod(self.tmp, 0o755)
        self.server = None
        self.collector = None
        self.configs: list[Path] = []
        self.failures: list[str] = []
        self.warnings: list[str] = []

    # ------------------------------------------------------------------ set-up

    def start(self) -> None:
        from tests.http_server import HttpServer
        try:
            self.server = HttpServer(self.tmp / "upstream").start()
        except RuntimeError as exc:
            raise SystemExit(f"the upstream did not start: {str(exc).splitlines()[0]}") from None
        self.collector = Collector()
        self.collector_address = self.collector.start()
        runner = self.tmp / "runner.py"
        runner.write_text(RUNNER)
        runner.chmod(0o644)

    def config(self, name: str, *, masks: bool = False) -> Path:
        policy = self.tmp / f"policy-{name}.toml"
        policy.write_text(POLICY + (MASKS if masks else ""))
        s = self.server
        cfg = self.tmp / f"hostagent-{name}.toml"
        cfg.write_text(f"""policy = "{policy}"
state_dir = "{self.tmp}/state-{name}"
[collector]
address = "{self.collector_address}"
[spool]
max_bytes = {8 << 30}
[intercept]
tree = "agentgate-httpbench"
socket = "{self.tmp}/none.sock"
[[targets]]
name = "plain"
protocol = "http"
address = ["127.0.0.1:{s.http_port}"]
[[targets]]
name = "tls"
protocol = "https"
address = ["localhost:{s.h1tls_port}"]
ca = "{s.ca_pem}"
""")
        self.configs.append(cfg)
        return cfg

    def stop(self) -> None:
        if self.collector:
            self.collector.stop()
        if self.server:
            upstream_err = self.server.stderr().strip()
            if upstream_err:
                self.warnings.append(f"the upstream's stderr: {upstream_err[-1000:]}")
            self.server.stop()
        for cfg in self.configs[:1]:
            subprocess.run([str(BIN / "agentgate-hostagent"), "cleanup", "--config", str(cfg)],
                           capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ runs

    def urls(self) -> dict[str, str]:
        s = self.server
        return {"plain": f"http://127.0.0.1:{s.http_port}",
                "tls": f"https://localhost:{s.h1tls_port}"}

    def batch(self, who: str, cfg: Path | None, *, downloads: bool, check_masked: bool = False
              ) -> dict:
        """One runner (enrolled through `cfg`, or direct): wrk at 1 and 8 connections,
        plain and TLS, then the downloads; parsed."""
        a = self.args
        urls = self.urls()
        plan: list[tuple[str, list[str]]] = []
        for proto, url in urls.items():            # warm-up: JIT, imports, first handshakes
            plan.append(("warm", [WRK, "-t1", "-c8", "-d1s", f"{url}/json"]))
        for proto, url in urls.items():
            for c in (1, 8):
                plan.append((f"wrk {proto} c{c}", [WRK, "-t1", f"-c{c}", f"-d{a.seconds}s",
                                                    "--latency", f"{url}/json"]))
        if downloads:
            for proto, url in urls.items():
                tls = ["--cacert", str(self.server.ca_pem)] if cfg is None and proto == "tls" \
                    else []
                for _ in range(a.repeat):
                    plan.append((f"download {proto}", [
                        CURL, "-sS", *tls, "-o", "/dev/null", "-w",
                        "%{http_code} %{size_download} %{speed_download}",
                        f"{url}/big?bytes={DOWNLOAD}"]))
        if check_masked:
            for proto, url in urls.items():
                plan.append((f"masked {proto}", [CURL, "-sS", f"{url}/json"]))
        todo = self.tmp / f"plan-{who}.json"
        todo.write_text(json.dumps([(argv, argv[0] == CURL) for _, argv in plan]))
        todo.chmod(0o644)
        cmd = [PYTHON, str(self.tmp / "runner.py"), str(todo)]
        if cfg is not None:
            cmd = [str(BIN / "agentgate"), "run", "--config", str(cfg), "--"] + cmd
        before = self.collector.commands, Counter(self.collector.ends)
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{who}: {' '.join(cmd)} failed ({p.returncode}):\n"
                             f"{p.stderr[-2000:]}")
        if p.stderr.strip():     # (wrk's and curl's stderr is in the runner's JSON)
            self.warnings.append(f"{who}: agentgate's stderr: {p.stderr.strip()[-2000:]}")
        try:
            results = json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise SystemExit(f"{who}: the runner printed no results:\n{p.stdout[-2000:]}\n"
                             f"{p.stderr[-2000:]}") from None
        out: dict = {"wrk": {}, "download": {}}
        proxied = 0
        for (what, argv), res in zip(plan, results):
            if res["tries"] > 1:
                self.warnings.append(f"{who}: {what}: {res['tries'] - 1} curl retries after "
                                     "TLS handshake failures (exit 35)")
            if res["rc"] != 0:
                self.failures.append(f"{who}: {what}: exit {res['rc']}: "
                                     f"{res['stderr'].strip()[-500:]}")
                continue
            if what == "warm" or what.startswith("wrk"):
                r = parse_wrk(res["stdout"])
                proxied += r["requests"]
                if r["non2xx"]:
                    self.failures.append(f"{who}: {what}: {r['non2xx']} non-2xx/3xx answers "
                                         f"of {r['requests']}")
                if r["socket_errors"]:
                    self.warnings.append(f"{who}: {what}: {r['socket_detail']} "
                                         f"({r['requests']} requests)")
                if what != "warm":
                    out["wrk"][what.split(" ", 1)[1]] = r
            elif what.startswith("download"):
                proto = what.split()[1]
                code, size, speed = res["stdout"].split()
                if code != "200" or int(size) != DOWNLOAD:
                    self.failures.append(f"{who}: {what}: HTTP {code}, {size} bytes of "
                                         f"{DOWNLOAD}")
                    continue
                best = out["download"].get(proto, 0.0)
                out["download"][proto] = max(best, float(speed) / (1 << 20))   # MiB/s
            elif what.startswith("masked"):
                if "ann@example.com" in res["stdout"] or "4111 1111" in res["stdout"]:
                    self.failures.append(f"{who}: {what}: /json came back unmasked: "
                                         f"{res['stdout'][:200]}")
        if cfg is not None:
            recorded = self.collector.commands - before[0]
            ends = self.collector.ends - before[1]
            out["recorded"] = recorded
            out["proxied"] = proxied
            if recorded < proxied:      # (wrk doesn't count those in flight at its end)
                self.failures.append(f"{who}: the collector saw {recorded} requests recorded, "
                                     f"wrk counted {proxied}")
            bad: Counter = Counter()
            for reason, n in ends.items():
                if reason not in ("client closed", "upstream closed", "exited"):
                    bad[reason if len(reason) < 100 else reason[:100] + "..."] += n
            if bad:
                self.warnings.append(f"{who}: sessions that ended otherwise than closed: "
                                     + "; ".join(f"{n} x {r}" for r, n in
                                                 sorted(bad.items(), key=lambda x: -x[1])))
            out["bad_ends"] = sum(bad.values())
        return out

    def run(self) -> dict:
        self.say("direct: wrk (plain, TLS; 1 and 8 connections), 100 MiB downloads")
        direct = self.batch("direct", None, downloads=True)
        self.say("agentgate (allow-all, recording every request): the same")
        ag = self.batch("agentgate", self.config("host"), downloads=True)
        r = {"direct": direct, "agentgate": ag}
        if not self.args.no_masks:
            self.say("agentgate with masks on /json (detectors email, credit_card, phone): wrk")
            r["masked"] = self.batch("masked", self.config("masked", masks=True),
                                     downloads=False, check_masked=True)
        return r

    def say(self, what: str) -> None:
        if not self.args.json:
            print(what, "...", flush=True)


ROWS = ("plain c1", "plain c8", "tls c1", "tls c8")


def numbers(r: dict) -> tuple[dict, dict]:
    """(ratios, raw): flat dicts of numbers."""
    q: dict = {}
    raw: dict = {}
    d, a, m = r["direct"], r["agentgate"], r.get("masked")
    for row in ROWS:
        key = row.replace(" ", "_")
        for who, res in (("direct", d), ("agentgate", a), ("masked", m)):
            w = res["wrk"].get(row) if res else None
            if w:
                for f in ("rps", "lat_us", "p50_us", "p99_us", "requests", "socket_errors",
                          "non2xx"):
                    if f in w:
                        raw[f"{f}_{key}_{who}"] = round(w[f], 1)
        dw, aw = d["wrk"].get(row), a["wrk"].get(row)
        if dw and aw:
            q[f"rps_{key}_ratio"] = round(aw["rps"] / dw["rps"], 3)
            q[f"added_us_{key}"] = round(aw["lat_us"] - dw["lat_us"], 1)
        mw = m["wrk"].get(row) if m else None
        if mw and aw:
            q[f"masks_rps_{key}_ratio"] = round(mw["rps"] / aw["rps"], 3)
            q[f"masks_added_us_{key}"] = round(mw["lat_us"] - aw["lat_us"], 1)
    for proto in ("plain", "tls"):
        dd, ad = d["download"].get(proto), a["download"].get(proto)
        if dd:
            raw[f"download_{proto}_direct_mib_s"] = round(dd, 1)
        if ad:
            raw[f"download_{proto}_agentgate_mib_s"] = round(ad, 1)
        if dd and ad:
            q[f"download_{proto}_ratio"] = round(ad / dd, 3)
    for who, res in (("agentgate", a), ("masked", m)):
        if res:
            raw[f"requests_proxied_{who}"] = res["proxied"]
            raw[f"requests_recorded_{who}"] = res["recorded"]
            raw[f"sessions_bad_end_{who}"] = res["bad_ends"]
    return q, raw


def table(r: dict, q: dict) -> None:
    m = r.get("masked")
    cols = ["direct", "agentgate"] + (["agentgate+masks"] if m else [])
    print()
    print(f"{'GET /json, wrk -t1':<20}" + "".join(f"{c:>20}" for c in cols)
          + f"{'ag/direct':>11}{'+lat ag':>10}" + (f"{'masks/ag':>10}{'+lat masks':>12}"
                                                   if m else ""))
    for row in ROWS:
        cells = ""
        for who in ("direct", "agentgate", "masked")[:len(cols)]:
            w = r[who]["wrk"].get(row)
            cells += f"{w['rps']:>9.0f}/s {w['lat_us']:>6.0f}us" if w else f"{'-':>20}"
        key = row.replace(" ", "_")
        ratio, added = q.get(f"rps_{key}_ratio"), q.get(f"added_us_{key}")
        line = f"{row:<20}{cells}" + (f"{ratio:>11.2f}{added:>8.0f}us" if ratio else "")
        if m and f"masks_rps_{key}_ratio" in q:
            line += f"{q[f'masks_rps_{key}_ratio']:>10.2f}{q[f'masks_added_us_{key}']:>10.0f}us"
        print(line)
    print()
    print(f"{'100 MiB download, curl':<26}{'direct':>12}{'agentgate':>12}{'ag/direct':>11}")
    for proto in ("plain", "tls"):
        dd, ad = r["direct"]["download"].get(proto), r["agentgate"]["download"].get(proto)
        print(f"{proto:<26}" + (f"{dd:>7.0f}MiB/s" if dd else f"{'-':>12}")
              + (f"{ad:>7.0f}MiB/s" if ad else f"{'-':>12}")
              + (f"{ad / dd:>11.2f}" if dd and ad else ""))
    for who in ("agentgate", "masked")[:len(cols) - 1]:
        print(f"{who}: {r[who]['recorded']} requests recorded (collector) of "
              f"{r[who]['proxied']} wrk counted (+ curl's)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="each wrk run (default 5)")
    ap.add_argument("--repeat", type=int, default=3, help="downloads per case, the best "
                    "counts (default 3)")
    ap.add_argument("--quick", action="store_true", help="2 s wrk runs, one download each")
    ap.add_argument("--no-masks", action="store_true", help="skip the masking column")
    ap.add_argument("--json", action="store_true", help="print one JSON object of ratios "
                    "(and the raw numbers under 'raw')")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.repeat = min(args.seconds, 2), 1
    need_tools()
    b = Bench(args)
    t0 = time.monotonic()
    try:
        b.start()
        r = b.run()
    finally:
        b.stop()
    q, raw = numbers(r)
    raw["elapsed_s"] = round(time.monotonic() - t0, 1)
    if args.json:
        print(json.dumps({**q, "raw": raw}))
    else:
        table(r, q)
        print("\n" + "  ".join(f"{k}={v}" for k, v in q.items()))
    sys.stdout.flush()
    for w in b.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for f in b.failures:
        print(f"FAILED: {f}", file=sys.stderr)
    if b.failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
