"""What policy sees of SSH actions, and how the rules judge it (no sockets)."""
from __future__ import annotations

from hostagent.policy import Policy, Rule, decide
from hostagent.protocols.ssh.requests import Who
from hostagent.protocols.ssh.sftp import Op

WHO = Who("box", {"user": "bot", "uid": 1000}, "deploy")


def policy(*rules, default="allow") -> Policy:
    return Policy(default=default, unparseable="deny", rules=tuple(rules))


def rule(name, action, **matchers) -> Rule:
    return Rule(name=name, action=action, matchers=tuple(matchers.items()))


def test_an_allowlist_must_allow_every_command_a_line_runs():
    p = policy(rule("reads", "allow", commands=("ls", "ls *", "cat *")), default="deny")
    for text, action in (("ls -la /srv", "allow"), ("ls; cat /etc/hosts", "allow"),
                         ("ls; rm -rf /", "deny"), ("ls $(rm -rf /)", "deny"),
                         ("ls && sh -c 'rm -rf /'", "deny"), ("cat x | sh", "deny")):
        req, fields = WHO.command("exec", text)
        assert decide(p, req).action == action, text
        assert fields["kind"] == "exec" and fields["remote_user"] == "deploy"


def test_a_deny_rule_matches_any_command_of_a_line():
    p = policy(rule("no-rm", "deny", commands=("rm *",)))
    for text in ("rm -rf /", "ls; rm -rf /", "echo `rm -rf /`", "sudo rm -rf /",
                 "r''m -rf /", "bash -c 'ls; rm -rf /'"):
        assert decide(p, WHO.command("exec", text)[0]).rule == "no-rm", text
    assert decide(p, WHO.command("exec", "ls -la")[0]).action == "allow"


def test_what_cant_be_known_takes_the_unparseable_decision():
    p = policy()
    for text in ("$CMD -rf /", "python3 -c 'import os'", "ls \"unterminated"):
        d = decide(p, WHO.command("exec", text)[0])
        assert (d.action, d.rule) == ("deny", "(unparseable)"), text
    # a shell reading its commands from stdin: fine when its lines are judged
    assert decide(p, WHO.command("exec", "bash -s", lines_judged=True)[0]).action == "allow"
    assert decide(p, WHO.command("exec", "bash -s")[0]).action == "deny"
    # an allow rule naming the flag lets it through
    p = policy(rule("py", "allow", commands=("python3 *",), flags=("dynamic_command",)))
    assert decide(p, WHO.command("exec", "python3 -c 'import os'")[0]).rule == "py"


def test_remote_users_apply_to_every_action():
    p = policy(rule("not-root", "deny", remote_users=("root",)))
    root = Who("box", {}, "root")
    assert decide(p, root.login()).rule == "not-root"
    assert decide(p, root.command("exec", "id")[0]).rule == "not-root"
    assert decide(p, WHO.login()).action == "allow"


def test_sftp_operations_and_paths():
    p = policy(rule("ro-etc", "deny", operations=("write",), paths=("/etc/*",)))
    write = Op(id=3, name="open", paths=("/etc/passwd",), writes=True, kinds=("open", "write"))
    read = Op(id=4, name="open", paths=("/etc/passwd",), writes=False, kinds=("open", "read"))
    req, fields = WHO.sftp(write)
    assert decide(p, req).rule == "ro-etc"
    assert fields == {"text": "sftp open /etc/passwd", "kind": "sftp", "operation": "open",
                      "paths": ["/etc/passwd"], "writes": True, "remote_user": "deploy"}
    assert decide(p, WHO.sftp(read)[0]).action == "allow"
    assert decide(p, WHO.subsystem("sftp")[0]).action == "allow"
    p = policy(rule("no-sftp", "deny", subsystems=("sftp",)))
    assert decide(p, WHO.subsystem("sftp")[0]).rule == "no-sftp"


