"""What policy sees of an SSH action: plain data in, a policy Request out.

Kinds of action: login (the account the proxy logs in as), exec (a command), shell (a
shell opened), line (a line typed into a shell, or fed to one on stdin), subsystem,
sftp (one SFTP operation), forward (a port or socket forward). Every Request carries
`remote_users`; commands are split into the simple commands they run (commands.py) and
judged as readings: a deny rule matches if any of them does, an allow rule only if all
do, so `ls; rm -rf /` is not let through by `commands = ["ls *"]`.
"""
from __future__ import annotations

from dataclasses import dataclass

from hostagent.policy import Request
from hostagent.protocols.ssh.commands import STDIN, split

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
                       text=text, parsed=parsed, unknown=unknown, readings=("commands",))

    def login(self) -> Request:
        return self.request("login", f"login as {self.remote_user}")

    def command(self, action: str, text: str, lines_judged: bool = False,
                **more) -> tuple[Request, dict]:
        """exec or line: the command line split into what it runs. `lines_judged`: a
        shell reading its commands from stdin whose lines will be judged as they come
        (so that is no unknown)."""
        cmds = split(text)
        unknown = tuple(f for f in cmds.unknown if not (lines_judged and f == STDIN))
        # the simple commands alone (the full text too only if it has none): an
        # allowlist's globs are written for commands, and `ls; cat x` is two of them
        req = self.request(action, text, parsed=cmds.parsed, unknown=unknown,
                           commands=cmds.values[1:] or cmds.values[:1])
        return req, {"text": text, "kind": action, "remote_user": self.remote_user,
                     "commands": list(cmds.values[1:]), "flags": list(unknown), **more}

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
        text = f"sftp {op.name} " + " ".join(op.paths) if op.paths else f"sftp {op.name}"
        req = self.request("sftp", text, subsystems=("sftp",), operations=op.kinds,
                           paths=op.paths)
        return req, {"text": text, "kind": "sftp", "operation": op.name, "paths": list(op.paths),
                     "writes": op.writes, "remote_user": self.remote_user}

    def forward(self, kind: str, where: str) -> tuple[Request, dict]:
        """kind: direct-tcpip (-L, -W), tcpip-forward (-R), direct-streamlocal,
        streamlocal-forward, x11, agent. `forwards` sees host:port (or the socket path)."""
        text = f"forward {kind} {where}"
        return (self.request("forward", text, forwards=(where,), operations=(kind,)),
                {"text": text, "kind": "forward", "forward": kind, "destination": where,
                 "remote_user": self.remote_user})
