#!/usr/bin/env python3
"""Kubernetes exec through agentgate, in one run, against direct access to the same API
server (tests/k8s_server.py, in a process of its own, which runs the exec'ed commands for
real): exec round trips per second, N sequential `kubectl exec pod-a -c main -- true`
(kubectl's start-up dominates) and N sequential stream() execs of `true` with the Python
kubernetes client in one process (the exec path alone), and stdout throughput,
`kubectl exec pod-a -c main -- head -c 67108864 /dev/zero | wc -c` (64 MiB, the byte
count checked). agentgate judges every API call and exec (an allow-all policy), injects
the real token and records the exec streams (every stdout byte as `data` events), in the
"host" configuration of bench/pg.py: the host agent alone, its shipper sending to a
collector that acks and discards (bench/discard.py; in real deployments the collector is
on another machine).

Each configuration is one `agentgate run --config CFG -- runner` (its BPF start-up is
outside every measured interval): the runner times each kubectl (and pipeline) itself,
the Python client times its own execs; the direct numbers come from the same runner, not
enrolled. A warm-up (two execs of each kind) precedes the measured ones.

Credentials and trust: direct, kubectl and the client get a kubeconfig with the server's
CA and the real token. Through agentgate, kubectl's kubeconfig names the real server with
a placeholder token and no CA data (it trusts the proxy through the SSL_CERT_FILE that
`agentgate run` sets); the Python client's names the agentgate CA as published for agents
(/run/agentgate/trust/<tree>/ca.pem: its websocket does not read SSL_CERT_FILE). The
proxy injects the real token (a root-only token_file); the server refuses any other.

Prints a table, or with --json one object of ratios (and the raw numbers under "raw").
The stdout rate is the pipeline's wall time, kubectl's start-up included (the best of
--repeat); raw's stdout_net_* take the batch's median `kubectl exec -- true` off it.
Any failed exec (kubectl's exit status, the client's return code), short byte count,
fewer execs run by the server or recorded by the collector than made, or fewer stdout
bytes recorded than passed, is a failure: reported on stderr, exit status 1. The proxy's
(agentgate run's) stderr, the server's, and sessions that ended otherwise than closed (as
the collector saw them) are reported on stderr as warnings. Needs root and kubectl.

    .venv/bin/python bench/k8s.py [--execs 50] [--py-execs 200] [--repeat 3] [--quick] [--json]
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where bench/http.py would
# hide the standard library's `http` package (which urllib, grpc, ... import).
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse
import importlib.util
import json
import os
import selectors
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from concurrent import futures

ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
PYTHON = "/usr/bin/python3"
SIZE = 64 << 20
TREE = "agentgate-k8sbench"
TOKEN = "real-cluster-token-bench-7e1f"

POLICY = 'default = "allow"\n'

# The API server, in a process of its own (its event loop would otherwise share a GIL
# with the collector's gRPC threads in this one): prints {"port", "ca"} once listening,
# writes the direct kubeconfig (CA, real token) and the agent's (placeholder, no CA),
# answers "stats" with what it ran and saw, stops at EOF on stdin.
SERVER = """
import json, sys
from collections import Counter
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.k8s_server import K8sServer
tmp, token = Path(sys.argv[2]), sys.argv[3]
s = K8sServer(directory=tmp / "server", token=token).start()
s.kubeconfig(tmp / "kc-direct", token=token, ca=s.ca_pem)
s.kubeconfig(tmp / "kc-agent", token="placeholder")
print(json.dumps({"port": s.port, "ca": str(s.ca_pem)}), flush=True)
for line in sys.stdin:
    ex = list(s.execs)
    print(json.dumps({
        "execs": len(ex),
        "exits": Counter(str(e["exit_code"]) for e in ex),
        "errors": [e["error"] for e in ex if e["error"]][-5:],
        "transports": Counter(f"{e['transport']} {e['protocol']}" for e in ex),
        "requests": len(s.requests),
        "other_auth": sum(1 for r in s.requests
                          if r[2].get("authorization") != f"Bearer {token}")}), flush=True)
