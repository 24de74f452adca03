"""SFTP version 3 (draft-ietf-secsh-filexfer-02, as OpenSSH speaks it, with its
extensions) read from the bytes of an SSH subsystem channel, both directions.

The proxy relays the channel, so every client request has to be understood before it is
passed on: each one comes out as an `Op` (what it does, which paths it names, whether it
can change the server's files) that policy judges, and one that is refused is answered
here with a protocol-correct SSH_FXP_STATUS instead. The server's replies are matched to
requests by id so that a handle can be tied to the path it was opened for; reads and
writes on it are then counted and reported once, as a `FileDone`, when it is closed,
rather than as one record a packet. Sans-IO: nothing here awaits or does I/O;
bad input raises SftpError, nothing else.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from hostagent.protocols.api import ProtocolError

MAX_PACKET = 256 * 1024 + 1024   # OpenSSH's sftp-server and sftp refuse longer ones too
MAX_OUTSTANDING = 65536          # request ids awaiting an answer (OpenSSH's client: 64)
MAX_HANDLES = 65536
MAX_HELD = 64 << 20              # path bytes kept for those two tables together
MAX_HANDLE_LEN = 256             # the draft's bound on a handle string
VERSION = 3

FXP_INIT, FXP_VERSION, FXP_EXTENDED = 1, 2, 200
FXP_STATUS, FXP_HANDLE, FXP_DATA = 101, 102, 103
REPLIES = frozenset((101, 102, 103, 104, 105, 201))   # + NAME, ATTRS, EXTENDED_REPLY
FX_OK, FX_EOF, FX_PERMISSION_DENIED = 0, 1, 3
FXF_READ, FXF_WRITE, FXF_APPEND, FXF_CREAT, FXF_TRUNC = 0x01, 0x02, 0x04, 0x08, 0x10
STATUS_NAMES = ("SSH_FX_OK", "SSH_FX_EOF", "SSH_FX_NO_SUCH_FILE", "SSH_FX_PERMISSION_DENIED",
                "SSH_FX_FAILURE", "SSH_FX_BAD_MESSAGE", "SSH_FX_NO_CONNECTION",
                "SSH_FX_CONNECTION_LOST", "SSH_FX_OP_UNSUPPORTED")

# The body after the id, one letter a field: p path, h handle, u user name, s opaque
# string, 4/8 uint32/uint64, a ATTRS. Every field is read and nothing may follow them.
REQUESTS = {
    3: ("open", "p4a"), 4: ("close", "h"), 5: ("read", "h84"), 6: ("write", "h8s"),
    7: ("lstat", "p"), 8: ("fstat", "h"), 9: ("setstat", "pa"), 10: ("fsetstat", "ha"),
    11: ("opendir", "p"), 12: ("readdir", "h"), 13: ("remove", "p"), 14: ("mkdir", "pa"),
    15: ("rmdir", "p"), 16: ("realpath", "p"), 17: ("stat", "p"), 18: ("rename", "pp"),
    19: ("readlink", "p"), 20: ("symlink", "pp"),   # (OpenSSH swaps symlink's two paths)
}
EXTENSIONS = {
    "posix-rename@openssh.com": ("posix-rename", "pp"),
    "hardlink@openssh.com": ("hardlink", "pp"),
    "statvfs@openssh.com": ("statvfs", "p"), "fstatvfs@openssh.com": ("fstatvfs", "h"),
    "fsync@openssh.com": ("fsync", "h"), "lsetstat@openssh.com": ("lsetstat", "pa"),
    "limits@openssh.com": ("limits", ""), "expand-path@openssh.com": ("expand-path", "p"),
    "copy-data": ("copy-data", "h88h8"), "home-directory": ("home-directory", "u"),
    "users-groups-by-id@openssh.com": ("users-groups-by-id", "ss"),
}
WRITES = frozenset(("write", "setstat", "fsetstat", "lsetstat", "remove", "rename", "mkdir",
                    "rmdir", "symlink", "hardlink", "posix-rename", "copy-data"))
# so that a policy naming the plain operation also catches its variants (OpenSSH's
# client renames with posix-rename whenever the server offers it)
ALSO = {"posix-rename": ("rename",), "lsetstat": ("setstat",), "fsetstat": ("setstat",),
        "lstat": ("stat",), "fstat": ("stat",), "fstatvfs": ("statvfs",)}
# on a handle whose open was judged, these add nothing a policy could decide on
COVERED = frozenset(("read", "write", "close", "readdir", "fstat"))


class SftpError(ProtocolError):
    """An SFTP stream that does not parse as version 3: the channel is closed."""


@dataclass(frozen=True)
class Op:
    """One client request, for policy."""
    id: int                   # 0 for INIT
    name: str                 # open, remove, posix-rename, ..., extended:<name> if unknown
    paths: tuple[str, ...]    # for one on a handle: the path it was opened for, if known
    writes: bool
    kinds: tuple[str, ...]    # what `operations` matches: the name, aliases, read/write
    size: int = 0             # data bytes (write), length (copy-data)
    judge: bool = True        # False where the handle's open was judged already
    # a handle not (or no longer) open: which file it acts on is not known (a handle
    # whose CLOSE is under way may be the server's for the next open already)
    unknown_handle: bool = False


@dataclass(frozen=True)
class Request:
    raw: bytes
    op: Op


@dataclass(frozen=True)
class FileDone:
    path: str
    mode: str               # read, write, read+write, dir
    bytes_read: int
    bytes_written: int
    status: str             # ok, the close's error, or unclosed


@dataclass(frozen=True)
class Reply:
    raw: bytes
    id: int | None
    done: FileDone | None = None
    error: str = ""


@dataclass(slots=True)
class _File:
    path: str
    mode: str
    held: int
    read: int = 0
    written: int = 0
    handle: bytes = b""

    def done(self, status: str) -> FileDone:
        return FileDone(self.path, self.mode, self.read, self.written, status)


@dataclass(frozen=True, slots=True)
class _Pending:
    op: Op
    handle: bytes | None     # the handle it acts on (the first, for copy-data)
    mode: str = ""           # for an open or opendir: what its handle will be
    held: int = 0            # bytes of the paths it named (not its handles')


class _Reader:
    __slots__ = ("b", "pos")

    def __init__(self, b: bytes):
        self.b, self.pos = b, 5

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.b):
            raise SftpError("an SFTP packet's fields run past its length")
        self.pos += n
        return self.b[self.pos - n:self.pos]

    def uint(self, n: int = 4) -> int:
        return int.from_bytes(self.take(n), "big")

    def string(self) -> bytes:
        return self.take(self.uint())

    def left(self) -> int:
        return len(self.b) - self.pos

    def end(self) -> None:
        if self.left():
            raise SftpError(f"{self.left()} trailing bytes in an SFTP packet of type {self.b[4]}")

    def attrs(self) -> None:
        flags = self.uint()
        # (SIZE, UIDGID, PERMISSIONS, ACMODTIME; other bits carry nothing in v3, and
        # OpenSSH ignores them too)
        self.take(sum(n for bit, n in ((1, 8), (2, 8), (4, 4), (8, 8)) if flags & bit))
        if flags & 0x80000000:
            for _ in range(self.uint()):    # (a huge count runs out of packet quickly)
                self.string(), self.string()

    def fields(self, spec: str) -> list:
        out = [self.uint(int(c)) if c in "48" else self.attrs() if c == "a" else self.string()
               for c in spec]
        self.end()
        return out


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _string(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


class SftpStream:
    """Both directions of one SFTP channel."""

    def __init__(self, max_buffer: int = 4 * MAX_PACKET):
        self.max_buffer = max_buffer
        self.cbuf, self.sbuf = bytearray(), bytearray()
        self.started = False                     # the client's INIT was seen
        self.extensions: dict[str, bytes] = {}   # what the server's VERSION offered
        self.pending: dict[int, _Pending] = {}
        self.handles: dict[bytes, _File] = {}
        self.closing: dict[int, _File] = {}      # by the CLOSE request's id
        self.held = 0                            # path bytes in both

    def buffered(self) -> int:
        return len(self.cbuf) + len(self.sbuf)

    def receive_client(self, data: bytes) -> list[Request]:
        return [Request(raw, self._request(raw)) for raw in self._packets(self.cbuf, data)]

    def receive_server(self, data: bytes) -> list[Reply]:
        return [self._reply(raw) for raw in self._packets(self.sbuf, data)]

    def refuse(self, op: Op, message: str) -> bytes:
        if op.name == "init":
            return b""
        self._answered(op.id)
        body = struct.pack(">BII", FXP_STATUS, op.id, FX_PERMISSION_DENIED)
        # (a message quoting an undecodable path must still be UTF-8 on the wire)
        body += _string(message.encode("utf-8", "replace")) + _string(b"en")
        return _string(body)

    def finish(self) -> list[FileDone]:
        files = [*self.handles.values(), *self.closing.values()]
        out = [f.done("unclosed") for f in files]
        self.held -= sum(f.held for f in files)
        self.handles.clear()
        self.closing.clear()
        return out

    def _hold(self, n: int) -> None:
        # (a client could otherwise park 65536 requests naming 256 KiB paths each)
        if self.held + n > MAX_HELD:
            raise SftpError("too many path bytes held for outstanding SFTP requests")
        self.held += n

    def _answered(self, rid: int) -> _Pending | None:
        if p := self.pending.pop(rid, None):
            self.held -= p.held
        return p

    def _packets(self, buf: bytearray, data: bytes) -> list[bytes]:
        buf += data
        out, pos = [], 0
        while len(buf) - pos >= 4:
            n = int.from_bytes(buf[pos:pos + 4], "big")
            if not 0 < n <= MAX_PACKET:
                raise SftpError(f"an SFTP packet of length {n}")
            if len(buf) - pos < 4 + n:
                break
            out.append(bytes(buf[pos:pos + 4 + n]))
            pos += 4 + n
        del buf[:pos]
        if len(buf) > self.max_buffer:
            raise SftpError(f"more than {self.max_buffer} bytes of a partial SFTP packet")
        return out

    def _request(self, raw: bytes) -> Op:
        r, ptype = _Reader(raw), raw[4]
        if ptype == FXP_INIT:
            if self.started:
                raise SftpError("a second SSH_FXP_INIT")
            self.started = True
            r.uint()
            while r.left():                 # (extension pairs, which OpenSSH never sends)
                r.string(), r.string()
            return Op(0, "init", (), False, ("init",), judge=False)
        if not self.started:
            raise SftpError(f"an SFTP request of type {ptype} before SSH_FXP_INIT")
        rid = r.uint()
        if rid in self.pending:
            # (the answer to one of them would be taken for the other's)
            raise SftpError(f"SFTP request id {rid} reused while still outstanding")
        if len(self.pending) >= MAX_OUTSTANDING:
            raise SftpError("too many outstanding SFTP requests")
        if ptype == FXP_EXTENDED:
            ext = _text(r.string())
            if ext not in EXTENSIONS:
                # (what it does is unknown: it is taken to write, for policy to decide)
                op = Op(rid, "extended:" + ext, (), True, ("extended:" + ext, "extended", "write"))
                self.pending[rid] = _Pending(op, None)
                return op
            name, spec = EXTENSIONS[ext]
        elif ptype in REQUESTS:
            name, spec = REQUESTS[ptype]
        else:
            raise SftpError(f"an SFTP request of unknown type {ptype}")
        values = r.fields(spec)
        paths, handles, size, mode, held = [], [], 0, "", 0
        for c, v in zip(spec, values):
            if c in "pu":
                paths.append(("~" if c == "u" else "") + _text(v))
                held += len(v)
            elif c == "h":
                handles.append(v)
                if v in self.handles:
                    paths.append(self.handles[v].path)
        writes, extra = name in WRITES, ALSO.get(name, ())
        if name == "open":
            flags = values[1]
            # (OpenSSH's server applies CREAT and TRUNC even without WRITE)
            writes = bool(flags & (FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC))
            reads = bool(flags & FXF_READ) or not writes
            mode = "read+write" if reads and writes else "write" if writes else "read"
            extra = ("read",) if reads else ()
        elif name == "opendir":
            mode = "dir"
        elif name == "write":
            size = len(values[2])
        elif name == "copy-data":
            size = values[2]
        handle = handles[0] if handles else None
        known = self.handles.get(handle) if handle is not None else None
        unknown = any(h not in self.handles for h in handles)
        # (a write on a handle opened only for reading was never judged as a write)
        covered = known is not None and name in COVERED and (
            name != "write" or "write" in known.mode)
        kinds = (name,) + extra + (("write",) if writes and name != "write" else ())
        op = Op(rid, name, tuple(paths), writes, kinds, size, judge=not covered,
                unknown_handle=unknown)
        self._hold(held)
        self.pending[rid] = _Pending(op, handle, mode, held)
        if name == "close" and known is not None:
            # from now on the handle names nothing we know: OpenSSH gives the same
            # handle to the next open as soon as this close is done, so a request sent
            # behind the close would be judged for this file and act on that one
            self.closing[rid] = self.handles.pop(handle)
        return op

    def _reply(self, raw: bytes) -> Reply:
        r, ptype = _Reader(raw), raw[4]
        if ptype == FXP_VERSION:
            if (version := r.uint()) != VERSION:
                raise SftpError(f"the SFTP server speaks version {version}, not {VERSION}")
            while r.left():
                name = _text(r.string())
                self.extensions[name] = r.string()
            return Reply(raw, None)
        if ptype not in REPLIES:
            raise SftpError(f"an SFTP reply of unknown type {ptype}")
        rid = r.uint()
        p = self._answered(rid)
        if p is None:      # (nothing asked this: passed on, the client can make of it what it will)
            return Reply(raw, rid)
        if p.op.name == "close":
            f = self.closing.pop(rid, None)
        elif p.handle is None:
            f = None
        else:   # (replies to what was sent before its close still count for its file)
            f = self.handles.get(p.handle) or next(
                (c for c in self.closing.values() if c.handle == p.handle), None)
        if ptype == FXP_STATUS:
            code = r.uint()
            # (servers before draft-02's message and language fields leave them out)
            message = _text(r.string()) if r.left() else ""
            if r.left():
                r.string()
            r.end()
            name = STATUS_NAMES[code] if code < len(STATUS_NAMES) else f"SSH_FX_{code}"
            error = "" if code in (FX_OK, FX_EOF) else f"{name}: {message}"
            done = None
            if f is not None and p.op.name == "write" and code == FX_OK:
                f.written += p.op.size
            elif f is not None and p.op.name == "close":
                # (OpenSSH forgets the handle even when close(2) fails)
                self.held -= f.held
                done = f.done(error or "ok")
            return Reply(raw, rid, done, error if p.op.judge else "")
        if ptype == FXP_HANDLE and p.mode:
            handle = r.string()
            r.end()
            if len(handle) > MAX_HANDLE_LEN or len(self.handles) >= MAX_HANDLES:
                raise SftpError("an SFTP handle too long, or too many open")
            self._hold(p.held)
            if old := self.handles.get(handle):     # (a server reusing one it did not close)
                self.held -= old.held
            self.handles[handle] = _File(p.op.paths[0], p.mode, p.held, handle=handle)
        elif ptype == FXP_DATA and f is not None and p.op.name == "read":
            f.read += len(r.string())
            r.end()
        return Reply(raw, rid)
