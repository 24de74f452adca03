"""The host agent's local control socket: `agentgate run` asks the daemon to enroll.

Newline-delimited JSON. The socket is root-only (or one group's, `socket_group`), and a
non-root caller may only enroll its own processes: the kernel tells us who is calling
(SO_PEERCRED), the request does not.
"""
from __future__ import annotations

import json
import os
import socket
import struct

PEERCRED = struct.Struct("3i")


class ControlError(Exception):
    pass


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      PEERCRED.size))
    return uid


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise ControlError(f"no process {pid}")


class DaemonClient:
    """Blocking client (the CLI side)."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")

    @classmethod
    def connect(cls, path: str) -> "DaemonClient | None":
        if not os.path.exists(path):
            return None
        try:
            return cls(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # a stale socket file: no daemon
        except PermissionError:
            raise ControlError(f"no permission to use the host agent's socket {path} (it is "
                               "root's, or the group's named by intercept.socket_group)") from None

    def call(self, op: str, **args) -> dict:
        self.file.write(json.dumps({"op": op, **args}).encode() + b"\n")
        self.file.flush()
        line = self.file.readline()
        if not line:
            raise ControlError("the host agent closed the connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "refused"))
        return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()