s.stop()
"""

# The Python client: `warm` then N sequential execs of `true` in one process, each to
# its end (the error channel's Status read: the return code); prints their times.
CLIENT = """
import json, sys, time
from kubernetes import client, config
from kubernetes.stream import stream
config.load_kube_config(sys.argv[1])
api = client.CoreV1Api()
def once():
    r = stream(api.connect_get_namespaced_pod_exec, "pod-a", "default", command=["true"],
               container="main", stdout=True, stderr=True, stdin=False, tty=False,
               _preload_content=False)
    r.run_forever(timeout=60)
    rc = r.returncode
    r.close()
    return rc
bad = []
for _ in range(int(sys.argv[2])):
    rc = once()
    if rc != 0:
        bad.append(rc)
times = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter()
    rc = once()
    times.append(time.perf_counter() - t)
    if rc != 0:
        bad.append(rc)
print(json.dumps({"times": times, "bad": bad}))
"""

# Runs each step of a JSON list, one after the other, timing each run: a command
# (`repeat` times) or a pipeline of two (the first's stdout into the second; both exit
# statuses kept). Prints their results as JSON.
RUNNER = """
import json, subprocess, sys, tempfile, time
out = []
for step in json.load(open(sys.argv[1])):
    res = {"times": [], "rc": 0, "stdout": "", "stderr": ""}
    for _ in range(step["repeat"]):
        if step.get("pipe"):
            first, second = step["argv"]
            with tempfile.TemporaryFile() as err:
                t = time.perf_counter()
                a = subprocess.Popen(first, stdout=subprocess.PIPE, stderr=err)
                b = subprocess.Popen(second, stdin=a.stdout, stdout=subprocess.PIPE)
                a.stdout.close()
                stdout = b.communicate()[0]
                rc = a.wait() or b.returncode
                took = time.perf_counter() - t
                err.seek(0)
                stderr = err.read().decode(errors="replace")
            stdout = stdout.decode(errors="replace")
        else:
            t = time.perf_counter()
            p = subprocess.run(step["argv"], capture_output=True, text=True)
            took = time.perf_counter() - t
            rc, stdout, stderr = p.returncode, p.stdout, p.stderr
        res["times"].append(took)
        res["stdout"] = stdout
        if stderr.strip():
            res["stderr"] = stderr[-2000:]
        if rc != 0:
            res["rc"] = rc
            break
    out.append(res)
