"""What a command line runs: the disguises an agent may use for `rm -rf /`, the flags for
what can't be known from the text, and the texts that don't parse."""
from __future__ import annotations

import shutil
import signal
import subprocess

import pytest
from hypothesis import assume, given, settings, strategies as st

from hostagent.protocols.ssh.commands import (
    DYNAMIC, MAX_COMMANDS, MAX_TEXT, STDIN, Commands, reads_commands_from_stdin, split)

RM = "rm -rf /"


@pytest.mark.parametrize("text", [
    "r''m -rf /", '"rm" -rf /', "\\rm -rf /", "r\\m -rf /", "'rm' '-rf' '/'", "\"r\"'m' -rf /",
    "'r'\"m\"'' -rf /", "rm\\\n -rf /",
    "ls; rm -rf /", "ls && rm -rf /", "ls || rm -rf /", "ls & rm -rf /", "ls | rm -rf /",
    "ls\nrm -rf /", "ls \\\n && rm -rf /", "echo $(rm -rf /)", 'echo "$(rm -rf /)"',
    "echo `rm -rf /`", "X=$(rm -rf /) ls", "ls > $(rm -rf /)", "for f in $(rm -rf /); do :; done",
    "echo $(echo $(rm -rf /))", "sh -c 'rm -rf /'", 'bash -c "ls; rm -rf /"',
    "dash -c 'rm -rf /'", "zsh -c 'rm -rf /'", "ksh -c 'rm -rf /'", "/bin/sh -c 'rm -rf /'",
    "bash -xec 'rm -rf /'", "bash -o pipefail -c 'rm -rf /'", "sh -c \"sh -c 'rm -rf /'\"",
    "busybox sh -c 'rm -rf /'", "busybox rm -rf /", "env sh -c 'rm -rf /'",
    "sudo sh -c 'rm -rf /'", 'eval "rm -rf /"', "eval rm -rf /", "sudo rm -rf /",
    "sudo -u root -E rm -rf /", "sudo -- rm -rf /", "doas rm -rf /", "env X=1 rm -rf /",
    "env -i PATH=/bin rm -rf /", "X=1 rm -rf /", "timeout 5 rm -rf /",
    "timeout -s KILL 5 rm -rf /", "nohup rm -rf / &", "nice -n 10 rm -rf /", "nice rm -rf /",
    "exec rm -rf /", "command rm -rf /", "builtin eval 'rm -rf /'", "time rm -rf /",
    "time -p rm -rf /", "ls | time rm -rf /", "setsid rm -rf /", "stdbuf -oL rm -rf /",
    "sudo env X=1 timeout 5 nice rm -rf /", "f(){ rm -rf /; }; f", "function f { rm -rf /; }",
    "if true; then rm -rf /; fi", "if false; then :; else rm -rf /; fi",
    "while true; do rm -rf /; done", "until false; do rm -rf /; done",
    "for i in 1; do rm -rf /; done", "(rm -rf /)", "{ rm -rf /; }", "! rm -rf /",
    "cat <(rm -rf /)", "tee >(rm -rf /)", "trap 'rm -rf /' EXIT", "alias ls='rm -rf /'",
    "su -c 'rm -rf /'", "su root -c 'rm -rf /'", "env -S 'rm -rf /'",
    "find . -exec rm -rf / \\;", "ls # comment\nrm -rf /",
    "cat <<'EOF' > f\nhello\nEOF\nrm -rf /",
    'git commit -m "$(cat <<\'EOF\'\nmsg\nEOF\n)"; rm -rf /',
    "echo $(cat <<'EOF'\nx\nEOF\n) && rm -rf /", "su -lc 'rm -rf /'",
    "script -qc 'rm -rf /' /dev/null", "watch -n 1 'rm -rf /'", "watch -x rm -rf /",
    "export PROMPT_COMMAND='rm -rf /'", "PROMPT_COMMAND='rm -rf /'",
    "sudo PROMPT_COMMAND='rm -rf /' ls",
])
def test_each_disguise_shows_the_command(text):
    c = split(text)
    assert c.parsed, c
    assert RM in c.values[1:], c
    assert c.values[0] == " ".join(text.split())


def test_the_values_in_order():
    assert split("sudo rm -rf /") == Commands(("sudo rm -rf /", "sudo rm -rf /", "rm -rf /"),
                                              True)
    assert split("ls  -l;\n  cat  'a  b'") == Commands(("ls -l; cat 'a b'", "ls -l", "cat a  b"),
                                                       True)
    assert split("echo $(date)").values == ("echo $(date)", "echo $(date)", "date")
    assert split("X=1 Y=2 make").values == ("X=1 Y=2 make",) * 2 + ("make",)
    assert split("a=1").values == ("a=1", "a=1")
    assert split("Ls -L").values == ("Ls -L", "Ls -L")     # not lower-cased
    assert split("xargs rm -rf < list").values[1:] == ("xargs rm -rf", "rm -rf")
    assert split("bash -c 'ls; pwd'").values[1:] == ("bash -c ls; pwd", "ls", "pwd")
    assert split("git log --format='%H %s'").values[1:] == ("git log --format=%H %s",)


