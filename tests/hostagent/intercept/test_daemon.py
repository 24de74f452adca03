"""The host agent daemon: enrollment over its socket, fail closed when it dies, adoption
of its programs when it comes back."""
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from hostagent.intercept import cgroups
from hostagent.intercept.loader import attached
from tests.hostagent.intercept.conftest import AGENT, PYTHON, UnixServer
from tests.support import BIN, wait_for

BPFFS = Path("/sys/fs/bpf")


def free_port() -> int:
    from hostagent.proxy.net import bind_pair
    socks = bind_pair(0)          # a free privileged port, as the daemon requires
    port = socks[0].getsockname()[1]
    for s in socks:
        s.close()
    return port


class Daemon:
    def __init__(self, host):
        self.host = host
        self.port = free_port()
        self.config = host.write("daemon")
        text = self.config.read_text().replace("proxy_port = 0", f"proxy_port = {self.port}")
        self.config.write_text(text)
        self.sock = host.public / "hostagent.sock"
        self.proc = None

    def start(self):
        self.log = open(self.host.tmp / "daemon.log", "ab")
        self.proc = subprocess.Popen([str(BIN / "agentgate-hostagent"), "serve", "--config",
                                      str(self.config)], stderr=self.log)

        def ready():
            assert self.proc.poll() is None, (self.host.tmp / "daemon.log").read_text()
            if not self.sock.exists():
                return False
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.sock))
                return True
            except OSError:
                return False
        wait_for(ready, timeout=60, what="host agent daemon")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture
def daemon(host):
    d = Daemon(host)
    d.start()
    yield d
    d.stop()


def in_tree_connect(host, port):
    """A process put straight into a cgroup of the tree (as a unit or container would be)."""
    cg = cgroups.tree_root(host.tree) / "manual"
    cg.mkdir(exist_ok=True)
    p = subprocess.run([PYTHON, str(AGENT), f"connect 127.0.0.1 {port}"],
                       preexec_fn=lambda: (cg / "cgroup.procs").write_text(str(os.getpid())),
                       capture_output=True, text=True, timeout=30)
    return json.loads(p.stdout)


def ours(host):
    return [p for p in attached(cgroups.tree_root(host.tree)) if p["name"].startswith("ag_")]


def test_run_through_the_daemon(host, daemon):
    rc, out, err = host.run("connect", "127.0.0.1", str(host.echo.port), ";", "exit", "5",
                            user="nobody", config=daemon.config)
    assert rc == 5, err
    assert out[0]["ok"]
    # the daemon ships on its own time: wait for what it has recorded to arrive
    wait_for(lambda: host.sessions("tcp") and any(r["end_reason"] for r in host.sessions("run")),
             what="the sessions at the collector")
    (s,) = host.sessions("tcp")
    assert s["start"]["process"]["pid"] == out[0]["pid"]
    assert s["start"]["process"]["user"] == "nobody"
    run = [x for x in host.sessions("run")][0]
    assert run["events"][-1][1]["exit_code"] == 5
    assert run["start"]["process"]["requested_by"] == "uid 0"


def test_a_daemon_enrolling_cgroups_judges_its_runs_once(host):
    """Its programs are on the cgroup2 root then, not on the tree's root as well: a run's
    refused connect is one refusal, recorded once."""
    d = with_intercept(Daemon(host), f'cgroups = ["/{host.tree}-once.slice/a.service"]')
    d.start()
    try:
        assert not ours(host)                              # not on the tree's root
        doctor = subprocess.run([str(BIN / "agentgate-hostagent"), "doctor", "--config",
                                 str(d.config)], capture_output=True, text=True, timeout=120)
        line = next(x for x in doctor.stdout.splitlines() if x.startswith("host agent programs"))
        assert "(for units and cgroups)" in line, line
        rc, out, err = host.run("connect", "127.0.0.1", "9", ";", "unix", "/run/nowhere.sock",
                                ";", "connect", "127.0.0.1", str(host.echo.port),
                                user="nobody", config=d.config)
        assert rc == 0, err
        assert [r.get("error") for r in out] == ["EPERM", "EPERM", None], out
        wait_for(lambda: any(r["end_reason"] for r in host.sessions("run")),
                 what="the run's end at the collector")
        (run,) = host.sessions("run")
        kinds = [k for k, _ in run["events"]]
        assert kinds.count("connect_denied") == 1 and kinds.count("unix_denied") == 1, kinds
        wait_for(lambda: len(host.sessions("tcp")) == 1, what="the proxied session")
    finally:
        d.stop()
        subprocess.run([str(BIN / "agentgate-hostagent"), "cleanup", "--config", str(d.config)],
                       capture_output=True, timeout=60)