print(json.dumps(out))
"""


def need_tools() -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench/k8s.py needs root (agentgate run loads BPF programs)")
    for what, path in (("kubectl", KUBECTL), ("python3", PYTHON), ("wc", "/usr/bin/wc"),
                       ("agentgate", str(BIN / "agentgate"))):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise SystemExit(f"bench/k8s.py needs {what}: {path} is missing"
                             + (" (https://kubernetes.io/docs/tasks/tools/)"
                                if what == "kubectl" else ""))
    for mod, pkg in (("kubernetes", "kubernetes"), ("h11", "h11"), ("wsproto", "wsproto")):
        if importlib.util.find_spec(mod) is None:
            raise SystemExit(f"bench/k8s.py needs the Python package {pkg}: "
                             f"{BIN / 'pip'} install {pkg}")


class Collector:
    """bench/discard.py's collector (acks, keeps nothing) that also counts, from the
    events it discards, the execs recorded (and how they were decided), the stdout bytes
    recorded and how sessions ended."""

    def start(self) -> str:
        import grpc
        from agentgate.events import unpack_payload
        from agentgate.frames import iter_frames
        from agentgate.v1 import agentgate_pb2_grpc as rpc
        from bench import discard

        me = self
        self.execs = 0
        self.decisions: Counter = Counter()
        self.stdout_bytes = 0
        self.ends: Counter = Counter()

        class Counting(discard._Discard):
            def Stream(self, request_iterator, context):
                def batches():
                    for batch in request_iterator:
                        events = list(batch.events) + [
                            ev for _, ev in iter_frames(batch.frames) if not isinstance(ev, dict)]
                        for ev in events:
                            if ev.kind not in ("command", "data", "session_end"):
                                continue
                            try:
                                f = unpack_payload(ev.payload)
                            except Exception as exc:   # a payload we can't read
                                f = {"reason": f"(unreadable: {exc})"}
                            if ev.kind == "command":
                                if f.get("kind") == "exec":
                                    me.execs += 1
                                    me.decisions[str((f.get("decision") or {})
                                                     .get("action"))] += 1
                            elif ev.kind == "data":
                                if f.get("stream") == "stdout" and f.get("dir") == "out":
                                    me.stdout_bytes += len(f.get("data") or b"")
                            else:
                                me.ends[str(f.get("reason"))] += 1
                        yield batch
                yield from super().Stream(batches(), context)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                                  options=[("grpc.max_receive_message_length", 64 << 20)])
        rpc.add_IngestServicer_to_server(Counting(), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return f"127.0.0.1:{port}"

    def snapshot(self) -> tuple:
        return self.execs, Counter(self.decisions), self.stdout_bytes, Counter(self.ends)

    def stop(self) -> None:
        self.server.stop(0)


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="agentgate-k8sbench-"))
        os.chmod(self.tmp, 0o755)
        self.server: subprocess.Popen | None = None
        self.collector = None
        self.configs: list[Path] = []
        self.failures: list[str] = []
        self.warnings: list[str] = []

    # ------------------------------------------------------------------ set-up

    def start(self) -> None:
        self.server = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(ROOT), str(self.tmp), TOKEN],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            stderr=open(self.tmp / "server.stderr", "wb"))
        line = self._server_line(30)
        if not line:
            raise SystemExit("the API server (tests/k8s_server.py) did not start:\n"
                             + self.server_stderr()[-2000:])
        up = json.loads(line)
        self.port, self.ca = up["port"], up["ca"]
        (self.tmp / "token").write_text(TOKEN + "\n")
        (self.tmp / "token").chmod(0o600)
        # the Python client's, through agentgate: the agentgate CA as published for agents
        kc = (self.tmp / "kc-agent").read_text()
        server_line = next(ln for ln in kc.splitlines() if "server:" in ln)
        (self.tmp / "kc-agent-py").write_text(kc.replace(
            server_line, server_line + f"\n    certificate-authority: /run/agentgate/trust/"
                                       f"{TREE}/ca.pem"))
        self.collector = Collector()
        self.collector_address = self.collector.start()
        for name, text in (("runner.py", RUNNER), ("client.py", CLIENT)):
            (self.tmp / name).write_text(text)

    def _server_line(self, timeout: float) -> str:
        with selectors.DefaultSelector() as sel:
            sel.register(self.server.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                return ""
        return self.server.stdout.readline()

    def server_stats(self) -> dict:
        self.server.stdin.write("stats\n")
        self.server.stdin.flush()
        line = self._server_line(30)
        if not line:
            raise SystemExit("the API server stopped answering:\n"
                             + self.server_stderr()[-2000:])
        return json.loads(line)

    def server_stderr(self) -> str:
        try:
            return (self.tmp / "server.stderr").read_text(errors="replace")
        except OSError:
            return ""

    def config(self, name: str) -> Path:
        policy = self.tmp / f"policy-{name}.toml"
        policy.write_text(POLICY)
        cfg = self.tmp / f"hostagent-{name}.toml"
        cfg.write_text(f"""policy = "{policy}"
