"""A host without IPv6 loopback: `agentgate run` in a network namespace of its own whose
loopback has IPv6 disabled. The proxy listens on IPv4 alone and serves; an enrolled IPv6
connect fails (it can't go around the proxy)."""
import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.hostagent.intercept.conftest import AGENT, PYTHON
from tests.support import BIN

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF interception needs root")

INSIDE = r'''
import json, os, socket, subprocess, sys, threading
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
open("/proc/sys/net/ipv6/conf/lo/disable_ipv6", "w").write("1")
echo = socket.create_server(("127.0.0.1", 0))
port = echo.getsockname()[1]
def serve():
    while True:
        c, _ = echo.accept()
        with c:
            c.sendall(b"echo: " + c.recv(100))
threading.Thread(target=serve, daemon=True).start()
cfg, tree, tmp, agent, python, binary = sys.argv[1:7]
open(cfg, "w").write(f"""
host = "v4-only"
state_dir = "{tmp}/state"
[intercept]
tree = "{tree}"
proxy_port = 0
dns = ["127.0.0.1:53535"]
[[targets]]
name = "echo"
protocol = "tcp"
address = ["127.0.0.1:{port}", "[::1]:{port}"]
""")
p = subprocess.run([binary, "run", "--config", cfg, "--", python, agent,
                    f"connect 127.0.0.1 {port} ; connect ::1 {port}"],
                   capture_output=True, text=True, timeout=120)
print(json.dumps({"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}))
'''


def test_the_proxy_serves_over_ipv4_alone_and_ipv6_connects_fail(tmp_path):
    script = tmp_path / "inside.py"
    script.write_text(INSIDE)
    tree = f"agentgate-test-{uuid.uuid4().hex[:8]}"
    p = subprocess.run(["unshare", "--net", "--", sys.executable, str(script),
                        str(tmp_path / "v4.toml"), tree, str(tmp_path), str(AGENT), PYTHON,
                        str(BIN / "agentgate")], capture_output=True, text=True, timeout=180)
    try:
        assert p.returncode == 0, p.stderr
        res = json.loads(p.stdout.splitlines()[-1])
        assert res["rc"] == 0, res["stderr"]
        v4, v6 = [json.loads(x) for x in res["stdout"].splitlines() if x.startswith("{")]
        assert v4["ok"] and v4["reply"].startswith("echo: hello"), v4
        assert not v6["ok"], v6
        assert "no IPv6 loopback" in res["stderr"]
    finally:
        subprocess.run([str(BIN / "agentgate-hostagent"), "cleanup", "--config",
                        str(tmp_path / "v4.toml")], capture_output=True, timeout=60)