def test_the_proxy_refuses_connections_the_kernel_did_not_redirect(host, daemon):
    from hostagent.proxy.driver import Proxy
    for _ in range(2):   # each run counts its own refusals, not the daemon's so far
        rc, out, err = host.run("connect", "127.0.0.1", str(daemon.port), user="nobody",
                                config=daemon.config)
        assert rc == 0 and not out[0]["ok"], (out, err)
    wait_for(lambda: len([s for s in host.sessions("run") if s["end_reason"]]) == 2,
             what="both runs' ends at the collector")
    ends = [s["events"][-1][1] for s in host.sessions("run")]
    if hasattr(Proxy, "refused_for"):
        assert [e["refused_connections"] for e in ends] == [1, 1], ends
    else:   # a proxy that can't say whose refusals they were: no count, not a wrong one
        assert not [e for e in ends if "refused_connections" in e], ends


def test_a_run_leaves_nothing_in_the_daemon_log_but_news(host, daemon):
    """Finished, then hung up on: the run ends once, and nothing fails behind the scenes."""
    rc, _, err = host.run("exit", "3", config=daemon.config)
    assert rc == 3, err
    wait_for(lambda: [s for s in host.sessions("run") if s["end_reason"]], what="the run's end")
    # An exception nobody retrieved is logged when its task is collected: at the latest
    # when the daemon exits.
    daemon.stop()
    log = (host.tmp / "daemon.log").read_text()
    assert "Traceback" not in log and "never retrieved" not in log, log
    assert not [line for line in log.splitlines() if " ERROR " in line], log
    (run,) = host.sessions("run")
    assert [kind for kind, _ in run["events"]].count("session_end") == 1
    assert run["end_reason"] == "exited"


def test_startup_refuses_with_one_line_when_the_proxy_port_is_taken(host):
    d = Daemon(host)
    taker = socket.socket()
    try:
        taker.bind(("127.0.0.1", d.port))
        taker.listen()
        p = subprocess.run([str(BIN / "agentgate-hostagent"), "serve", "--config",
                            str(d.config)], capture_output=True, text=True, timeout=60)
    finally:
        taker.close()
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line == (f"agentgate-hostagent: error: refusing to start: proxy port {d.port} is "
                    "taken (Address already in use): free it or change intercept.proxy_port")