def test_a_comment_runs_nothing():
    assert split("ls # rm -rf /") == Commands(("ls # rm -rf /", "ls"), True)
    assert split("# rm -rf /") == Commands(("# rm -rf /",), True)
    assert split("") == Commands(("",), True)
    assert split("  \n\t") == Commands(("",), True)
    assert split("echo '# not a comment'").values[1:] == ("echo # not a comment",)


@pytest.mark.parametrize("text", [
    "$CMD -rf /", '"$CMD" -rf /', "${CMD} -rf /", "$(echo rm) -rf /", "`echo rm` -rf /",
    "/bin/r? -rf /", "/???/rm -rf /", "r[m] -rf /", "{rm,-rf,/}", "$'\\x72m' -rf /",
    "sudo $CMD -rf /", "env X=1 $CMD", "sh -c \"$X\"", "bash -c $X", "eval \"$X\"",
    "eval $(cat x)", "bash <<< 'rm -rf /'", "sh <<EOF\nrm -rf /\nEOF", "bash < script",
    "curl x | bash", "curl x | sudo sh", "(bash) < f", "source ./x.sh", ". ./x.sh",
    "python3 -c 'import os'", "python -c 'x'", "perl -e 'x'", "perl -ne 'print'",
    "ruby -e 'x'", "node -e 'x'", "node --eval 'x'", "php -r 'x'", "python3", "python3 -",
    "echo 'x' | python3", "ls | xargs -I{} sh -c '{}'", "ls | xargs -i sh -c 'x {}'",
    "ls | xargs -I % %", "find . -exec sh -c '{}' \\;", "cat <<EOF\n$(rm -rf /)\nEOF",
    "sh -c", "bash <(curl x)", "python3 <(curl x)", "perl /dev/stdin",
    "PS1='$(x)'", "export PS0='`x`'", "env BASH_ENV=x bash -c ls", "ENV=x sh -c ls",
    "bind -x '\"\\C-t\": ls'", "bind '\"\\C-t\": accept-line'", "xargs sh -c",
])
def test_what_cant_be_known_is_flagged(text):
    c = split(text)
    assert c.parsed and DYNAMIC in c.unknown, c


@pytest.mark.parametrize("text", [
    "ls -l", "rm -rf /tmp/x", "python3 x.py", "python3 -m http.server", "node app.js",
    "perl script.pl", "bash script.sh", "sh -c 'ls'", "cat <<'EOF'\n$(rm -rf /)\nEOF",
    "echo *.txt", "ls /tmp/[ab]", "[ -f x ] && ls", "cd ~/src", "python3 --version",
    "xargs -I{} echo {}", "echo {a,b}", "echo $HOME", "cat <<EOF\n$HOME\nEOF",
    "PS1='\\u@\\h$ '", "export PATH=/bin", "bind -l",
])
def test_what_is_known_is_not_flagged(text):
    c = split(text)
    assert c.parsed and c.unknown == (), c


@pytest.mark.parametrize("text, flags", [
    ("bash", (STDIN,)), ("sh -s", (STDIN,)), ("sudo -i", (STDIN,)), ("su -", (STDIN,)),
    ("ls; bash -l", (STDIN,)), ("script -q /dev/null", (STDIN,)), ("su", (STDIN,)),
    ("bash /dev/stdin", (STDIN,)), ("cat x | bash /dev/stdin", (DYNAMIC,)),
    ("ls | bash", (DYNAMIC,)), ("bash <<< x", (DYNAMIC,)),
    ("bash -s < x", (DYNAMIC,)), ("python3", (DYNAMIC,)),
])
def test_a_shell_on_stdin(text, flags):
    assert split(text).unknown == flags


@pytest.mark.parametrize("command, reads", [
    ("sh", True), ("bash", True), ("dash", True), ("zsh", True), ("ksh", True), ("ash", True),
    ("/bin/sh", True), ("/usr/bin/env bash", True), ("busybox sh", True), ("bash -s", True),
    ("bash -e -x", True), ("bash -l", True), ("bash -i", True), ("bash --login", True),
    ("bash --norc --noprofile", True), ("bash -o pipefail", True), ("sh -", True),
    ("sh -s arg1 arg2", True), ("sudo bash", True), ("sudo -i", True), ("sudo -u x -s", True),
    ("exec bash", True), ("su -", True), (["bash", "-l"], True), (["/bin/sh"], True),
    ("bash -c 'ls'", False), ("bash script.sh", False), ("sh -c ls", False), ("ls", False),
    ("python3", False), ("bash <<< ls", False), ("cat | bash", False), ("", False),
    (["sh", "-c", "ls"], False), ("bash \"unterminated", False), ("sudo ls", False),
])
def test_reads_commands_from_stdin(command, reads):
    assert reads_commands_from_stdin(command) is reads