state_dir = "{self.tmp}/state-{name}"
[collector]
address = "{self.collector_address}"
[spool]
max_bytes = {8 << 30}
[intercept]
tree = "{TREE}"
socket = "{self.tmp}/none.sock"
[[targets]]
name = "cluster"
protocol = "kubernetes"
address = ["127.0.0.1:{self.port}"]
ca = "{self.ca}"
token_file = "{self.tmp}/token"
""")
        self.configs.append(cfg)
        return cfg

    def stop(self) -> None:
        if self.collector:
            self.collector.stop()
        if self.server:
            try:
                self.server.stdin.close()          # EOF: it stops
                self.server.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.server.kill()
                self.server.wait()
            err = self.server_stderr().strip()
            if err:
                self.warnings.append(f"the API server's stderr: {err[-1000:]}")
        for cfg in self.configs[:1]:
            subprocess.run([str(BIN / "agentgate-hostagent"), "cleanup", "--config", str(cfg)],
                           capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ runs

    def batch(self, who: str, cfg: Path | None) -> dict:
        """One runner (enrolled through `cfg`, or direct): warm-up, N kubectl execs of
        `true`, the Python client's execs, the stdout pipelines; parsed and checked."""
        a = self.args
        kc = self.tmp / ("kc-direct" if cfg is None else "kc-agent")
        kc_py = self.tmp / ("kc-direct" if cfg is None else "kc-agent-py")
        kubectl = [KUBECTL, "--kubeconfig", str(kc), "--cache-dir", str(self.tmp / f"cache-{who}"),
                   "exec", "pod-a", "-c", "main", "--"]
        plan = [
            ("warm", {"argv": kubectl + ["true"], "repeat": 2}),
            ("kubectl", {"argv": kubectl + ["true"], "repeat": a.execs}),
            ("python", {"argv": [str(BIN / "python"), str(self.tmp / "client.py"), str(kc_py),
                                 "2", str(a.py_execs)], "repeat": 1}),
            ("stdout", {"argv": [kubectl + ["head", "-c", str(a.size), "/dev/zero"],
                                 ["/usr/bin/wc", "-c"]], "pipe": True, "repeat": a.repeat}),
        ]
        made = 2 + a.execs + 2 + a.py_execs + a.repeat
        todo = self.tmp / f"plan-{who}.json"
        todo.write_text(json.dumps([step for _, step in plan]))
        cmd = [PYTHON, str(self.tmp / "runner.py"), str(todo)]
        if cfg is not None:
            cmd = [str(BIN / "agentgate"), "run", "--config", str(cfg), "--"] + cmd
        before, srv0 = self.collector.snapshot(), self.server_stats()
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{who}: {' '.join(cmd)} failed ({p.returncode}):\n"
                             f"{p.stderr[-2000:]}")
        if p.stderr.strip():     # (kubectl's and the client's stderr is in the runner's JSON)
            self.warnings.append(f"{who}: agentgate's stderr: {p.stderr.strip()[-2000:]}")
        try:
            results = json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise SystemExit(f"{who}: the runner printed no results:\n{p.stdout[-2000:]}\n"
                             f"{p.stderr[-2000:]}") from None
        srv = self.server_stats()
        out: dict = {}
        for (what, step), res in zip(plan, results):
            if res["rc"] != 0:
                self.failures.append(f"{who}: {what}: exit {res['rc']} (run "
                                     f"{len(res['times'])} of {step['repeat']}): "
                                     f"{res['stderr'].strip()[-500:]}")
                continue
            if res["stderr"].strip():
                self.warnings.append(f"{who}: {what}: stderr: {res['stderr'].strip()[-500:]}")
            if what == "kubectl":
                t = res["times"]
                out["kubectl"] = {"rps": len(t) / sum(t), "p50_ms": statistics.median(t) * 1e3,
                                  "n": len(t)}
            elif what == "python":
                try:
                    r = json.loads(res["stdout"].strip().splitlines()[-1])
                except (ValueError, IndexError):
                    self.failures.append(f"{who}: python: no results: {res['stdout'][-500:]}")
                    continue
                if r["bad"]:
                    self.failures.append(f"{who}: python: {len(r['bad'])} execs returned "
                                         f"other than 0: {r['bad'][:5]}")
                t = r["times"]
                q = statistics.quantiles(t, n=100) if len(t) > 1 else t * 99
                out["python"] = {"rps": len(t) / sum(t), "p50_ms": statistics.median(t) * 1e3,
                                 "p99_ms": q[98] * 1e3, "n": len(t)}
            elif what == "stdout":
                got = res["stdout"].strip()
                if got != str(a.size):
                    self.failures.append(f"{who}: stdout: wc -c counted {got!r} bytes of "
                                         f"{a.size}")
                    continue
                best = min(res["times"])
                out["stdout"] = {"mib_s": a.size / (1 << 20) / best, "best_s": best}
                if "kubectl" in out:
                    net = best - out["kubectl"]["p50_ms"] / 1e3
                    if net > 0:
                        out["stdout"]["net_mib_s"] = a.size / (1 << 20) / net
        ran = srv["execs"] - srv0["execs"]
        out["server_execs"] = ran
        if ran != made:
            self.failures.append(f"{who}: the API server ran {ran} execs, {made} were made")
        exits = Counter(srv["exits"]) - Counter(srv0["exits"])
        if set(exits) - {"0"}:
            self.failures.append(f"{who}: exit codes in the server: {dict(exits)}; errors: "
                                 f"{srv['errors']}")
        if srv["other_auth"] != srv0["other_auth"]:
            self.failures.append(f"{who}: {srv['other_auth'] - srv0['other_auth']} requests "
                                 "reached the API server without the real token")
        out["transports"] = dict(Counter(srv["transports"]) - Counter(srv0["transports"]))
        if cfg is not None:
            execs, decisions, stdout_bytes, ends = self.collector.snapshot()
            out["recorded_execs"] = execs - before[0]
            out["recorded_stdout"] = stdout_bytes - before[2]
            decisions = decisions - before[1]
            ends = ends - before[3]
            if out["recorded_execs"] < made:
                self.failures.append(f"{who}: the collector saw {out['recorded_execs']} execs "
                                     f"recorded, {made} were made")
            if set(decisions) - {"allow"}:
                self.failures.append(f"{who}: exec decisions: {dict(decisions)}")
            if out["recorded_stdout"] < a.size * a.repeat:
                self.failures.append(f"{who}: the collector saw {out['recorded_stdout']} "
                                     f"stdout bytes recorded, {a.size * a.repeat} passed")
            bad: Counter = Counter()
            for reason, n in ends.items():
                if reason not in ("client closed", "upstream closed", "exited"):
                    bad[reason if len(reason) < 100 else reason[:100] + "..."] += n
            if bad:
                self.warnings.append(f"{who}: sessions that ended otherwise than closed: "
                                     + "; ".join(f"{n} x {r}" for r, n in
                                                 sorted(bad.items(), key=lambda x: -x[1])))
            out["bad_ends"] = sum(bad.values())
            out["sessions"] = sum(ends.values())
        return out

    def run(self) -> dict:
        a = self.args
        what = (f"{a.execs} kubectl execs, {a.py_execs} Python client execs, "
                f"{a.size >> 20} MiB stdout x{a.repeat}")
        self.say(f"direct: {what}")
        direct = self.batch("direct", None)
        self.say("agentgate (allow-all, recording everything): the same")
        ag = self.batch("agentgate", self.config("host"))
        return {"direct": direct, "agentgate": ag}

    def say(self, what: str) -> None:
        if not self.args.json:
            print(what, "...", flush=True)


