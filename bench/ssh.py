#!/usr/bin/env python3
"""SSH through agentgate, in one run, against direct access to the same OpenSSH server
(tests/ssh_server.py: Debian's sshd on loopback, its sftp-server):

- exec round trips per second: N sequential `ssh HOST true` (a connection each: key
  exchange and login dominate), and N sequential `conn.run("true")` on one asyncssh
  connection (a channel each: the proxy's per-channel work);
- SFTP throughput: `sftp -b` put, then get, of a 256 MiB file; `scp` (SFTP underneath
  since OpenSSH 9) put; each file compared with the original afterwards.

agentgate judges every channel and SFTP operation (an allow-all policy), logs in to
sshd with root's key (the agent has none) and records each channel: exec bytes as
`data` events, SFTP per file. The host agent is alone on the host: its shipper sends to
a collector that acks and discards (bench/discard.py). Each configuration is one run of
a runner script that times its own steps (under `agentgate run`, whose BPF start-up is
outside every measured interval, or directly). A failed step is a failure: reported on
stderr, exit status 1.

    .venv/bin/python bench/ssh.py [--execs 30] [--channels 200] [--size-mib 256] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
TREE = "agentgate-sshbench"

# The runner: times its own steps, prints one JSON object. argv: port, mode (direct |
# agentgate), key, known_hosts, work dir, execs, channels, size.
RUNNER = r'''
import asyncio, hashlib, json, os, subprocess, sys, time, warnings
warnings.filterwarnings("ignore", message="DSA is deprecated")
port, mode, key, known, work, execs, channels = sys.argv[1:8]
execs, channels = int(execs), int(channels)
if mode == "direct":
    flags = ["-i", key, "-o", f"UserKnownHostsFile={known}", "-o", "IdentitiesOnly=yes"]
    kh, keys = known, [key]
else:   # nothing but the host: the proxy's host CA is found by OpenSSH, the key injected
    flags, kh, keys = [], os.environ["AGENTGATE_SSH_KNOWN_HOSTS"], []
ssh = ["ssh", "-o", "BatchMode=yes", "-p", port, "-l", "root", *flags]
out = {}
def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()[-500:]}")
    return p
for _ in range(2):
    run(ssh + ["127.0.0.1", "true"])
t = time.perf_counter()
for _ in range(execs):
    run(ssh + ["127.0.0.1", "true"])
out["ssh_exec_per_s"] = execs / (time.perf_counter() - t)

async def chans():
    import asyncssh
    async with asyncssh.connect("127.0.0.1", int(port), username="root", known_hosts=kh,
                                client_keys=keys, agent_path=None, config=None) as c:
        for _ in range(3):
            await c.run("true", check=True)
        t = time.perf_counter()
        for _ in range(channels):
            await c.run("true", check=True)
        return channels / (time.perf_counter() - t)
out["channel_exec_per_s"] = asyncio.run(chans())

src = os.path.join(work, "src.bin")
digest = hashlib.sha256(open(src, "rb").read()).hexdigest()
size = os.path.getsize(src)
remote = os.path.join(work, f"remote-{mode}")
os.makedirs(remote, exist_ok=True)
sftp = ["sftp", "-o", "BatchMode=yes", "-P", port, *flags, "-b", "-", "root@127.0.0.1"]
def timed(name, cmd, **kw):
    t = time.perf_counter()
    run(cmd, **kw)
    out[name] = size / (1 << 20) / (time.perf_counter() - t)
def same(path):
    if hashlib.sha256(open(path, "rb").read()).hexdigest() != digest:
        sys.exit(f"{path}: not the file sent")
    os.unlink(path)
timed("sftp_put_mib_s", sftp, input=f"put {src} {remote}/put.bin\n")
same(f"{remote}/put.bin")
os.link(src, f"{remote}/get.bin") if not os.path.exists(f"{remote}/get.bin") else None
timed("sftp_get_mib_s", sftp, input=f"get {remote}/get.bin {work}/got-{mode}.bin\n")
same(f"{work}/got-{mode}.bin")
os.unlink(f"{remote}/get.bin")
timed("scp_put_mib_s", ["scp", "-o", "BatchMode=yes", "-P", port, *flags, src,
                        f"root@127.0.0.1:{remote}/scp.bin"])
same(f"{remote}/scp.bin")
print(json.dumps(out))
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--execs", type=int, default=30)
    ap.add_argument("--channels", type=int, default=200)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/ssh.py: needs root (sshd, eBPF)")
    from bench import discard
    from tests.ssh_server import SshServer

    tmp = Path(tempfile.mkdtemp(prefix="agentgate-sshbench-"))
    tmp.chmod(0o755)
    sshd = SshServer(tmp / "sshd").start()
    server, address, _ = discard.start()
    work = tmp / "work"
    work.mkdir()
    with open(work / "src.bin", "wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(1 << 20))
    (tmp / "policy.toml").write_text('default = "allow"\n')
    cfg = tmp / "host.toml"
    cfg.write_text(f'''policy = "{tmp}/policy.toml"
host = "bench"
state_dir = "{tmp}/state"
[collector]
address = "{address}"
[intercept]
mode = "deny"
tree = "{TREE}"
socket = "{tmp}/hostagent.sock"
proxy_port = 0
[[targets]]
name = "box"
protocol = "ssh"
address = ["127.0.0.1:{sshd.port}"]
user = "root"
identity_file = "{sshd.client_key}"
known_hosts = "{sshd.known_hosts}"
''')
    (tmp / "runner.py").write_text(RUNNER)
    runner = [str(BIN / "python"), str(tmp / "runner.py"), str(sshd.port)]
    tail = [str(sshd.client_key), str(sshd.known_hosts), str(work), str(args.execs),
            str(args.channels)]
    results, failed = {}, False
    try:
        for mode, prefix in (("direct", []),
                             ("agentgate", [str(BIN / "agentgate"), "run", "--config",
                                            str(cfg), "--"])):
            print(f"bench/ssh.py: {mode}...", file=sys.stderr, flush=True)
            p = subprocess.run(prefix + runner[:3] + [mode] + tail, capture_output=True,
                               text=True, timeout=3600)
            if p.returncode != 0 or not p.stdout.strip():
                print(f"bench/ssh.py: {mode} failed: {p.stderr.strip()[-2000:]}", file=sys.stderr)
                failed = True
                continue
            if mode == "agentgate" and p.stderr.strip():
                print(f"bench/ssh.py: agentgate run said: {p.stderr.strip()[-1000:]}",
                      file=sys.stderr)
            results[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        server.stop(0)
        sshd.stop()
        subprocess.run(["rm", "-rf", str(tmp)])
    if failed or len(results) != 2:
        return 1
    d, a = results["direct"], results["agentgate"]
    ratios = {k: a[k] / d[k] for k in d}
    if args.json:
        print(json.dumps({"ratios": ratios, "raw": results}, indent=2))
        return 0
    print(f"{'measure':<22}{'direct':>12}{'agentgate':>12}{'ratio':>8}")
    units = {"ssh_exec_per_s": "/s", "channel_exec_per_s": "/s"}
    for k in d:
        u = units.get(k, " MiB/s")
        print(f"{k:<22}{d[k]:>10.1f}{u[:2]:<2}{a[k]:>10.1f}{u[:2]:<2}{ratios[k]:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