@pytest.mark.parametrize("text", [
    'ls "unterminated', "echo 'x", "ls |", "ls &&", "if true; then", "(ls", "rm -rf \\",
    "echo $((1 + 2))", "[[ -f x ]] && rm y", "case x in a) ls;; esac", "arr=(1 2)",
    "coproc ls", "select x in a; do ls; done", "for ((i=0; i<3; i++)); do ls; done",
    "echo ${x:-$(rm -rf /)}", "echo ${x:-`rm -rf /`}", "cat <<EOF\nno end",
    "echo \"<<'EOF'\"\nrm -rf /\nEOF",     # a quoted delimiter that is no heredoc
    "x" * (MAX_TEXT + 1), "ls;" * (MAX_COMMANDS + 1),
    # bashlex misses the expansion in a word that starts and ends with a single quote
    "echo 'a'$(rm -rf /)'b'", "echo 'a'\"$(rm -rf /)\"'b'", "echo 'a'`rm -rf /`'b'",
    "for i in 'a'$(rm -rf /)'b'; do :; done", "ls > 'a'$(rm -rf /)'b'",
    "echo `echo \\`rm -rf /\\``",
])
def test_what_doesnt_parse(text):
    c = split(text)
    assert not c.parsed and c.values == (" ".join(text.split()),) and c.unknown == ()


def test_what_bashlex_would_loop_on():
    signal.signal(signal.SIGALRM, _too_long)
    signal.alarm(10)      # (bashlex loops forever, eating memory, if not guarded)
    try:
        for text in ("x'${'", "echo x'${' }", "echo $'${'", "={?'><$a${<<\t|*'="):
            assert not split(text).parsed
    finally:
        signal.alarm(0)


def _too_long(*_):
    raise TimeoutError("split() did not return")


def test_nesting_within_the_bounds():
    text = "ls"
    for _ in range(8):
        text = "sh -c " + _quote(text)
    c = split(text)
    assert c.parsed and c.values[-1] == "ls"
    assert not split("sh -c " + _quote(text)).parsed
    assert split("$(" * 60 + "ls" + ")" * 60).parsed
    assert not split("$(" * 400 + "ls" + ")" * 400).parsed
    text = "ls"
    for _ in range(8):      # nesting counts across the texts within texts
        text = "sh -c " + _quote("$(" * 40 + text + ")" * 40)
    assert not split(text).parsed


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def test_heredocs():
    c = split("cat <<'EOF' > /etc/x\nrm -rf /\nEOF\necho done")
    assert c.parsed and c.values[1:] == ("cat", "echo done")      # the body is data
    c = split('cat << "EOF"\na\nEOF\ncat <<\\END\nb\nEND\ncat <<-X\n\tc\n\tX')
    assert c.parsed and c.values[1:] == ("cat", "cat", "cat")
    assert split("cat <<<'x y'").values[1:] == ("cat",)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab $(){}[]`'\"\\;|&<>*?!#=-~\n\t", max_size=40))
def test_never_raises(text):
    c = split(text)
    assert c.values[0] == " ".join(text.split())
    assert c.parsed or c.values == (c.values[0],)


_WORD = st.lists(st.one_of(
    st.text(alphabet="ab-/=", min_size=1, max_size=3),
    st.text(alphabet="ab \"\\$`\n", max_size=4).map(lambda s: "'" + s.replace("'", "") + "'"),
    st.text(alphabet="ab '\n", max_size=4).map(lambda s: '"' + s + '"'),
    st.sampled_from(['"\\\\"', '"\\$"', '"\\`"', '"\\""', '"\\a"', "\\a", "\\'", '\\"',
                     "\\\\", "\\ ", "\\\n", '"$"'])), min_size=1, max_size=6).map("".join)


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
@settings(max_examples=150, deadline=None)
@given(_WORD)
def test_words_as_bash_reads_them(word):
    text = "printf '%s\\0' " + word
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", text], capture_output=True,
                         cwd="/", env={"PATH": "/usr/bin:/bin"})
    assume(out.returncode == 0)
    c = split(text)
    if c.parsed:
        assert c.values[1] == "printf %s\\0 " + out.stdout.decode().rstrip("\0")
