"""What policy sees of an SSH action: plain data in, a policy Request out.

Kinds of action: login (the account the proxy logs in as), exec (a command), shell (a
shell opened), line (a line typed into a shell, or fed to one on stdin), subsystem,
sftp (one SFTP operation), forward (a port or socket forward). Every Request carries
`remote_users`; commands are split into the simple commands they run (commands.py) and
judged as readings: a deny rule matches if any of them does, an allow rule only if all
do, so `ls; rm -rf /` is not let through by `commands = ["ls *"]`.
"""
from __future__ import annotations

import ipaddress
import posixpath
import re
import socket
from dataclasses import dataclass

from hostagent.policy import Request
from hostagent.protocols.ssh.commands import STDIN, split

# Expansions that run code bash finds inside a variable's value (an agent sets values
# through LC_*/LANG or its terminal's type): indirection `${!x}`, transformations
# `${x@P}`, substring offsets and subscripts (arithmetic, where `a[$(cmd)]` runs),
# `$[...]` arithmetic
_HIDDEN_EXPANSION = re.compile(r"\$\{[#!]?[^}]*?(?:\{|!|@|\[|:(?![-=?+]))|\$\[")
# builtins that evaluate their arguments as arithmetic or variable names, where a
# subscript's `$(...)` runs
_EVALUATING = frozenset("let declare typeset local readonly export printf read unset test [ "
                        "mapfile readarray getopts wait".split())
# commands that change how the terminal (or the shell's line editor) reads keys: after
# them, lines typed are not the lines we see
_TERMINAL = frozenset("stty bind setterm reset tset".split())
_SHELL_NAMES = frozenset("sh bash rbash dash zsh ksh mksh ash yash posh".split())
_STDIN_FILES = re.compile(r"^(?:/dev/stdin|/dev/fd/\d+|/proc/(?:self|\d+|thread-self)/fd/\d+|-)$")
_HOOK_NAMES = (r"(?:PS[0-4]|PROMPT_COMMAND|BASH_ENV|ENV|PATH|IFS|LD_PRELOAD|"
               r"LD_LIBRARY_PATH|BASH_LOADABLES_PATH|command_not_found_handle)\b")
_HOOK_VARS = re.compile(r"(?<![$\w{])" + _HOOK_NAMES + r"|\$\{" + _HOOK_NAMES + r"[^}]*?=")
_HISTORY = re.compile(r"!(?=[^\s=(\"'])")
_UNKNOWN_TARGET = re.compile(r"[$`*?\[~{]")
# file transfers run as commands, whose files no SFTP rule sees
_TRANSFERS = re.compile(r"^(?:scp(?: .*)? -[a-zA-Z]*[tf]|\S*sftp-server\b|rsync .*--server\b)")

EMPTY = {"commands": (), "subsystems": (), "forwards": (), "paths": (), "operations": (),
         "flags": ()}


