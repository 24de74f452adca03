"""`agentgate run -- CMD` on the real kernel: redirect, attribution, exit codes."""
import os

from tests.hostagent.intercept.conftest import PYTHON


def only(items):
    assert len(items) == 1, items
    return items[0]


def test_connect_is_proxied_recorded_and_attributed(host):
    rc, out, err = host.run("connect", "127.0.0.1", str(host.echo.port), ";", "exit", "7")
    assert rc == 7, err
    (res,) = out
    assert res["ok"] and res["reply"] == f"echo: hello from {res['pid']}\n"
    s = only(host.sessions("tcp"))
    start = s["start"]
    assert start["target"] == "echo" and start["destination"] == f"127.0.0.1:{host.echo.port}"
    proc = start["process"]
    assert proc["verified"] and proc["pid"] == res["pid"] and proc["uid"] == 0
    assert proc["exe"] == os.path.realpath(PYTHON) and "connect" in " ".join(proc["argv"])
    assert proc["cgroup"].startswith(f"/{host.tree}/run-")
    data = [f for kind, f in s["events"] if kind == "data"]
    assert data[0] == {"dir": "in", "data": f"hello from {res['pid']}\n".encode()}
    assert data[1]["dir"] == "out" and data[1]["data"].startswith(b"echo: ")
    assert s["events"][-1][0] == "session_end"
    # the upstream saw the proxy, not the agent: the connection really went through it
    assert host.echo.peers and all(p[0] in ("127.0.0.1", "::1") for p in host.echo.peers)
    run = only(host.sessions("run"))
    assert run["events"][-1][1]["exit_code"] == 7
    assert any(k == "exec" and f["filename"].endswith("python3") for k, f in run["events"])


def test_ipv6_and_v4_mapped_destinations(host):
    port = str(host.echo.port)
    rc, out, err = host.run("connect", "::1", port, ";", "connect", "::ffff:127.0.0.1", port)
    assert rc == 0, err
    assert [r["ok"] for r in out] == [True, True], out
    dests = sorted(s["start"]["destination"] for s in host.sessions("tcp"))
    assert dests == sorted([f"127.0.0.1:{port}", f"[::1]:{port}"])


def test_children_and_grandchildren_are_enrolled(host):
    port = str(host.echo.port)
    rc, out, err = host.run("child", "connect", "127.0.0.1", port, ";",
                            "grandchild", "connect", "127.0.0.1", port)
    assert rc == 0, err
    child, grandchild = out
    assert child["ok"] and grandchild["ok"]
    by_pid = {s["start"]["process"]["pid"]: s["start"]["process"] for s in host.sessions("tcp")}
    assert set(by_pid) == {child["pid"], grandchild["pid"]}
    g = by_pid[grandchild["pid"]]
    assert g["ppid"] == grandchild["ppid"]
    assert [p["pid"] for p in g["parents"]][0] == grandchild["ppid"]


def test_two_concurrent_agents_as_different_users(host):
    port = str(host.echo.port)
    second = host.write("second")
    a = host.popen("sleep", "0.5", ";", "connect", "127.0.0.1", port, user="nobody")
    b = host.popen("sleep", "0.5", ";", "connect", "::1", port, user="daemon", config=second)
    outs = {}
    for name, p in (("nobody", a), ("daemon", b)):
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, stderr
        outs[name] = [line for line in stdout.splitlines() if '"connect"' in line]
    import json
    sessions = {s["start"]["process"]["user"]: s["start"] for s in host.sessions("tcp")}
    for user in ("nobody", "daemon"):
        res = json.loads(outs[user][0])
        assert res["ok"], res
        start = sessions[user]
        assert start["process"]["pid"] == res["pid"] and start["process"]["uid"] == res["uid"]
    assert sessions["nobody"]["destination"].startswith("127.0.0.1")
    assert sessions["daemon"]["destination"].startswith("[::1]")
    assert sessions["nobody"]["session_group"] != sessions["daemon"]["session_group"]


def test_processes_outside_the_tree_are_untouched(host, echo):
    import socket
    from tests.support import wait_for
    other = socket.create_server(("127.0.0.1", 0))     # not a target
    p = host.popen("sleep", "3", user="nobody")
    try:
        wait_for(lambda: any(s["protocol"] == "run" for s in host.sessions()), what="the run")
        # while an agent is enrolled, this test process (not enrolled) connects freely
        socket.create_connection(other.getsockname(), timeout=5).close()
        c = socket.create_connection(("127.0.0.1", echo.port), timeout=5)
        c.sendall(b"direct\n")
        assert c.recv(100) == b"echo: direct\n"
        c.close()
    finally:
        p.communicate(timeout=30)
        other.close()
    # the run returned after shipping everything: the direct connection was not proxied
    assert host.sessions("tcp") == []