def test_forwards_by_destination():
    p = policy(rule("db", "allow", forwards=("10.0.0.5:5432",)),
               rule("none", "deny", forwards=("*",)))
    assert decide(p, WHO.forward("direct-tcpip", "10.0.0.5:5432")[0]).rule == "db"
    assert decide(p, WHO.forward("direct-tcpip", "10.0.0.5:22")[0]).rule == "none"
    assert decide(p, WHO.forward("direct-streamlocal", "/run/docker.sock")[0]).rule == "none"
    # a forward is no command: command rules don't see it
    p = policy(rule("no-rm", "deny", commands=("*",)))
    assert decide(p, WHO.forward("direct-tcpip", "10.0.0.5:22")[0]).action == "allow"


def test_what_the_words_dont_show_is_flagged():
    """Found by red-teaming: code bash runs from a variable's value (the agent sets
    LC_*), settings after which typed lines aren't what we see, a script on stdin
    behind a file name, file transfers no SFTP rule sees."""
    p = policy(rule("echo", "allow", commands=("echo *", "ls *", "stty *", "scp *", "sh *",
                                               "let *")), default="deny")
    for text, flag in (("echo ${LC_X@P}", "dynamic_command"), ("echo ${!LC_X}", "dynamic_command"),
                       ("ls ${LANG:LC_X}", "dynamic_command"), ("echo ${a[$x]}", "dynamic_command"),
                       ("let 'a[$(id)]'", "dynamic_command"), ("stty kill %", "terminal_settings"),
                       ("sh /dev/stdin", "stdin_program"), ("scp -t /etc/x", "file_transfer"),
                       ("/usr/lib/openssh/sftp-server", "file_transfer")):
        req, fields = WHO.command("exec", text)
        assert flag in req.unknown and flag in fields["flags"], text
        assert decide(p, req).action == "deny", text
    for text in ("echo ${HOME:-/tmp}", "echo $HOME", "echo ${#HOME}"):
        assert decide(p, WHO.command("exec", text)[0]).rule == "echo", text
    # a path-qualified command is judged by its name too
    p = policy(rule("no-rm", "deny", commands=("rm *",)))
    assert decide(p, WHO.command("exec", "/bin/rm -rf /x")[0]).rule == "no-rm"


def test_paths_and_destinations_are_judged_as_the_server_reads_them():
    p = policy(rule("ro-etc", "deny", operations=("write",), paths=("/etc/*",)),
               rule("no-ssh-tunnel", "deny", forwards=("127.0.0.1:22",)))
    for path in ("//etc/x", "/tmp/../etc/x", "/./etc/x", "/etc//x"):
        op = Op(id=1, name="open", paths=(path,), writes=True, kinds=("open", "write"))
        assert decide(p, WHO.sftp(op)[0]).rule == "ro-etc", path
    # a relative path is relative to a home we don't know: unparseable
    op = Op(id=1, name="open", paths=("../etc/x",), writes=True, kinds=("open", "write"))
    assert decide(p, WHO.sftp(op)[0]).rule == "(unparseable)"
    rename = Op(id=2, name="posix-rename", paths=("/tmp/a", "//etc/a"), writes=True,
                kinds=("posix-rename", "rename", "write"))
    assert decide(p, WHO.sftp(rename)[0]).rule == "ro-etc"
    for where in ("127.1:22", "[::ffff:127.0.0.1]:22", "0x7f.0.0.1:22", "127.0.0.1:22"):
        assert decide(p, WHO.forward("direct-tcpip", where)[0]).rule == "no-ssh-tunnel", where


def test_a_write_target_the_shell_computes_is_not_judged_as_written():
    """Red team round 3: `echo x > /tmp/${U:-../etc/x}` was judged as a write under
    /tmp and wrote /etc/x."""
    p = policy(rule("tmp", "allow", commands=("echo *", "write /tmp/*")), default="deny")
    assert decide(p, WHO.command("exec", "echo x > /tmp/ok")[0]).rule == "tmp"
    for text in ("echo x > /tmp/${U:-../etc/x}", "echo x > /tmp/$(echo ../etc/x)",
                 "echo x > out.txt", "echo x > /tm?/../etc/x", "echo x > ~root/.bashrc"):
        req = WHO.command("exec", text)[0]
        assert "dynamic_write" in req.unknown and decide(p, req).action == "deny", text