@dataclass(frozen=True)
class Who:
    """The session's side of every request: which target, which agent, as whom."""
    target: str
    identity: dict
    remote_user: str

    def request(self, action: str, text: str, *, parsed: bool = True,
                unknown: tuple[str, ...] = (), **attrs) -> Request:
        attributes = {**EMPTY, **attrs, "remote_users": (self.remote_user,)}
        if unknown:
            attributes["flags"] = tuple(attributes["flags"]) + tuple(unknown)
        return Request(target=self.target, protocol="ssh", identity=self.identity,
                       action=action, resources=(self.remote_user,), attributes=attributes,
                       text=text, parsed=parsed, unknown=unknown,
                       readings=("commands", "forwards", "paths", "operations"))

    def login(self) -> Request:
        return self.request("login", f"login as {self.remote_user}")

    def command(self, action: str, text: str, lines_judged: bool = False,
                **more) -> tuple[Request, dict]:
        """exec or line: the command line split into what it runs. `lines_judged`: a
        shell reading its commands from stdin whose lines will be judged as they come
        (so that is no unknown)."""
        cmds = split(text)
        if "&>" in text:
            # dash has no `&>`: `a &>f b` is `a &` then `b >f` to it, where bash reads
            # one command; both readings are judged
            cmds = _either(cmds, split(text.replace("&>", "& >")))
        unknown = [f for f in cmds.unknown if not (lines_judged and f == STDIN)]
        # the simple commands alone (the full text too only if it has none): an
        # allowlist's globs are written for commands, and `ls; cat x` is two of them
        values = list(cmds.values[1:] or cmds.values[:1])
        for flag in hazards(text, values):
            if flag not in unknown:
                unknown.append(flag)
        # an interactive bash expands history (`!!`, `!$`, `!rm`, `^a^b`) before it
        # runs a typed line: what runs is not the text judged
        if action == "line" and (_HISTORY.search(text) or text.lstrip().startswith("^")
                                 or any(v.split(" ", 1)[0] == "fc" for v in values)):
            unknown.append("history")
        # `/bin/rm -rf x` is `rm -rf x` to a rule written for rm
        values += [v.split(" ", 1)[0].rsplit("/", 1)[1] + v[len(v.split(" ", 1)[0]):]
                   for v in values if "/" in v.split(" ", 1)[0]]
        # a file a redirection writes is a command of its own to an allowlist (`echo *`
        # does not allow `echo x > /root/.bashrc`: `write /root/.bashrc` must be allowed
        # too), and a written path to `operations`/`paths` rules, as SFTP writes are
        written = [normal_path(w) or w for w in cmds.writes]
        # a target the shell computes (`/tmp/${X:-../etc/x}`, a glob, `~root`) or one
        # relative to a directory we don't know is not the path judged
        if any(_UNKNOWN_TARGET.search(w) or not w.startswith("/") for w in cmds.writes):
            unknown.append("dynamic_write")
        values += [f"write {w}" for w in written]
        unknown = tuple(unknown)
        req = self.request(action, text, parsed=cmds.parsed, unknown=unknown,
                           commands=tuple(dict.fromkeys(values)), paths=tuple(written),
                           operations=("write",) if written else ())
        fields = {"text": text, "kind": action, "remote_user": self.remote_user,
                  "commands": list(cmds.values[1:]), "flags": list(unknown), **more}
        if written:
            fields["writes"] = written
        return req, fields

    def shell(self, pty: bool) -> tuple[Request, dict]:
        text = "shell" + (" (pty)" if pty else "")
        return (self.request("shell", text, commands=("shell",)),
                {"text": text, "kind": "shell", "remote_user": self.remote_user})

    def subsystem(self, name: str) -> tuple[Request, dict]:
        return (self.request("subsystem", f"subsystem {name}", subsystems=(name,)),
                {"text": f"subsystem {name}", "kind": "subsystem", "subsystem": name,
                 "remote_user": self.remote_user})

    def sftp(self, op) -> tuple[Request, dict]:
        """One SFTP operation (sftp.Op): `operations` sees its kinds (open, read, write,
        remove, ...), `paths` its paths."""
        # (paths that are not UTF-8 come as surrogate escapes: shown escaped)
        shown = tuple(p.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                      for p in op.paths)
        text = f"sftp {op.name} " + " ".join(shown) if shown else f"sftp {op.name}"
        paths = tuple(normal_path(p) for p in shown)
        # a link makes later paths name other files than they say: symlinks and hard
        # links are allowed only by a rule naming the flag
        unknown = ("links",) if op.name in ("symlink", "hardlink", "link") else ()
        req = self.request("sftp", text, subsystems=("sftp",), operations=op.kinds,
                           paths=tuple(p for p in paths if p is not None),
                           parsed=None not in paths and not op.unknown_handle,
                           unknown=unknown)
        return req, {"text": text, "kind": "sftp", "operation": op.name, "paths": list(shown),
                     "writes": op.writes, "remote_user": self.remote_user}

    def forward(self, kind: str, where: str) -> tuple[Request, dict]:
        """kind: direct-tcpip (-L, -W), tcpip-forward (-R), direct-streamlocal,
        streamlocal-forward, x11, agent. `forwards` sees host:port (or the socket path)."""
        text = f"forward {kind} {where}"
        readings = forward_readings(where)
        req = self.request("forward", text, forwards=tuple(r for r in readings if r),
                           operations=(kind,), parsed=None not in readings)
        return (req,
                {"text": text, "kind": "forward", "forward": kind, "destination": where,
                 "remote_user": self.remote_user})


