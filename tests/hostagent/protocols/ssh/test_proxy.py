"""SSH through the proxy, end to end on the real kernel: OpenSSH's ssh, scp and sftp (and
asyncssh as a library) run under `agentgate run` as nobody, dial the real sshd
(tests/ssh_server.py) and are sent to the proxy by the eBPF redirect; the proxy verifies
itself to them with its CA-certified host key (OpenSSH finds the CA through the
ssh_config.d file the host agent keeps: no flags), judges every channel, logs in to
sshd with root's key, and records each channel as a session of its own."""
from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.hostagent.intercept.conftest import EchoServer, Host
from tests.ssh_server import SshServer, ssh_available
from tests.support import BIN, pending_approvals, run_cli, wait_for

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="eBPF interception needs root"),
              pytest.mark.skipif(not ssh_available(), reason="needs openssh-server")]
ENV = {"PATH": os.environ["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8"}
POLICY = """
default = "allow"
unparseable = "deny"
[[rules]]
name = "no-destruction"
action = "deny"
reason = "agents may not delete files"
commands = ["rm *", "*rm -rf*"]
[[rules]]
name = "restarts-need-a-human"
action = "review"
reason = "a human says"
commands = ["echo restart*"]
[[rules]]
name = "no-writes-to-etc"
action = "deny"
reason = "configuration is read-only"
operations = ["write"]
paths = ["/etc/*", "*/protected/*"]
[[rules]]
name = "forwards-to-the-echo-service-only"
action = "allow"
forwards = ["127.0.0.1:{echo}", "localhost:{echo}"]
[[rules]]
name = "no-other-forwards"
action = "deny"
reason = "no tunnels"
forwards = ["*"]
"""


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    s = SshServer(tmp_path_factory.mktemp("sshd")).start()
    yield s
    s.stop()


def _host(tmp_path, collector, sshd, policy: str = POLICY, known_hosts=None,
          credentials: str | None = None, user: str = "root", extra: str = ""):
    echo = EchoServer()
    h = Host(tmp_path, collector, echo)
    (tmp_path / "policy.toml").write_text(policy.replace("{echo}", str(echo.port)))
    creds = credentials or f'identity_file = "{sshd.client_key}"'
    h.config = h.write("ssh", extra=f'''
[[targets]]
name = "box"
protocol = "ssh"
address = ["127.0.0.1:{sshd.port}"]
user = "{user}"
{creds}
known_hosts = "{known_hosts or sshd.known_hosts}"
{extra}
''')
    h.config.write_text(f'policy = "{tmp_path}/policy.toml"\n' + h.config.read_text())
    h.echo_server = echo
    return h


@pytest.fixture
def make_host(tmp_path, collector, sshd):
    """make_host(policy=, known_hosts=, credentials=, user=, extra=) -> a host agent
    config with the `box` target (see _host); cleaned up after the test."""
    made = []

    def make(**options) -> Host:
        made.append(_host(tmp_path, collector, sshd, **options))
        return made[-1]
    yield make
    for h in made:
        h.cleanup()
        h.echo_server.close()


@pytest.fixture
def host(make_host):
    return make_host()


def agent(h: Host, script: str, stdin: str | None = None, popen: bool = False,
          timeout: float = 90):
    args = [str(BIN / "agentgate"), "run", "--config", str(h.config), "--user", "nobody",
            "--", "sh", "-c", script]
    if popen:
        p = subprocess.Popen(args, stdin=subprocess.PIPE if stdin is not None else None,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        return p
    p = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout,
                       env=ENV)
    h._watch_run(p.stderr)
    return p


def ssh(sshd, *args: str) -> str:
    """An OpenSSH command line as an agent writes it: no host key flags at all."""
    return " ".join(["ssh", "-o", "BatchMode=yes", "-p", str(sshd.port), *args])


def sessions(h: Host) -> list[dict]:
    return list(reversed(h.sessions("ssh")))


def events(h: Host, kind: str, channel: str | None = None) -> list[dict]:
    return [f for s in sessions(h) if channel is None or s["start"].get("channel") == channel
            for k, f in s["events"] if k == kind]


def pending(h) -> list[dict]:
    return pending_approvals(h.collector)


def test_exec_runs_with_the_injected_key_and_is_recorded(host, sshd):
    p = agent(host, ssh(sshd, "127.0.0.1", "'echo hello-from-sshd; echo to-stderr >&2; exit 3'"))
    assert p.returncode == 3, p.stderr
    assert p.stdout == "hello-from-sshd\n"
    assert "to-stderr" in p.stderr
    # the connection session: its login, as root with the proxy's key
    conn = next(s for s in sessions(host) if not s["start"].get("parent"))
    auth = next(f for k, f in conn["events"] if k == "auth")
    assert auth["remote_user"] == "root" and auth["asked_user"] == "nobody"
    # the exec channel: a session of its own, with its command, bytes and exit status
    chan = next(s for s in sessions(host) if s["start"].get("channel") == "exec")
    assert chan["start"]["parent"] == conn["id"]
    cmd = next(f for k, f in chan["events"] if k == "command")
    assert cmd["decision"]["action"] == "allow" and "hello-from-sshd" in cmd["text"]
    out = b"".join(f["data"] for k, f in chan["events"] if k == "data"
                   and f.get("stream") == "stdout")
    assert out == b"hello-from-sshd\n"
    assert any(f.get("exit_status") == 3 for k, f in chan["events"] if k == "output")
    assert "Accepted publickey for root" in sshd.log.read_text()


def test_env_is_filtered_and_signals_and_late_stderr_are_relayed(host, sshd):
    # LANG passes (env_allow's default), AGENTGATE_TEST_X doesn't (sshd would accept it)
    env = "AGENTGATE_TEST_X=leak LANG=C.UTF-8"
    p = agent(host, f"{env} " + ssh(sshd, "-o SendEnv=AGENTGATE_TEST_X -o SendEnv=LANG",
                                    "127.0.0.1", "'echo \"[$AGENTGATE_TEST_X|$LANG]\"'"))
    assert p.stdout == "[|C.UTF-8]\n", p.stderr
    # stderr written after the command closed its stdout still arrives, in order
    p = agent(host, ssh(sshd, "127.0.0.1", "'echo out; exec 1>&-; sleep 0.3; echo late >&2'"))
    assert p.returncode == 0 and p.stdout == "out\n" and "late" in p.stderr, p.stderr
    # keepalives are answered (unanswered, ssh would give up after 4 s)
    p = agent(host, ssh(sshd, "-o ServerAliveInterval=2 -o ServerAliveCountMax=1",
                        "127.0.0.1", "'sleep 5; echo still-here'"))
    assert p.returncode == 0 and p.stdout == "still-here\n", p.stderr
    # killed by a signal: OpenSSH's exit status for that, and the signal recorded
    p = agent(host, ssh(sshd, "127.0.0.1", "'kill -TERM $$'"))
    assert p.returncode == 255, p.stderr
    assert any(f.get("exit_signal") == "TERM" for f in events(host, "output", "exec"))


def test_a_denied_command_never_reaches_the_server(host, sshd):
    victim = Path("/tmp") / f"agentgate-ssh-victim-{os.getpid()}"
    victim.write_text("keep me")
    try:
        for cmd in (f"rm -rf {victim}", f"'ls /; rm -rf {victim}'",
                    f"\"sh -c 'r\"\"m -rf {victim}'\"", f"'echo $(rm -rf {victim})'"):
            p = agent(host, ssh(sshd, "127.0.0.1", cmd))
            assert p.returncode == 1, (cmd, p.stderr)
            assert "no-destruction" in p.stderr, p.stderr
        assert victim.exists()
        assert not any(str(victim) in line for line in sshd.log.read_text().splitlines()
                       if "Starting session" in line)
        denied = events(host, "command", "exec")
        assert len(denied) == 4 and {c["decision"]["action"] for c in denied} == {"deny"}
    finally:
        victim.unlink(missing_ok=True)


def test_a_script_on_stdin_to_a_shell_is_judged_line_by_line(host, sshd):
    victim = Path("/tmp") / f"agentgate-ssh-stdin-{os.getpid()}"
    victim.write_text("keep me")
    try:
        p = agent(host, ssh(sshd, "127.0.0.1", "sh"),
                  stdin=f"echo first\nrm -rf {victim}\necho last\n")
        assert p.stdout == "first\nlast\n", p.stderr
        assert "no-destruction" in p.stderr
        assert victim.exists()
        lines = [c for c in events(host, "command", "exec") if c.get("kind") == "line"]
        assert [(c["text"], c["decision"]["action"]) for c in lines] == [
            ("echo first", "allow"), (f"rm -rf {victim}", "deny"), ("echo last", "allow")]
        # a plain exec's stdin is recorded too (cat is no shell: not judged by lines)
        p = agent(host, ssh(sshd, "127.0.0.1", "cat"), stdin="fed on stdin\n")
        assert p.stdout == "fed on stdin\n"
        ins = [f["data"] for f in events(host, "data", "exec") if f.get("dir") == "in"]
        assert b"fed on stdin\n" in ins
    finally:
        victim.unlink(missing_ok=True)


def test_review_holds_the_command_until_a_human_decides(host, sshd):
    p = agent(host, "; ".join([ssh(sshd, "127.0.0.1", "echo restart-one"), "echo rc=$?",
                               ssh(sshd, "127.0.0.1", "echo restart-two"), "echo rc=$?"]),
              popen=True)
    try:
        (first,) = wait_for(lambda: pending(host), what="the first approval request")
        assert first["command"] == "echo restart-one" and first["rule"] == "restarts-need-a-human"
        r = run_cli("approvals", "approve", first["id"], "--reason", "ok", collector=host.collector)
        assert r.returncode == 0, r.stderr
        (second,) = wait_for(lambda: [a for a in pending(host) if a["id"] != first["id"]],
                             what="the second approval request")
        r = run_cli("approvals", "deny", second["id"], "--reason", "not now",
                    collector=host.collector)
        assert r.returncode == 0, r.stderr
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    host._watch_run(err)
    assert out == "restart-one\nrc=0\nrc=1\n", err
    assert "held for approval" in err and "not now" in err


def test_a_held_command_whose_agent_goes_away_is_withdrawn(host, sshd):
    p = agent(host, "timeout -s KILL 8 " + ssh(sshd, "127.0.0.1", "echo restart-later"),
              popen=True)
    try:
        (held,) = wait_for(lambda: pending(host), what="the approval request")
        out, err = p.communicate(timeout=60)      # ssh killed while held
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    host._watch_run(err)
    wait_for(lambda: not pending(host), what="the request withdrawn")
    r = run_cli("approvals", "list", "--json", collector=host.collector)
    states = {a["id"]: a["state"] for a in json.loads(r.stdout)}
    assert states[held["id"]] == "cancelled"
    assert "restart-later" not in out


def test_a_target_with_another_host_key_is_refused(make_host, sshd):
    h = make_host(known_hosts=sshd.wrong_known_hosts)
    p = agent(h, ssh(sshd, "127.0.0.1", "echo should-not-run"))
    assert p.returncode == 255
    assert "should-not-run" not in p.stdout
    assert "host key" in p.stderr and "known_hosts" in p.stderr, p.stderr
    conn = sessions(h)[0]
    assert any(k == "auth" and "host key" in f.get("refused", "") for k, f in conn["events"])


def test_password_credentials_and_the_agent_never_holds_them(make_host, sshd):
    h = make_host(user=sshd.user, credentials=f'password_file = "{sshd.password_file}"')
    p = agent(h, ssh(sshd, "127.0.0.1", "id -un") + f"; cat {sshd.password_file} "
              f"{sshd.client_key}; env")
    assert p.stdout.splitlines()[0] == sshd.user, p.stderr
    assert "Permission denied" in p.stderr          # root's files, not the agent's
    assert sshd.password not in p.stdout + p.stderr
    assert "PRIVATE KEY" not in p.stdout
    everything = json.dumps([s["events"] for s in sessions(h)], default=str)
    assert sshd.password not in everything


def test_a_certificate_credential(make_host, sshd):
    h = make_host(credentials=f'identity_file = "{sshd.cert_key}"\n'
                              f'certificate_file = "{sshd.cert}"')
    p = agent(h, ssh(sshd, "127.0.0.1", "id -un"))
    assert p.returncode == 0 and p.stdout == "root\n", p.stderr
    assert "Accepted publickey for root" in sshd.log.read_text() and \
        "ID agentgate-test" in sshd.log.read_text()        # with the certificate


def test_sftp_and_scp_are_recorded_per_file_and_writes_judged(host, sshd):
    work = host.public / "files"
    work.mkdir()
    work.chmod(0o777)
    remote = Path(f"/tmp/agentgate-sftp-{os.getpid()}")
    protected = remote / "protected"
    protected.mkdir(parents=True, exist_ok=True)
    try:
        (work / "up.bin").write_bytes(os.urandom(300_000))
        (work / "up.bin").chmod(0o644)
        (remote / "down.txt").write_text("from the server\n" * 1000)
        batch = work / "batch"
        batch.write_text(f"put {work}/up.bin {remote}/up.bin\n"
                         f"get {remote}/down.txt {work}/down.txt\n"
                         f"mkdir {remote}/newdir\n"
                         f"-put {work}/up.bin {protected}/nope.bin\n"
                         f"rename {remote}/up.bin {remote}/moved.bin\n")
        batch.chmod(0o644)
        p = agent(host, f"sftp -o BatchMode=yes -P {sshd.port} -b {batch} 127.0.0.1")
        assert p.returncode == 0, p.stderr
        assert (remote / "moved.bin").read_bytes() == (work / "up.bin").read_bytes()
        assert (work / "down.txt").read_text() == "from the server\n" * 1000
        assert (remote / "newdir").is_dir()
        assert not (protected / "nope.bin").exists()
        assert "Permission denied" in p.stderr or "refused" in p.stderr, p.stderr
        files = [f for f in events(host, "output", "subsystem") if f.get("kind") == "file"]
        assert {"path": f"{remote}/up.bin", "bytes_written": 300_000} in [
            {"path": f["path"], "bytes_written": f["bytes_written"]} for f in files]
        assert any(f["path"] == f"{remote}/down.txt" and f["bytes_read"] == 16_000
                   for f in files)
        ops = events(host, "command", "subsystem")
        refused = [c for c in ops if c["decision"]["action"] == "deny"]
        assert refused and all("protected" in " ".join(c["paths"]) for c in refused)
        assert refused[0]["decision"]["rule"] == "no-writes-to-etc"
        # scp (SFTP underneath since OpenSSH 9)
        p = agent(host, f"scp -o BatchMode=yes -P {sshd.port} {work}/up.bin "
                        f"127.0.0.1:{remote}/scp.bin")
        assert p.returncode == 0, p.stderr
        assert (remote / "scp.bin").read_bytes() == (work / "up.bin").read_bytes()
        p = agent(host, f"scp -o BatchMode=yes -P {sshd.port} {work}/up.bin "
                        f"127.0.0.1:{protected}/scp.bin")
        assert p.returncode != 0 and not (protected / "scp.bin").exists()
    finally:
        subprocess.run(["rm", "-rf", str(remote)])


def _listening_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_forwards_are_refused_unless_policy_lists_them(host, sshd):
    echo = host.echo_server.port
    # -W to the listed echo service: allowed, and a recorded session of its own
    p = agent(host, ssh(sshd, f"-W 127.0.0.1:{echo}", "127.0.0.1"), stdin="through the tunnel\n")
    assert p.stdout == "echo: through the tunnel\n", p.stderr
    fwd = [s for s in sessions(host) if s["start"].get("channel") == "forward"]
    assert fwd and fwd[0]["start"]["destination"] == f"127.0.0.1:{echo}"
    assert b"through the tunnel\n" in b"".join(f["data"] for k, f in fwd[0]["events"]
                                                 if k == "data" and f["dir"] == "in")
    # -W elsewhere (the sshd itself): refused by the open, naming the rule
    p = agent(host, ssh(sshd, f"-W 127.0.0.1:{sshd.port}", "127.0.0.1"), stdin="x\n")
    assert p.returncode != 0 and "no-other-forwards" in p.stderr, p.stderr
    # -L: a local listener, connections through it refused
    port = _listening_port()
    p = agent(host, ssh(sshd, "-o ExitOnForwardFailure=yes", f"-L {port}:127.0.0.1:{sshd.port}",
                        "127.0.0.1", f"'exec 3<>/dev/tcp/127.0.0.1/{port} 2>/dev/null; echo"
                        " sent'") + f"; python3 -c \"import socket; s=socket.create_connection("
              f"('127.0.0.1', {port})); print(repr(s.recv(10)))\" 2>&1 | tail -1")
    refused = [c for c in events(host, "command") if c.get("kind") == "forward"
               and c["decision"]["action"] == "deny"]
    assert any(c["destination"] == f"127.0.0.1:{sshd.port}" for c in refused)
    # -R: a listener on the target: refused by default
    p = agent(host, ssh(sshd, "-o ExitOnForwardFailure=yes", f"-R {_listening_port()}:"
                        f"127.0.0.1:{echo}", "127.0.0.1", "echo never"))
    assert p.returncode != 0 and "never" not in p.stdout
    assert any(c.get("forward") == "tcpip-forward" and c["decision"]["action"] == "deny"
               for c in events(host, "command"))


def test_remote_forward_allowed_by_policy(make_host, sshd):
    port = _listening_port()
    h = make_host(policy=POLICY.replace(
        'forwards = ["127.0.0.1:{echo}", "localhost:{echo}"]',
        f'forwards = ["127.0.0.1:{{echo}}", "localhost:{port}"]'))
    echo = h.echo_server.port
    # (bash's /dev/tcp on the target's side: a connection to the -R listener)
    probe = (f"exec 3<>/dev/tcp/127.0.0.1/{port}; printf over-R >&3; head -c 13 <&3")
    p = agent(h, ssh(sshd, "-o ExitOnForwardFailure=yes", f"-R localhost:{port}:127.0.0.1:"
                     f"{echo}", "127.0.0.1", f"'{probe}'"))
    assert p.returncode == 0, p.stderr
    assert p.stdout == "echo: over-R"
    fwd = [s for s in sessions(h) if s["start"].get("forward") == "forwarded-tcpip"]
    assert fwd and any(k == "data" and f["data"] == b"over-R" for k, f in fwd[0]["events"])


def test_control_master_channels_are_recorded_separately(host, sshd):
    ctl = host.public / "ctl"
    ctl.mkdir()
    ctl.chmod(0o777)
    # a control socket is a unix socket: enrolled processes reach only those allowed (a
    # master started outside agentgate would be a way around it)
    host.config.write_text(host.config.read_text().replace(
        "[intercept]\n", f'[intercept]\nunix_allow = ["{ctl}/*"]\n'))
    sock = f"{ctl}/m"
    base = ssh(sshd, f"-o ControlPath={sock}")
    p = agent(host, f"{base} -o ControlMaster=yes -o ControlPersist=no -N -f 127.0.0.1 && "
                    f"{base} 127.0.0.1 echo one && {base} 127.0.0.1 echo two && "
                    f"{base} -O exit 127.0.0.1")
    assert p.stdout == "one\ntwo\n", p.stderr
    conns = [s for s in sessions(host) if not s["start"].get("parent")]
    chans = [s for s in sessions(host) if s["start"].get("channel") == "exec"]
    assert len(conns) == 1
    assert sorted(s["start"]["command"] for s in chans) == ["echo one", "echo two"]
    assert {s["start"]["parent"] for s in chans} == {conns[0]["id"]}


def test_a_shell_on_a_pty_is_recorded_replayed_and_lines_judged(host, sshd):
    """tmux gives ssh a terminal; lines typed into the remote shell are judged."""
    victim = Path("/tmp") / f"agentgate-ssh-pty-{os.getpid()}"
    victim.write_text("keep me")
    name = f"ag{os.getpid()}"
    env = {**ENV, "TMUX_TMPDIR": str(host.public)}
    cmd = (f"{BIN / 'agentgate'} run --config {host.config} --user nobody -- "
           + ssh(sshd, "-tt", "127.0.0.1"))
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "100", "-y", "30", cmd],
                   check=True, env=env, timeout=30)
    # every byte ssh writes to its terminal, to compare with the recording (ssh takes a
    # while to log in: this is in place long before its first byte)
    subprocess.run(["tmux", "pipe-pane", "-o", "-t", name, f"cat >> {host.public}/pane.log"],
                   check=True, env=env, timeout=30)

    def screen() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True,
                              text=True, env=env, timeout=30).stdout

    def keys(*k):
        subprocess.run(["tmux", "send-keys", "-t", name, *k], check=True, env=env, timeout=30)
    try:
        wait_for(lambda: "#" in screen(), what="the remote prompt", timeout=60)
        keys("echo typed-$(expr 6 '*' 7)", "Enter")
        wait_for(lambda: "typed-42" in screen(), what="the echo's output")
        # (after a refusal's ^C, keys typed before bash's next prompt may be discarded
        # with the line: wait for the prompt)
        def prompt():
            return screen().rstrip().endswith("#")

        def wait_screen(cond, what):   # (a failure shows what the terminal showed)
            try:
                wait_for(cond, what=what)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; the screen:\n{screen()}") from None
        wait_screen(prompt, "the prompt after the echo")
        keys(f"rm -rf {victim}", "Enter")
        wait_screen(lambda: "no-destruction" in screen() and prompt(), "the refusal")
        # red team round 6: readline's M-C-e runs a line's `$(...)` without an Enter
        keys(f"echo $(touch {victim}-expanded)", "M-C-e")
        # (ESC and ^E: two keys, two refusals)
        wait_screen(lambda: screen().count("agentgate: refused") >= 3 and prompt(),
                    "the second refusal")
        subprocess.run(["tmux", "resize-window", "-t", name, "-x", "90", "-y", "25"], env=env)
        keys("exit", "Enter")
        wait_for(lambda: subprocess.run(["tmux", "has-session", "-t", name], env=env,
                                        capture_output=True).returncode != 0,
                 what="the session to end", timeout=30)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], env=env, capture_output=True)
    assert victim.exists()
    assert not Path(f"{victim}-expanded").exists()
    chan = next(s for s in sessions(host) if s["start"].get("channel") == "shell")
    lines = [(f["text"], f["decision"]["action"]) for k, f in chan["events"]
             if k == "command" and f.get("kind") == "line"]
    assert ("echo typed-$(expr 6 '*' 7)", "allow") in lines and (f"rm -rf {victim}", "deny") in lines
    shell = next(f for k, f in chan["events"] if k == "command" and f.get("kind") == "shell")
    assert shell["term"] and shell["cols"] == 100
    out = b"".join(f["data"] for k, f in chan["events"] if k == "data" and f["dir"] == "out")
    assert b"typed-42" in out
    # what the agent's terminal got, byte for byte, is what was recorded
    seen = Path(host.public / "pane.log").read_bytes()
    assert out in seen, (out[-300:], seen[-300:])
    # replay writes the terminal output byte for byte; asciicast for asciinema
    r = run_cli("sessions", "replay", chan["id"], "--speed", "0", collector=host.collector)
    assert r.returncode == 0 and "typed-42" in r.stdout
    at = 0
    # (run_cli reads text: universal newlines)
    for chunk in (f["data"].decode().replace("\r\n", "\n").replace("\r", "\n")
                  for k, f in chan["events"] if k == "data" and f["dir"] == "out"):
        at = r.stdout.index(chunk, at) + len(chunk)     # each chunk, in order
    cast = host.tmp / "shell.cast"
    r = run_cli("sessions", "export", chan["id"], "--format", "asciicast", "-o", str(cast),
                collector=host.collector)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in cast.read_text().splitlines()]
    assert rows[0]["version"] == 2 and rows[0]["width"] == 100
    assert "".join(x[2] for x in rows[1:] if x[1] == "o").encode() == out.decode(
        "utf-8", "replace").encode()
    c = subprocess.run(["script", "-qec", f"asciinema cat {cast}", "/dev/null"],
                       capture_output=True, text=True, timeout=30)
    assert c.returncode == 0 and "typed-42" in c.stdout, c.stderr


