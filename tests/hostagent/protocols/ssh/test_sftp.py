"""SFTP v3 parsing: ops for policy, refusals, per-file activity, framing, and the real
OpenSSH client and server talking through it."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from hostagent.protocols.ssh.sftp import (MAX_PACKET, FileDone, Op, SftpError, SftpStream)

ROOT = Path(__file__).resolve().parents[4]
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


# ------------------------------------------------------------------ a tiny encoder

def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def s(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return u32(len(b)) + b


def pkt(ptype: int, *fields: bytes) -> bytes:
    body = bytes([ptype]) + b"".join(fields)
    return u32(len(body)) + body


NOATTRS = u32(0)
INIT = pkt(1, u32(3))
VERSION = pkt(2, u32(3), s("posix-rename@openssh.com"), s("1"))


def open_(rid, path, pflags):
    return pkt(3, u32(rid), s(path), u32(pflags), NOATTRS)


def close(rid, h):
    return pkt(4, u32(rid), s(h))


def read(rid, h, off=0, n=32768):
    return pkt(5, u32(rid), s(h), u64(off), u32(n))


def write(rid, h, data, off=0):
    return pkt(6, u32(rid), s(h), u64(off), s(data))


def ext(rid, name, *fields):
    return pkt(200, u32(rid), s(name), *fields)


def status(rid, code=0, msg="", lang="en"):
    return pkt(101, u32(rid), u32(code), s(msg), s(lang))


def handle(rid, h):
    return pkt(102, u32(rid), s(h))


def data(rid, b):
    return pkt(103, u32(rid), s(b))


def started() -> SftpStream:
    st_ = SftpStream()
    st_.receive_client(INIT)
    st_.receive_server(VERSION)
    return st_


def op(stream: SftpStream, packet: bytes) -> Op:
    [req] = stream.receive_client(packet)
    assert req.raw == packet
    return req.op


def reply(stream: SftpStream, packet: bytes):
    [rep] = stream.receive_server(packet)
    assert rep.raw == packet
    return rep


# ------------------------------------------------------------------ ops

def test_init_and_version():
    stream = SftpStream()
    [req] = stream.receive_client(pkt(1, u32(6), s("x@example.com"), s("")))
    assert req.op == Op(0, "init", (), False, ("init",), judge=False)
    rep = reply(stream, VERSION)
    assert rep.id is None and rep.done is None and rep.error == ""
    assert stream.extensions == {"posix-rename@openssh.com": b"1"}
    assert stream.refuse(req.op, "no") == b""


def test_open_kinds_follow_its_flags():
    stream = started()
    o = op(stream, open_(1, "/etc/passwd", 0x01))
    assert (o.name, o.paths, o.writes, o.kinds, o.judge) == (
        "open", ("/etc/passwd",), False, ("open", "read"), True)
    o = op(stream, open_(2, "/tmp/new", 0x02 | 0x08 | 0x10))
    assert o.writes and o.kinds == ("open", "write")
    o = op(stream, open_(3, "/tmp/rw", 0x01 | 0x02))
    assert o.writes and o.kinds == ("open", "read", "write")
    # OpenSSH's server truncates on TRUNC alone (O_RDONLY|O_TRUNC)
    o = op(stream, open_(4, "/tmp/t", 0x10))
    assert o.writes and "write" in o.kinds


def test_path_ops_and_extensions():
    stream = started()
    cases = [
        (pkt(18, u32(1), s("/a"), s("/b")), "rename", ("/a", "/b"), True, ("rename", "write")),
        (pkt(20, u32(2), s("target"), s("/link")), "symlink", ("target", "/link"), True,
         ("symlink", "write")),
        (ext(3, "posix-rename@openssh.com", s("/c"), s("/d")), "posix-rename", ("/c", "/d"),
         True, ("posix-rename", "rename", "write")),
        (ext(4, "hardlink@openssh.com", s("/e"), s("/f")), "hardlink", ("/e", "/f"), True,
         ("hardlink", "write")),
        (pkt(13, u32(5), s("/g")), "remove", ("/g",), True, ("remove", "write")),
        (pkt(14, u32(6), s("/h"), u32(4), u32(0o700)), "mkdir", ("/h",), True, ("mkdir", "write")),
        (pkt(15, u32(7), s("/h")), "rmdir", ("/h",), True, ("rmdir", "write")),
        (pkt(17, u32(8), s("/i")), "stat", ("/i",), False, ("stat",)),
        (pkt(7, u32(9), s("/i")), "lstat", ("/i",), False, ("lstat", "stat")),
        (pkt(16, u32(10), s(".")), "realpath", (".",), False, ("realpath",)),
        (pkt(19, u32(11), s("/link")), "readlink", ("/link",), False, ("readlink",)),
        (pkt(9, u32(12), s("/j"), u32(0x1 | 0x2 | 0x4 | 0x8 | 0x80000000), u64(5), u32(0),
             u32(0), u32(0o644), u32(1), u32(2), u32(1), s("k"), s("v")),
         "setstat", ("/j",), True, ("setstat", "write")),
        (ext(13, "lsetstat@openssh.com", s("/k"), NOATTRS), "lsetstat", ("/k",), True,
         ("lsetstat", "setstat", "write")),
        (ext(14, "statvfs@openssh.com", s("/")), "statvfs", ("/",), False, ("statvfs",)),
        (ext(15, "limits@openssh.com"), "limits", (), False, ("limits",)),
        (ext(16, "expand-path@openssh.com", s("~/x")), "expand-path", ("~/x",), False,
         ("expand-path",)),
        (ext(17, "home-directory", s("root")), "home-directory", ("~root",), False,
         ("home-directory",)),
        (ext(18, "users-groups-by-id@openssh.com", s(u32(0)), s(u32(0))), "users-groups-by-id",
         (), False, ("users-groups-by-id",)),
        (ext(19, "rm-everything@example.com", b"\x00\x01"), "extended:rm-everything@example.com",
         (), True, ("extended:rm-everything@example.com", "extended", "write")),
        (pkt(17, u32(20), s(b"/bad\xff")), "stat", ("/bad\udcff",), False, ("stat",)),
    ]
    for packet, name, paths, writes, kinds in cases:
        o = op(stream, packet)
        assert (o.name, o.paths, o.writes, o.kinds, o.judge) == (name, paths, writes, kinds, True)
        assert not writes or "write" in o.kinds
    assert o.paths[0].encode("utf-8", "surrogateescape") == b"/bad\xff"


def test_refused_op_is_answered_and_forgotten():
    stream = started()
    o = op(stream, pkt(13, u32(7), s("/etc/passwd")))
    answer = stream.refuse(o, "policy: no")
    assert answer == status(7, 3, "policy: no", "en")
    # the id is free again, and the server's answer to its reuse is matched to the new op
    o = op(stream, pkt(17, u32(7), s("/etc/passwd")))
    assert o.name == "stat"
    assert reply(stream, status(7, 2, "No such file")).error == "SSH_FX_NO_SUCH_FILE: No such file"
    o = op(stream, pkt(13, u32(9), s(b"/\xff")))
    assert stream.refuse(o, f"no: {o.paths[0]}") == status(9, 3, "no: /?")
    # a refused open never gets a handle mapped
    o = op(stream, open_(8, "/x", 0x02))
    stream.refuse(o, "no")
    assert stream.pending == {} and stream.handles == {}


def test_handles_carry_their_path_and_count_on_close():
    stream = started()
    op(stream, open_(1, "/up.bin", 0x02 | 0x08 | 0x10))
    assert reply(stream, handle(1, b"h1")).id == 1
    ops = [op(stream, write(i, b"h1", b"x" * n, off)) for i, n, off in
           ((2, 10, 0), (3, 20, 10), (4, 30, 30))]
    assert [(o.name, o.paths, o.size, o.judge, o.kinds) for o in ops] == [
        ("write", ("/up.bin",), n, False, ("write",)) for n in (10, 20, 30)]
    reply(stream, status(2))
    assert reply(stream, status(3, 4, "Failure")).error == ""   # (unjudged: the close says it)
    reply(stream, status(4))
    c = op(stream, close(5, b"h1"))
    assert (c.name, c.paths, c.judge) == ("close", ("/up.bin",), False)
    assert reply(stream, status(5)).done == FileDone("/up.bin", "write", 0, 40, "ok")
    assert stream.handles == {}

    op(stream, open_(6, "/down.bin", 0x01))
    reply(stream, handle(6, b"h2"))
    r1, r2, r3 = (op(stream, read(i, b"h2", off)) for i, off in ((7, 0), (8, 32768), (9, 65536)))
    assert r1.paths == ("/down.bin",) and not r1.judge and r1.kinds == ("read",)
    reply(stream, data(7, b"a" * 32768))
    reply(stream, data(8, b"b" * 100))
    assert reply(stream, status(9, 1, "EOF")).error == ""
    w = op(stream, write(10, b"h2", b"sneaky"))
    assert w.judge and w.writes                          # never judged as a write
    reply(stream, status(10, 4, "Failure"))
    op(stream, close(11, b"h2"))
    assert reply(stream, status(11, 4, "Input/output error")).done == FileDone(
        "/down.bin", "read", 32868, 0, "SSH_FX_FAILURE: Input/output error")

    op(stream, pkt(11, u32(12), s("/dir")))
    reply(stream, handle(12, b"h3"))
    rd = op(stream, pkt(12, u32(13), s(b"h3")))
    assert (rd.paths, rd.judge) == (("/dir",), False)
    reply(stream, pkt(104, u32(13), u32(0)))
    f = op(stream, pkt(8, u32(14), s(b"h3")))
    assert (f.name, f.paths, f.judge, f.kinds) == ("fstat", ("/dir",), False, ("fstat", "stat"))
    op(stream, pkt(10, u32(15), s(b"h3"), NOATTRS))   # fsetstat is judged
    fs = op(stream, ext(16, "fsync@openssh.com", s(b"h3")))
    assert (fs.name, fs.paths, fs.writes, fs.judge) == ("fsync", ("/dir",), False, True)
    op(stream, close(17, b"h3"))
    assert stream.finish() == [FileDone("/dir", "dir", 0, 0, "unclosed")]


def test_unknown_handles_and_copy_data():
    stream = started()
    o = op(stream, read(1, b"nope"))
    assert (o.paths, o.judge) == ((), True)
    assert reply(stream, status(1, 1)).error == ""         # EOF is not an error
    op(stream, open_(2, "/src", 0x01))
    reply(stream, handle(2, b"r"))
    op(stream, open_(3, "/dst", 0x02 | 0x08))
    reply(stream, handle(3, b"w"))
    o = op(stream, ext(4, "copy-data", s(b"r"), u64(0), u64(1234), s(b"w"), u64(0)))
    assert (o.name, o.paths, o.writes, o.size, o.judge, o.kinds) == (
        "copy-data", ("/src", "/dst"), True, 1234, True, ("copy-data", "write"))


def test_status_errors_and_old_servers():
    stream = started()
    op(stream, pkt(17, u32(1), s("/nope")))
    assert reply(stream, pkt(101, u32(1), u32(2))).error == "SSH_FX_NO_SUCH_FILE: "
    op(stream, pkt(17, u32(2), s("/nope")))
    assert reply(stream, pkt(101, u32(2), u32(42), s("odd"))).error == "SSH_FX_42: odd"
    op(stream, pkt(17, u32(3), s("/")))
    rep = reply(stream, pkt(105, u32(3), NOATTRS))
    assert (rep.id, rep.error, rep.done) == (3, "", None)
    assert reply(stream, status(99)).id == 99                # unasked: passed on


def test_malformed_streams_raise():
    def fails(client=(), server=(), stream=None, **kw):
        stream = stream or SftpStream(**kw)
        with pytest.raises(SftpError):
            for packet in client:
                stream.receive_client(packet)
            for packet in server:
                stream.receive_server(packet)

    fails([pkt(17, u32(1), s("/"))])                                    # before INIT
    fails([INIT, INIT])
    fails([INIT, pkt(3, u32(1), s("/x"), u32(2), u32(1), u32(0))])       # SIZE past the end
    fails([INIT, pkt(17, u32(1), u32(100), b"/x")])                      # string past the end
    fails([INIT, pkt(17, u32(1), s("/x"), b"\x00")])                     # trailing byte
    fails([INIT, pkt(99, u32(1))])                                       # unknown type
    fails([INIT, pkt(17)])                                               # no id
    fails([INIT, ext(1, "limits@openssh.com", b"\x00")])
    fails([INIT, u32(MAX_PACKET + 1)])                                   # oversize length
    fails([INIT, u32(0) + b"\x11"])                                      # zero length
    fails([INIT, pkt(17, u32(5), s("/a")), pkt(17, u32(5), s("/b"))])    # id reused
    fails([INIT], [pkt(2, u32(4))])                                      # not version 3
    fails([INIT], [pkt(150, u32(1))])                                    # unknown reply
    fails([INIT, open_(1, "/x", 1)], [handle(1, b"h" * 257)])
    fails([INIT, u32(100) + b"\x11" * 60], max_buffer=50)                # partial past cap
    # the id reused after its answer is fine
    stream = started()
    op(stream, pkt(17, u32(5), s("/a")))
    reply(stream, status(5))
    op(stream, pkt(17, u32(5), s("/a")))


def test_tables_are_bounded(monkeypatch):
    from hostagent.protocols.ssh import sftp
    monkeypatch.setattr(sftp, "MAX_OUTSTANDING", 3)
    stream = started()
    for i in range(3):
        op(stream, pkt(17, u32(i), s("/")))
    with pytest.raises(SftpError):
        op(stream, pkt(17, u32(9), s("/")))
    monkeypatch.setattr(sftp, "MAX_HELD", 10)
    stream = started()
    o = op(stream, open_(1, "/12345", 1))              # 6 bytes held for the answer
    with pytest.raises(SftpError):
        op(stream, pkt(17, u32(2), s("/12345")))
    stream = started()
    op(stream, open_(1, "/12345", 1))
    reply(stream, handle(1, b"h"))                      # 6 bytes now held for the handle
    op(stream, close(2, b"h"))
    reply(stream, status(2))
    o = op(stream, pkt(17, u32(3), s("/123456789")))    # all of it free again
    stream.refuse(o, "no")
    assert stream.held == 0


def test_buffered_partial_packets():
    stream = SftpStream()
    assert stream.receive_client(INIT[:3]) == [] and stream.buffered() == 3
    assert [r.op.name for r in stream.receive_client(INIT[3:] + VERSION[:6])] == ["init"]
    assert stream.buffered() == 6


# ------------------------------------------------------------------ framing

SCRIPT = [
    ("c", INIT),
    ("s", VERSION),
    ("c", open_(1, "/up", 0x1A) + pkt(17, u32(3), s("/i"))),
    ("s", handle(1, b"H") + pkt(105, u32(3), NOATTRS)),
    ("c", write(2, b"H", b"z" * 70000, 0) + write(4, b"H", b"y" * 300) + close(5, b"H")
     + read(6, b"H")
     + ext(7, "posix-rename@openssh.com", s("/a"), s("/b"))),
    ("s", status(2, 4, "Failure") + status(4) + status(7, 3, "denied") + status(5)
     + status(6, 4)),
]


def run(script, cuts) -> list:
    stream, out = SftpStream(), []
    for (side, blob), points in zip(script, cuts):
        points = sorted({p % (len(blob) + 1) for p in points})
        feed = stream.receive_client if side == "c" else stream.receive_server
        for a, b in zip([0] + points, points + [len(blob)]):
            out += feed(blob[a:b])
    return out + stream.finish()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 1 << 20), max_size=12), min_size=len(SCRIPT),
                max_size=len(SCRIPT)))
def test_any_split_gives_the_same_result(cuts):
    whole = run(SCRIPT, [[]] * len(SCRIPT))
    assert run(SCRIPT, cuts) == whole
    # (what the whole stream gives, to be sure the comparison means something)
    ops = [x.op for x in whole if hasattr(x, "op")]
    assert [o.judge for o in ops if o.name in ("write", "close")] == [False, False, False]
    assert [x.done for x in whole if getattr(x, "done", None)] == [
        FileDone("/up", "write", 0, 300, "ok")]      # (the 70000 bytes failed)
    assert [x.error for x in whole if getattr(x, "id", None) == 7] == [
        "SSH_FX_PERMISSION_DENIED: denied"]


# ------------------------------------------------------------------ the real OpenSSH

SHIM = '''\
#!{python}
"""Between sftp and sftp-server: feeds both directions through SftpStream, logs what it
sees as JSON lines, and refuses remove of any path ending in keep.txt."""
import dataclasses, json, os, subprocess, sys, threading
sys.path.insert(0, {root!r})
from hostagent.protocols.ssh.sftp import SftpStream

server = subprocess.Popen([{server!r}, "-e", "-d", {remote!r}], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, bufsize=0)
stream, lock, log = SftpStream(), threading.Lock(), open({log!r}, "a", buffering=1)

def send(fd, b):
    while b:
        b = b[os.write(fd, b):]

def note(kind, obj):
    log.write(json.dumps({{kind: dataclasses.asdict(obj) if dataclasses.is_dataclass(obj)
                           else obj}}) + "\\n")

def upstream():
    while data := os.read(0, 65536):
        with lock:
            for req in stream.receive_client(data):
                note("op", req.op)
                if req.op.name == "remove" and req.op.paths[0].endswith("keep.txt"):
                    note("refused", req.op.paths[0])
                    send(1, stream.refuse(req.op, "not allowed by policy"))
                else:
                    send(server.stdin.fileno(), req.raw)
    server.stdin.close()

threading.Thread(target=upstream, daemon=True).start()
while data := os.read(server.stdout.fileno(), 65536):
    with lock:
        for rep in stream.receive_server(data):
            if rep.done:
                note("done", rep.done)
            if rep.error:
                note("error", rep.error)
            send(1, rep.raw)
with lock:
    for done in stream.finish():
        note("done", done)
    note("end", stream.buffered())
server.wait(timeout=30)
'''


@pytest.mark.skipif(not (shutil.which("sftp") and os.access(SFTP_SERVER, os.X_OK)),
                    reason="needs OpenSSH's sftp and sftp-server")
def test_real_openssh_client_and_server(tmp_path):
    remote, local, log = tmp_path / "remote", tmp_path / "local", tmp_path / "log.jsonl"
    remote.mkdir(), local.mkdir()
    payload = os.urandom(300_000)              # several 32 KiB reads and writes
    (local / "data.bin").write_bytes(payload)
    (remote / "keep.txt").write_text("keep me")
    shim = tmp_path / "shim.py"
    shim.write_text(SHIM.format(python=sys.executable, root=str(ROOT), server=SFTP_SERVER,
                                remote=str(remote), log=str(log)))
    shim.chmod(0o755)
    batch = tmp_path / "batch"
    batch.write_text(textwrap.dedent("""\
        put data.bin
        get data.bin back.bin
        mkdir newdir
        rename data.bin newdir/moved.bin
        ls newdir
        -rm keep.txt
        rm newdir/moved.bin
        rmdir newdir
        """))
    done = subprocess.run(["sftp", "-D", str(shim), "-b", str(batch)], cwd=local,
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr.decode()
    # (sftp waits for the shim, so the log is complete)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[-1] == {"end": 0}
    ops = [x["op"] for x in lines if "op" in x]
    dones = [x["done"] for x in lines if "done" in x]
    r = str(remote)
    judged = [(o["name"], tuple(o["paths"])) for o in ops if o["judge"]]
    writes = [(o["name"], tuple(o["paths"])) for o in ops if o["writes"] and o["judge"]]
    assert ("open", (f"{r}/data.bin",)) in writes
    assert ("mkdir", (f"{r}/newdir",)) in writes
    assert ("posix-rename", (f"{r}/data.bin", f"{r}/newdir/moved.bin")) in writes
    assert ("remove", (f"{r}/keep.txt",)) in writes
    assert ("remove", (f"{r}/newdir/moved.bin",)) in writes
    assert ("rmdir", (f"{r}/newdir",)) in writes
    # (sftp's ls opens the directory as "newdir/")
    assert ("open", (f"{r}/data.bin",)) in judged and ("opendir", (f"{r}/newdir/",)) in judged
    # one record a file, not one a packet: the data moved is all in the close's FileDone
    assert {"path": f"{r}/data.bin", "mode": "write", "bytes_read": 0,
            "bytes_written": len(payload), "status": "ok"} in dones
    assert {"path": f"{r}/data.bin", "mode": "read", "bytes_read": len(payload),
            "bytes_written": 0, "status": "ok"} in dones
    assert {"path": f"{r}/newdir/", "mode": "dir", "bytes_read": 0, "bytes_written": 0,
            "status": "ok"} in dones
    assert not [o for o in ops if o["name"] in ("read", "write") and o["judge"]]
    assert {"refused": f"{r}/keep.txt"} in lines
    assert (remote / "keep.txt").read_text() == "keep me"
    # (sftp shows the text for the code, not the server's message)
    assert b"keep.txt: Permission denied" in done.stderr
    assert (local / "back.bin").read_bytes() == payload
    assert not (remote / "newdir").exists() and not (remote / "data.bin").exists()


def test_a_handle_whose_close_is_under_way_names_no_file():
    """Red team: OpenSSH gives a closed handle to the next open at once, so a request
    pipelined behind a CLOSE (fsetstat h) was judged for the old file and ran on the
    new one (/etc/...). From the CLOSE on, the handle is unknown."""
    st = started()
    st.receive_client(open_(3, "/tmp/mine", 0x1A))
    st.receive_server(handle(3, b"\0\0\0\0"))
    reqs = st.receive_client(close(4, b"\0\0\0\0") + open_(5, "/etc/victim", 0x01)
                             + pkt(10, u32(6), s(b"\0\0\0\0"), u32(4), u32(0o666)))
    fsetstat = reqs[2].op
    assert fsetstat.name == "fsetstat" and fsetstat.unknown_handle and fsetstat.paths == ()
    assert fsetstat.judge
    # the close still reports the file it closed
    (reply,) = st.receive_server(status(4))
    assert reply.done == FileDone("/tmp/mine", "write", 0, 0, "ok")