def numbers(r: dict) -> tuple[dict, dict]:
    """(ratios, raw): flat dicts of numbers."""
    q: dict = {}
    raw: dict = {}
    d, a = r["direct"], r["agentgate"]
    for kind in ("kubectl", "python"):
        for who, res in (("direct", d), ("agentgate", a)):
            e = res.get(kind)
            if e:
                raw[f"exec_rps_{kind}_{who}"] = round(e["rps"], 2)
                raw[f"exec_p50_ms_{kind}_{who}"] = round(e["p50_ms"], 2)
                if "p99_ms" in e:
                    raw[f"exec_p99_ms_{kind}_{who}"] = round(e["p99_ms"], 2)
                raw[f"execs_{kind}"] = e["n"]
        if d.get(kind) and a.get(kind):
            q[f"exec_rps_{kind}_ratio"] = round(a[kind]["rps"] / d[kind]["rps"], 3)
            q[f"exec_added_ms_{kind}"] = round(1e3 / a[kind]["rps"] - 1e3 / d[kind]["rps"], 2)
    for who, res in (("direct", d), ("agentgate", a)):
        s = res.get("stdout")
        if s:
            raw[f"stdout_mib_s_{who}"] = round(s["mib_s"], 1)
            raw[f"stdout_best_s_{who}"] = round(s["best_s"], 3)
            if "net_mib_s" in s:
                raw[f"stdout_net_mib_s_{who}"] = round(s["net_mib_s"], 1)
    if d.get("stdout") and a.get("stdout"):
        q["stdout_mib_s_ratio"] = round(a["stdout"]["mib_s"] / d["stdout"]["mib_s"], 3)
        if "net_mib_s" in d["stdout"] and "net_mib_s" in a["stdout"]:
            raw["stdout_net_ratio"] = round(a["stdout"]["net_mib_s"] / d["stdout"]["net_mib_s"],
                                            3)
    for who, res in (("direct", d), ("agentgate", a)):
        raw[f"server_execs_{who}"] = res["server_execs"]
    raw["recorded_execs_agentgate"] = a["recorded_execs"]
    raw["recorded_stdout_bytes_agentgate"] = a["recorded_stdout"]
    raw["sessions_agentgate"] = a["sessions"]
    raw["sessions_bad_end_agentgate"] = a["bad_ends"]
    return q, raw