def test_asyncssh_as_a_library_through_the_proxy(host, sshd):
    script = host.public / "client.py"
    script.write_text(f'''
import asyncio, os, asyncssh
async def main():
    async with asyncssh.connect("127.0.0.1", {sshd.port}, username="nobody",
            known_hosts=os.environ["AGENTGATE_SSH_KNOWN_HOSTS"], client_keys=None,
            agent_path=None, config=None) as c:
        r = await c.run("echo from-asyncssh", check=False)
        print(r.stdout, end="")
        r = await c.run("rm -rf /tmp/nothing", check=False)
        print("rc", r.exit_status, r.stderr.strip())
asyncio.run(main())
''')
    script.chmod(0o644)
    p = agent(host, f"{BIN / 'python'} {script}")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == "from-asyncssh"
    assert p.stdout.splitlines()[1].startswith("rc 1 agentgate: refused")


def test_an_idle_connection_is_ended(make_host, sshd):
    h = make_host(extra="idle_timeout = 2")
    p = agent(h, ssh(sshd, "127.0.0.1", "'sleep 60; echo woke'"))
    assert p.returncode == 255 and "woke" not in p.stdout
    conn = next(s for s in sessions(h) if not s["start"].get("parent"))
    assert conn["end_reason"].startswith("idle for 2 s")