def test_enrolling_cgroups_whose_unix_sockets_no_hook_guards_is_refused_unless_accepted(host):
    """Units, cgroups, uids and exes have no mount namespace: without the BPF hooks
    (turned off here, as on a kernel before 6.7) nothing guards their unix sockets."""
    slice_ = cgroups.cgroup2_mount() / f"{host.tree}-nohooks.slice"
    d = with_intercept(Daemon(host), f'cgroups = ["/{slice_.name}/a.service"]\n'
                                     'unix_hooks = false')
    p = subprocess.run([str(BIN / "agentgate-hostagent"), "serve", "--config", str(d.config)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert "can't be guarded here (turned off ([intercept] unix_hooks))" in line
    assert 'unix_unguarded = "accept"' in line
    d = with_intercept(d, 'unix_unguarded = "accept"')
    d.start()
    try:
        wait_for(lambda: b"accepted by unix_unguarded" in (host.tmp / "daemon.log").read_bytes(),
                 what="the warning that says so")
    finally:
        d.stop()
        subprocess.run([str(BIN / "agentgate-hostagent"), "cleanup", "--config", str(d.config)],
                       capture_output=True, timeout=60)


def test_fail_closed_when_killed_and_adopted_on_restart(host, daemon):
    port = host.echo.port
    assert in_tree_connect(host, port)["ok"]
    assert len(ours(host)) == 8
    daemon.kill()
    # the programs stay: enrolled connects now fail instead of going out unwatched
    res = in_tree_connect(host, port)
    assert not res["ok"] and res["error"] == "ECONNREFUSED"
    rc, _, err = host.run("connect", "127.0.0.1", str(port), config=daemon.config)
    assert rc == 1 and "no host agent answers" in err
    daemon.start()
    assert in_tree_connect(host, port)["ok"]
    assert len(ours(host)) == 8            # replaced, not attached twice


def test_a_user_without_access_to_the_socket_is_refused(host, daemon):
    p = subprocess.run(["runuser", "-u", "nobody", "--", str(BIN / "agentgate"), "run",
                        "--config", str(host.public_copy(daemon.config)), "--", "true"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "no permission to use the host agent's socket" in p.stderr


def test_startup_refuses_with_one_message_when_bpf_cannot_load(host):
    cfg = host.public_copy(host.write("nonroot"))
    state = host.public / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    cfg.write_text(cfg.read_text().replace(f"{host.tmp}/state-nonroot", str(state)))
    p = subprocess.run(["runuser", "-u", "nobody", "--", str(BIN / "agentgate-hostagent"),
                        "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last == ("agentgate-hostagent: error: refusing to start: interception needs root "
                    "(to load BPF programs and manage cgroups)"), p.stderr
    assert "Traceback" not in p.stderr


def test_doctor(host):
    p = subprocess.run([str(BIN / "agentgate-hostagent"), "doctor", "--json", "--config",
                        str(host.config)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    checks = {c["name"]: c for c in json.loads(p.stdout)}
    assert all(c["ok"] for c in checks.values()), checks
    assert "redirected and attributed" in checks["canary"]["detail"]
    assert "program ag_sockops" in checks


def with_intercept(d: "Daemon", line: str) -> "Daemon":
    d.config.write_text(d.config.read_text().replace("[intercept]\n", f"[intercept]\n{line}\n"))
    return d


def wait_line(proc):
    return json.loads(proc.stdout.readline())


def in_cgroup_connect(cg, port, op="connect 127.0.0.1"):
    p = subprocess.run([PYTHON, str(AGENT), f"{op} {port}"],
                       preexec_fn=lambda: (cg / "cgroup.procs").write_text(str(os.getpid())),
                       capture_output=True, text=True, timeout=30)
    return json.loads(p.stdout)


def test_enroll_an_existing_cgroup(host):
    """A cgroup enrolled by path (as a container's or a unit's), and made anew while the
    daemon can't act (stopped): the kernel enrolls the new one in the mkdir itself."""
    slice_ = cgroups.cgroup2_mount() / f"{host.tree}-ext.slice"
    outside = slice_ / "agent.service"
    outside.mkdir(parents=True)
    before_on_root = {p["id"] for p in attached(cgroups.cgroup2_mount())}
    d = with_intercept(Daemon(host), f'cgroups = ["/{slice_.name}/agent.service"]')
    d.start()
    bystander = slice_ / "other.service"
    bystander.mkdir()
    try:
        res = in_cgroup_connect(outside, host.echo.port)
        assert res["ok"]
        wait_for(lambda: host.sessions("tcp"), what="the session at the collector")
        (s,) = host.sessions("tcp")
        assert s["start"]["process"]["pid"] == res["pid"]
        assert s["start"]["process"]["cgroup"] == f"/{slice_.name}/agent.service"
        # the programs sit on the cgroup2 root, and let every other cgroup be
        ours_on_root = {p["id"] for p in attached(cgroups.cgroup2_mount())
                        if p["name"].startswith("ag_")} - before_on_root
        assert ours_on_root
        assert not any(p["name"] == "ag_connect4" for p in attached(outside))
        assert in_cgroup_connect(bystander, 9)["error"] == "ECONNREFUSED"   # not EPERM
        # unix sockets: judged for the enrolled cgroup (bound after the daemon started,
        # no mount namespace), recorded in its own run session; the bystander is let be
        late = UnixServer(str(host.public / "late.sock"))
        refused = in_cgroup_connect(outside, host.public / "late.sock", op="unix")
        assert refused["error"] == "EPERM"
        assert in_cgroup_connect(bystander, host.public / "late.sock", op="unix")["ok"]
        late.close()
        wait_for(lambda: any(k == "unix_denied" for s in host.sessions("run")
                             for k, _ in s["events"]), what="the refusal in the cgroup's run")
        (run,) = host.sessions("run")
        assert run["start"]["process"]["cgroup"] == str(outside)
        (denied,) = [f for k, f in run["events"] if k == "unix_denied"]
        assert denied["pid"] == refused["pid"] and denied["address"] == f"{host.public}/late.sock"
        # the unit restarts in a loop while the daemon is stopped: every new cgroup is
        # guarded from the first connect of the first process in it
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.setblocking(False)
        d.proc.send_signal(signal.SIGSTOP)
        try:
            ids = set()
            for _ in range(20):
                outside.rmdir()
                outside.mkdir()
                ids.add(cgroups.cgroup_id(outside))
                assert in_cgroup_connect(outside, listener.getsockname()[1])["error"] == "EPERM"
            assert len(ids) == 20
        finally:
            d.proc.send_signal(signal.SIGCONT)
        with pytest.raises(BlockingIOError):
            listener.accept()                        # nothing got through
        listener.close()
        assert in_cgroup_connect(outside, host.echo.port)["ok"]        # and on it goes
        wait_for(lambda: len(host.sessions("tcp")) == 2, what="the second session")
        # each cgroup it got has a run of its own; the old ones end saying why
        wait_for(lambda: any(s["end_reason"] == "its cgroup was made anew (a restart)"
                             for s in host.sessions("run")), what="the old cgroup's run ended")
    finally:
        d.stop()
        subprocess.run([str(BIN / "agentgate-hostagent"), "cleanup", "--config", str(d.config)],
                       capture_output=True, timeout=60)
        cgroups.remove(slice_)
    assert not any(p["name"].startswith("ag_") and p["id"] in ours_on_root
                   for p in attached(cgroups.cgroup2_mount()))
    assert not list(BPFFS.glob(f"{host.tree}/enroll*"))       # the kernel's watch is gone


def test_a_cgroup_whose_slice_is_made_after_the_daemon_started_is_guarded_at_once(host):
    """The programs sit on the cgroup2 root, not on a parent that may come and go."""
    slice_ = cgroups.cgroup2_mount() / f"{host.tree}-late.slice"
    unit = slice_ / "agent.service"
    d = with_intercept(Daemon(host), f'cgroups = ["/{slice_.name}/agent.service"]')
    d.start()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    try:
        for _ in range(3):           # the slice made, removed and made again
            unit.mkdir(parents=True)
            assert in_cgroup_connect(unit, listener.getsockname()[1])["error"] == "EPERM"
            unit.rmdir()
            slice_.rmdir()
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
        d.stop()
        subprocess.run([str(BIN / "agentgate-hostagent"), "cleanup", "--config", str(d.config)],
                       capture_output=True, timeout=60)
        for c in (unit, slice_):
            if c.exists():
                cgroups.remove(c)


def test_enroll_by_executable_on_exec(host):
    exe = host.public / "agent-python"
    exe.write_bytes(open(os.path.realpath(PYTHON), "rb").read())
    exe.chmod(0o755)
    d = with_intercept(Daemon(host), f'exes = ["{exe}"]')
    d.start()
    try:
        # started outside the tree, by nobody's hand in no cgroup of ours
        p = subprocess.Popen([str(exe), str(AGENT), f"wait ; connect 127.0.0.1 {host.echo.port}"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert wait_line(p)["op"] == "wait"
        matched = cgroups.tree_root(host.tree) / "matched"
        wait_for(lambda: p.pid in cgroups.pids(matched), what="enrollment on exec")
        p.stdin.write("go\n")
        p.stdin.flush()
        res = wait_line(p)
        p.wait(30)
        assert res["ok"]
        wait_for(lambda: host.sessions("tcp"), what="the session at the collector")
        (s,) = host.sessions("tcp")
        assert s["start"]["process"]["pid"] == p.pid
        assert s["start"]["process"]["exe"] == str(exe)
    finally:
        d.stop()


def test_the_control_socket_finishes_only_its_own_runs(host, daemon):
    """A caller may end the runs its own connection enrolled, nothing else: not another
    run, not a path of its choosing."""
    from hostagent.control import ControlError, DaemonClient
    victim = subprocess.Popen(["sleep", "60"])
    mine = subprocess.Popen(["sleep", "60"])
    a, b = DaemonClient(str(daemon.sock)), DaemonClient(str(daemon.sock))
    try:
        group = a.call("enroll", pid=victim.pid, argv=["sleep"])["group"]
        b.call("enroll", pid=mine.pid, argv=["sleep"])
        for attempt in (group, f"{group}/../../{host.tree}", "../x"):
            with pytest.raises(ControlError, match="no run"):
                b.call("finish", group=attempt, exit_code=0)
        assert victim.poll() is None
        a.call("finish", group=group, exit_code=0)
        assert victim.wait(10) == -9           # its cgroup was ended with it
    finally:
        a.close()
        b.close()                              # closing ends b's run too: nothing leaks
        for p in (victim, mine):
            p.kill()
            p.wait()
    wait_for(lambda: not [d for d in cgroups.tree_root(host.tree).iterdir()
                          if d.is_dir() and d.name.startswith("run-")], what="runs cleaned up")
    wait_for(lambda: sorted(s["end_reason"] for s in host.sessions("run"))
             == ["agentgate run went away", "exited"], what="both runs ended at the collector")


def test_enrolled_on_exec_before_its_first_instruction(host):
    """Stopped by the kernel at exec: even a child forked at once starts in the tree."""
    exe = host.public / "agent-python2"
    exe.write_bytes(open(os.path.realpath(PYTHON), "rb").read())
    exe.chmod(0o755)
    d = with_intercept(Daemon(host), f'exes = ["{exe}"]')
    d.start()
    try:
        p = subprocess.run([str(exe), str(AGENT), f"child connect 127.0.0.1 {host.echo.port}"],
                           capture_output=True, text=True, timeout=60)
        res = json.loads(p.stdout)
        assert res["ok"], res
        wait_for(lambda: host.sessions("tcp"), what="the session at the collector")
        (s,) = host.sessions("tcp")
        assert s["start"]["process"]["pid"] == res["pid"]
    finally:
        d.stop()


def test_units_get_drop_ins_whose_pinned_programs_guard_a_new_cgroup_at_once(host, tmp_path):
    """systemd is not running here: the drop-in is checked with systemd-analyze, and a
    stand-in for systemd makes the unit's cgroup where systemd would (the kernel enrolls
    it in the mkdir) and attaches what the drop-in names (as BPFProgram= does when a
    unit restarts), before anything runs in it."""
    import socket as sk
    dropins = tmp_path / "units"
    docker = sk.socket(sk.AF_UNIX, sk.SOCK_STREAM)
    docker.bind(str(tmp_path / "docker.sock"))      # bound before the daemon starts
    docker.listen(1)
    d = with_intercept(Daemon(host), f'units = ["agent-x.service"]\n'
                                     f'unit_dropin_dir = "{dropins}"')
    d.start()
    slice_ = cgroups.cgroup2_mount() / "system.slice"
    made_slice = not slice_.exists()
    fresh = slice_ / "agent-x.service"
    try:
        conf = dropins / "agent-x.service.d" / "50-agentgate.conf"
        wait_for(conf.exists, what="the drop-in")
        progs = [line.split("=", 1)[1].split(":", 1) for line in conf.read_text().splitlines()
                 if line.startswith("BPFProgram=")]
        assert {k for k, _ in progs} == {"connect4", "connect6", "sendmsg4", "sendmsg6",
                                         "sock_create", "bind4", "bind6", "sock_ops"}
        text = conf.read_text()
        assert "ProtectControlGroups=yes" in text                  # can't move out
        assert "RestrictNamespaces=~user" in text                  # nor mount over paths
        assert f"InaccessiblePaths=-{tmp_path / 'docker.sock'}" in text
        unit = dropins / "agent-x.service"
        unit.write_text("[Unit]\nDescription=an agent\n[Service]\nExecStart=/bin/true\n")
        r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                           text=True, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{dropins}:"})
        assert r.returncode == 0, r.stderr
        fresh.mkdir(parents=True)
        for kind, path in progs:
            subprocess.run(["bpftool", "cgroup", "attach", str(fresh), kind, "pinned", path,
                            "multi"], check=True, capture_output=True)

        def connect(port):
            p = subprocess.run([PYTHON, str(AGENT), f"connect 127.0.0.1 {port}"],
                               preexec_fn=lambda: (fresh / "cgroup.procs").write_text(
                                   str(os.getpid())), capture_output=True, text=True, timeout=30)
            return json.loads(p.stdout)
        assert connect(9)["error"] == "EPERM"          # not a target: refused at once
        assert connect(host.echo.port)["ok"]           # a target: through the proxy
        wait_for(lambda: host.sessions("tcp"), what="the proxied session")
    finally:
        docker.close()
        d.stop()
        subprocess.run([str(BIN / "agentgate-hostagent"), "cleanup", "--config", str(d.config)],
                       capture_output=True, timeout=60)
        if fresh.exists():
            cgroups.remove(fresh)
        if made_slice:
            slice_.rmdir()
    assert not conf.exists()                           # cleanup takes it away


def test_runs_through_the_daemon_trust_its_local_ca(host):
    """An https target makes the daemon's local CA; what it runs gets the CA-bundle
    variables of common clients pointing at the system's CAs plus that CA."""
    d = Daemon(host)
    d.config.write_text(d.config.read_text() + '''
[[targets]]
name = "api"
protocol = "https"
address = "127.0.0.1:9"
''')
    d.start()
    try:
        p = subprocess.run([str(BIN / "agentgate"), "run", "--config", str(d.config), "--user",
                            "nobody", "--", "sh", "-c",
                            "echo $SSL_CERT_FILE; echo $NODE_EXTRA_CA_CERTS; echo $CURL_CA_BUNDLE"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        bundle, ca, curl = p.stdout.split()
        assert bundle == curl and bundle == f"/run/agentgate/trust/{host.tree}/bundle.pem"
        root = open(ca).read()
        assert root.startswith("-----BEGIN CERTIFICATE-----") and root in open(bundle).read()
    finally:
        d.stop()
