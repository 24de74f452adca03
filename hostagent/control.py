"""The host agent's local control socket, both ends: `agentgate run` (DaemonClient) asks
the daemon (serve_client, with the daemon's actions as its Handler) to enroll.

Newline-delimited JSON. The socket is root-only (or one group's, `socket_group`), and a
non-root caller may only enroll its own processes: the kernel tells us who is calling
(SO_PEERCRED), the request does not. A connection may finish only the runs it enrolled,
and those it has not finished end when it goes away.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
from typing import Protocol

log = logging.getLogger("agentgate.hostagent")
PEERCRED = struct.Struct("3i")
WENT_AWAY = "agentgate run went away"


class ControlError(Exception):
    pass


class Handler(Protocol):
    """What the daemon does once serve_client has checked who may ask for it."""

    # Errors that answer the caller (a refusal), as opposed to bugs.
    refusals: tuple[type[Exception], ...]

    def hello(self) -> dict: ...

    async def enroll(self, pid: int, *, argv: list[str], user: str | None,
                     requested_by: str, unix: dict | None = None) -> dict: ...
    # (returns "group": the run's name; `unix`: how its unix sockets are guarded)

    async def finish(self, group: str, exit_code: int | None, reason: str) -> None: ...


async def serve_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       handler: Handler) -> None:
    uid = peer_uid(writer.get_extra_info("socket"))
    mine: set[str] = set()     # runs this connection enrolled and has not finished
    try:
        while line := await reader.readline():
            try:
                reply = {"ok": True, **await _answer(handler, uid, json.loads(line), mine)}
            except (ControlError, ValueError, KeyError, TypeError, OSError,
                    *handler.refusals) as exc:
                reply = {"ok": False, "error": str(exc)}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass   # gone, or a line past the reader's limit: either way, this connection is over
    except Exception:
        # Logged here, once and attributed: nobody awaits this task to see it.
        log.exception("control connection failed")
    finally:
        writer.close()
        # `agentgate run` went away without finishing (killed, Ctrl-C): its agent
        # must not outlive it unwatched, nor its session stay open.
        for group in sorted(mine):
            try:
                await handler.finish(group, None, WENT_AWAY)
            except handler.refusals as exc:
                log.error("cannot end run %s: %s", group, exc)
            except Exception:
                log.exception("cannot end run %s", group)


async def _answer(handler: Handler, uid: int, req, mine: set[str]) -> dict:
    if not isinstance(req, dict):
        raise ControlError("a request is one JSON object a line")
    op = req.get("op")
    if op == "hello":
        return handler.hello()
    if op == "enroll":
        pid, user = int(req["pid"]), req.get("user") or None
        if user is not None and not isinstance(user, str):
            raise ControlError("user must be a name")
        if uid != 0 and uid_of(pid) != uid:
            raise ControlError(f"uid {uid} may only enroll its own processes")
        if uid != 0 and user:
            raise ControlError("only root may run an agent as another user")
        unix = req.get("unix") if isinstance(req.get("unix"), dict) else None
        reply = await handler.enroll(pid, argv=[str(a) for a in req.get("argv", [])],
                                     user=user, requested_by=f"uid {uid}", unix=unix)
        mine.add(reply["group"])
        return reply
    if op == "finish":
        group = str(req.get("group", ""))
        if group not in mine:   # only the connection that enrolled it
            raise ControlError(f"no run {group!r} of this connection")
        # Out before it is ended: however that goes, it is not ended again on hang-up.
        mine.discard(group)
        exit_code = req.get("exit_code")
        await handler.finish(group, exit_code if isinstance(exit_code, int) else None, "exited")
        return {}
    raise ControlError(f"unknown op {op!r}")


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      PEERCRED.size))
    return uid


def uid_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
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