def test_terminal_modes_and_variables_cant_make_the_run_line_differ(host, sshd):
    """Red team: a kill character of the agent's choosing made the remote terminal drop
    the judged part of a line; a variable's value ran through `${X@P}`."""
    victim = Path("/tmp") / f"agentgate-ssh-modes-{os.getpid()}"
    victim.write_text("keep me")
    script = host.public / "modes.py"
    script.write_text(f'''
import asyncio, os, asyncssh
async def main():
    async with asyncssh.connect("127.0.0.1", {sshd.port}, username="nobody",
            known_hosts=os.environ["AGENTGATE_SSH_KNOWN_HOSTS"], client_keys=None,
            agent_path=None, config=None) as c:
        p = await c.create_process("exec sh", term_type="xterm", term_size=(80, 24),
                                   term_modes={{asyncssh.PTY_VKILL: ord("%")}})
        p.stdin.write("echo hi%rm -f {victim}\\r")
        print(await p.stdout.readuntil("{victim}\\r\\n"), flush=True)
        p.stdin.write("exit\\r")
        await p.wait()
        r = await c.run("echo ${{LC_X@P}}", env={{"LC_X": "$(rm -f {victim})"}}, check=False)
        print("rc", r.exit_status, r.stderr.strip())
asyncio.run(main())
''')
    script.chmod(0o644)
    try:
        p = agent(host, f"{BIN / 'python'} {script}")
        assert p.returncode == 0, p.stderr
        assert victim.exists()
        assert "rc 1 agentgate: refused" in p.stdout and "dynamic_command" in p.stdout
    finally:
        victim.unlink(missing_ok=True)