def table(r: dict, q: dict, args) -> None:
    d, a = r["direct"], r["agentgate"]
    print()
    print(f"{'exec round trips, sequential':<36}{'direct':>16}{'agentgate':>16}"
          f"{'ag/direct':>11}{'+ms/exec':>10}")
    for kind, label in (("kubectl", f"kubectl exec -- true (x{args.execs})"),
                        ("python", f"Python client stream() (x{args.py_execs})")):
        cells = ""
        for res in (d, a):
            e = res.get(kind)
            cells += f"{e['rps']:>7.1f}/s {e['p50_ms']:>5.1f}ms" if e else f"{'-':>16}"
        ratio = q.get(f"exec_rps_{kind}_ratio")
        print(f"{label:<36}{cells}" + (f"{ratio:>11.2f}{q[f'exec_added_ms_{kind}']:>8.1f}ms"
                                       if ratio else ""))
    print(f"{'':<36}{'(execs/s, median)':>32}")
    print()
    print(f"{f'stdout {args.size >> 20} MiB, kubectl | wc -c':<36}{'direct':>16}"
          f"{'agentgate':>16}{'ag/direct':>11}")
    ds, as_ = d.get("stdout"), a.get("stdout")
    print(f"{f'best of {args.repeat}, start-up included':<36}"
          + (f"{ds['mib_s']:>11.0f}MiB/s" if ds else f"{'-':>16}")
          + (f"{as_['mib_s']:>11.0f}MiB/s" if as_ else f"{'-':>16}")
          + (f"{q['stdout_mib_s_ratio']:>11.2f}" if "stdout_mib_s_ratio" in q else ""))
    if ds and as_ and "net_mib_s" in ds and "net_mib_s" in as_:
        print(f"{'less a median kubectl exec -- true':<36}{ds['net_mib_s']:>11.0f}MiB/s"
              f"{as_['net_mib_s']:>11.0f}MiB/s{as_['net_mib_s'] / ds['net_mib_s']:>11.2f}")
    print(f"agentgate: {a['recorded_execs']} execs recorded (collector) of {a['server_execs']} "
          f"the server ran; {a['recorded_stdout']} stdout bytes recorded; "
          f"{a['sessions']} sessions ended ({a['bad_ends']} otherwise than closed)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--execs", type=int, default=50, help="sequential kubectl execs "
                    "(default 50)")
    ap.add_argument("--py-execs", type=int, default=200, help="sequential Python client "
                    "execs (default 200)")
    ap.add_argument("--repeat", type=int, default=3, help="stdout pipelines, the best counts "
                    "(default 3)")
    ap.add_argument("--quick", action="store_true", help="10 kubectl and 30 client execs, "
                    "one 8 MiB pipeline")
    ap.add_argument("--json", action="store_true", help="print one JSON object of ratios "
                    "(and the raw numbers under 'raw')")
    args = ap.parse_args()
    args.size = SIZE
    if args.quick:
        args.execs, args.py_execs = min(args.execs, 10), min(args.py_execs, 30)
        args.repeat, args.size = 1, 8 << 20
    if min(args.execs, args.py_execs, args.repeat) < 1:
        raise SystemExit("--execs, --py-execs and --repeat must be at least 1")
    need_tools()
    b = Bench(args)
    t0 = time.monotonic()
    try:
        b.start()
        r = b.run()
    finally:
        b.stop()
    q, raw = numbers(r)
    raw["stdout_bytes"] = args.size
    raw["elapsed_s"] = round(time.monotonic() - t0, 1)
    if args.json:
        print(json.dumps({**q, "raw": raw}))
    else:
        table(r, q, args)
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