def test_history_expansion_in_a_typed_line_is_flagged():
    """An interactive bash expands `!!` or `^a^b` before running the line: the judged
    text is not what runs (lines only: `bash -c` expands no history)."""
    for text in ("!!", "echo !$", "!rm", "^echo^rm", "fc -s"):
        assert "history" in WHO.command("line", text)[0].unknown, text
        assert "history" not in WHO.command("exec", text)[0].unknown, text
    for text in ("echo hi!", "[ ! -f x ]", "echo a"):
        assert "history" not in WHO.command("line", text)[0].unknown, text


def test_a_shell_whose_stdin_is_not_the_sessions_is_not_lines_judged():
    """Red team round 4: `sh 0>&3` with fd 3 a here-string, `f() { sh; }; f < script`
    and `exec < script; sh` ran scripts under an allowlist allowing `sh` (whose stdin
    lines were to be judged); history characters and vi mode changed, later lines run
    otherwise than typed."""
    p = policy(rule("sh", "allow", commands=("sh", "ls *", "printf *", "histchars=*",
                                             "set *", "exec")), default="deny")
    for text in ("sh 3<<<'rm -f x' 0>&3", "sh 3</tmp/x 0>&3", "ls() { sh; }; ls </tmp/x",
                 "f() { sh; }; printf x | f", "exec </tmp/x; sh"):
        req = WHO.command("exec", text, lines_judged=True)[0]
        assert "dynamic_command" in req.unknown and decide(p, req).action == "deny", text
    assert decide(p, WHO.command("exec", "sh", lines_judged=True)[0]).rule == "sh"
    for text in ("histchars=@", "set -o vi", "INPUTRC=/tmp/x bash"):
        req = WHO.command("line", text)[0]
        assert "terminal_settings" in req.unknown and decide(p, req).action == "deny", text


def test_round_five_dash_reads_and_hooks_and_sftp_kinds():
    """Red team round 5: dash reads `a &>f b` as `a &` then `b >f`; variables that run
    code were set by `for PS1 in ...` and `${PROMPT_COMMAND:=...}`; an SFTP rule listing
    read operations allowed an open for writing (its kinds include `read`)."""
    p = policy(rule("ok", "allow", commands=("echo *", "ls", "write /tmp/*")), default="deny")
    req = WHO.command("exec", "echo x &>/dev/null rm -f /tmp/v")[0]
    assert "rm -f /tmp/v" in req.attributes["commands"] and decide(p, req).action == "deny"
    assert decide(p, WHO.command("exec", "ls &>/dev/null")[0]).rule == "ok"
    for text in ("for PS1 in '$(rm -f x)$ '; do echo x; done", "echo ${PROMPT_COMMAND:=rm x}",
                 'PS1="\\044(rm)# "', "export PATH=/tmp/d", "for PATH in /tmp/d; do ls; done"):
        req = WHO.command("line", text)[0]
        assert "dynamic_command" in req.unknown and decide(p, req).action == "deny", text
    assert "dynamic_command" not in WHO.command("exec", "echo $PATH ${PATH:-/bin}")[0].unknown
    ro = policy(rule("ro", "allow", subsystems=("sftp",),
                     operations=("open", "read", "stat", "lstat", "close")), default="deny")
    writing = Op(1, "open", ("/etc/x",), True, ("open", "read", "write"))
    reading = Op(2, "open", ("/etc/x",), False, ("open", "read"))
    assert decide(ro, WHO.sftp(writing)[0]).action == "deny"
    assert decide(ro, WHO.sftp(reading)[0]).rule == "ro"