ALLOWLIST = """
default = "deny"
unparseable = "deny"
[[rules]]
name = "login"
action = "allow"
match = "^login as root$"
[[rules]]
name = "reads-and-tmp-writes"
action = "allow"
commands = ["ls", "ls *", "cat *", "echo *", "id", "sh", "write /tmp/*"]
[[rules]]
name = "sftp-reads"
action = "allow"
subsystems = ["sftp"]
"""


def test_an_allowlist_holds_against_redirections_erase_keys_and_links(make_host, sshd):
    """Red team round 2: `echo x > FILE` wrote any file under `echo *`; ^H erased the
    tracker's copy of a line but not the terminal's; an SFTP symlink to /etc let writes
    through a path no rule named."""
    h = make_host(policy=ALLOWLIST)
    victim = Path("/tmp") / f"agentgate-ssh-allow-{os.getpid()}"
    victim.write_text("keep me")
    etc = Path(f"/etc/agentgate-test-{os.getpid()}")
    ok = Path(f"/tmp/agentgate-allowed-{os.getpid()}")
    script = h.public / "erase.py"
    script.write_text(f'''
import asyncio, os, asyncssh
async def main():
    async with asyncssh.connect("127.0.0.1", {sshd.port}, username="nobody",
            known_hosts=os.environ["AGENTGATE_SSH_KNOWN_HOSTS"], client_keys=None,
            agent_path=None, config=None) as c:
        p = await c.create_process("sh", term_type="xterm", term_size=(80, 24))
        p.stdin.write("rm -f {victim} #" + "\\b" * 40 + "echo hi\\r")
        print(await p.stdout.readuntil("agentgate: refused"), flush=True)
        # (the refusal's ^C ends this sh, which ran nothing of the line)
        p.stdin.write_eof()
        await p.wait()
        # round 3: ^D hands a line to sh in the tty's cooked mode, a second one runs it
        p = await c.create_process("sh", term_type="xterm", term_size=(80, 24))
        p.stdin.write("rm -f {victim}\\x04\\x04")
        print(await p.stdout.readuntil("agentgate: refused"), flush=True)
        p.stdin.write_eof()
        await p.wait()
        async with c.start_sftp_client() as sftp:
            try:
                await sftp.symlink("/etc", "/tmp/agentgate-etclink-{os.getpid()}")
                print("symlink made")
            except asyncssh.SFTPError as exc:
                print("symlink refused", exc.code)
asyncio.run(main())
''')
    script.chmod(0o644)
    try:
        p = agent(h, ssh(sshd, "127.0.0.1", f"'echo pwned > {etc}'"))
        assert p.returncode == 1 and "refused" in p.stderr and not etc.exists()
        p = agent(h, ssh(sshd, "127.0.0.1", f"'echo fine > {ok}'"))
        assert p.returncode == 0 and ok.read_text() == "fine\n", p.stderr
        p = agent(h, f"{BIN / 'python'} {script}")
        assert p.returncode == 0, p.stdout + p.stderr[-1500:]
        assert victim.exists()
        assert "symlink refused 3" in p.stdout
        assert not Path(f"/tmp/agentgate-etclink-{os.getpid()}").exists()
        lines = [f for f in events(h, "command") if f.get("kind") == "line"]
        assert any(f.get("edited") and f["decision"]["action"] == "deny" for f in lines)
    finally:
        for f in (victim, etc, ok, Path(f"/tmp/agentgate-etclink-{os.getpid()}")):
            f.unlink(missing_ok=True)