def _either(a, b):
    """Commands of two readings of one text: every value, flag and write of both."""
    from hostagent.protocols.ssh.commands import Commands
    return Commands(tuple(dict.fromkeys(v for v in a.values + b.values[1:] if v)),
                    a.parsed and b.parsed,
                    tuple(dict.fromkeys(a.unknown + b.unknown)),
                    tuple(dict.fromkeys(a.writes + b.writes)))


def hazards(text: str, values: list[str]) -> list[str]:
    """Flags for what a command line runs that its words don't show (see the
    patterns above); each takes the `unparseable` decision unless allowed by name."""
    flags = []
    if _HIDDEN_EXPANSION.search(text):
        flags.append("dynamic_command")
    # the line editor's keys and history characters, changed: later lines are not what
    # the tracker sees (`histchars=@` then `@@`; an inputrc macro ending in a newline)
    if re.search(r"\b(?:histchars|INPUTRC)\b", text):
        flags.append("terminal_settings")
    # variables that make the shell run code or find other programs, set however
    # (`for PS1 in '$(...)'`, `${PROMPT_COMMAND:=...}`, `export PATH=/tmp/d`,
    # `PS1="\044(...)"`): any mention but a plain read of their value
    if _HOOK_VARS.search(text):
        flags.append("dynamic_command")
    for v in values:
        words = v.split()
        if not words:
            continue
        name = words[0].rsplit("/", 1)[-1]
        if name in _EVALUATING and "[" in v and ("$" in v or "`" in v):
            flags.append("dynamic_command")
        if name in _TERMINAL or (name == "set" and {"vi", "emacs"} & set(words)):
            flags.append("terminal_settings")
        # what later lines run, changed under their names: `alias ls=rm`, `hash -p`
        if (name == "alias" and "=" in v) or (name == "hash" and "-p" in words) or \
                (name == "enable" and "-f" in words):
            flags.append("dynamic_command")
        if name in _SHELL_NAMES and any(_STDIN_FILES.match(w) for w in words[1:]):
            flags.append(STDIN)
        if _TRANSFERS.match(" ".join([name] + words[1:])):
            flags.append("file_transfer")
    return list(dict.fromkeys(flags))


def normal_path(path: str) -> str | None:
    """An SFTP path as the server will read it (`//etc/x`, `/tmp/../etc/x` are
    `/etc/x`); None for a relative one (other than "."): relative to a home directory
    we don't know, so it can't be judged."""
    if path in (".", ""):
        return path
    if not path.startswith("/"):
        return None
    return "/" + posixpath.normpath(path).lstrip("/")


def forward_readings(where: str) -> tuple[str, ...]:
    """A forward's destination as given, and its address written canonically when it
    is one (`127.1`, `0x7f.1`, `::ffff:127.0.0.1` are 127.0.0.1)."""
    if where.startswith("/") or ":" not in where:    # a socket path
        return (where, normal_path(where))
    host, sep, port = where.rpartition(":")
    bare = host.strip("[]").lower().rstrip(".")
    canonical = bare
    try:
        addr = ipaddress.ip_address(bare)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        canonical = str(addr)
    except ValueError:
        try:
            canonical = socket.inet_ntoa(socket.inet_aton(bare))   # 127.1, 0x7f.1, 2130706433
        except OSError:
            pass
    out = [where, f"{bare}:{port}", f"{canonical}:{port}"]
    if canonical in ("0.0.0.0", "::"):     # (connecting to "any" reaches this host)
        out.append(f"127.0.0.1:{port}" if canonical == "0.0.0.0" else f"::1:{port}")
    return tuple(dict.fromkeys(out))