def test_exit_code_and_missing_command(host):
    rc, _, err = host.run("exit", "42")
    assert rc == 42, err
    import subprocess
    from tests.support import BIN
    p = subprocess.run([str(BIN / "agentgate"), "run", "--config", str(host.config), "--",
                        "/no/such/cmd"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "cannot run /no/such/cmd" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_an_unreachable_target_looks_refused_to_the_agent(host):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                     # nothing listens there now
    cfg = host.write("down", extra=f'[[targets]]\nname = "down"\nprotocol = "tcp"\naddress = "127.0.0.1:{port}"\n')
    rc, out, err = host.run("connect", "127.0.0.1", str(port), config=cfg, user="nobody")
    assert rc == 0 and not out[0]["ok"] and out[0]["error"] in ("ECONNRESET", "EPIPE"), out
    (s,) = host.sessions("tcp")
    assert s["end_reason"].startswith("upstream unreachable")


def test_a_root_agent_is_refused_where_it_could_leave_its_cgroup(monkeypatch, tmp_path):
    # without nsdelegate, a cgroup namespace doesn't stop root writing any cgroup.procs:
    # a root agent is refused, in one line, before anything runs
    import pytest

    from hostagent import run
    from hostagent.config import HostAgentConfig
    from hostagent.intercept.loader import InterceptError
    monkeypatch.setattr(run.cgroups, "ensure_nsdelegate", lambda: False)
    monkeypatch.setattr(run.DaemonClient, "connect", staticmethod(lambda path: None))
    marker = tmp_path / "ran"
    with pytest.raises(InterceptError, match="lacks nsdelegate.*--user"):
        run.run_command(["touch", str(marker)], HostAgentConfig())
    assert not marker.exists()


def test_a_sub_cgroup_of_a_run_is_still_in_the_tree(host):
    # an agent (root, inside its cgroup namespace) may make cgroups below its run's: what
    # runs there is still proxied, and its exec events reach the run's recording
    from hostagent.intercept.cgroups import cgroup2_mount
    tree = cgroup2_mount() / host.tree
    rc, out, err = host.run("descend", str(tree), ";", "connect", "127.0.0.1",
                            str(host.echo.port))
    assert rc == 0, err
    assert out[0]["ok"] and out[0]["cgroup"].endswith("/sub"), out
    assert out[1]["ok"], out
    (s,) = host.sessions("tcp")
    assert s["start"]["process"]["cgroup"].endswith("/sub")
    run = only(host.sessions("run"))
    assert any(k == "exec" and f["filename"] == "/bin/true" for k, f in run["events"]), \
        [f for k, f in run["events"] if k == "exec"]


def test_without_a_guard_for_abstract_sockets_a_run_is_refused_unless_the_gap_is_accepted(
        monkeypatch):
    import pytest

    from hostagent import run
    from hostagent.config import HostAgentConfig
    from hostagent.intercept.loader import InterceptError
    monkeypatch.setattr(run.unixguard, "landlock_abi", lambda: 5)   # a kernel before 6.12
    cfg = HostAgentConfig()
    with pytest.raises(InterceptError, match='abstract_unix = "allow"'):
        run._unix_plan(cfg, hooks=False)                             # and before 6.7
    plan = run._unix_plan(cfg, hooks=True)                           # 6.7 to 6.11
    assert plan.record()["abstract"] == "refused unless allowed (BPF hook)"
    cfg.intercept.abstract_unix = "allow"
    plan = run._unix_plan(cfg, hooks=False)
    assert not plan.scope_abstract and "reachable" in plan.record()["abstract"]


def test_cleanup_ends_a_run_whose_agentgate_run_died_before_it_detaches(host):
    # the agent kills its `agentgate run` (programs stay: it fails closed), then an
    # operator runs cleanup: the agent must not go on with the programs gone
    import signal
    import subprocess

    from hostagent.intercept import cgroups
    from tests.support import BIN, wait_for
    p = host.popen("sleep", "120")
    first = p.stdout.readline()
    assert '"op": "sleep"' in first, first
    tree = cgroups.cgroup2_mount() / host.tree
    run_cg = next(c for c in tree.iterdir() if c.name.startswith("run-"))
    (agent_pid,) = cgroups.pids(run_cg)
    p.send_signal(signal.SIGKILL)            # the `agentgate run` parent dies
    p.wait(10)
    assert os.path.exists(f"/proc/{agent_pid}")
    r = subprocess.run([str(BIN / "agentgate-hostagent"), "cleanup", "--config",
                        str(host.config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not os.path.exists(f"/proc/{agent_pid}") or
             open(f"/proc/{agent_pid}/stat").read().split()[2] == "Z", what="the agent ended")
