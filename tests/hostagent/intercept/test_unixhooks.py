"""The unix-socket hooks' pieces that need no kernel: the allowlist's entries and the
rewriting of placeholder calls into kfunc calls. (test_guard.py and test_daemon.py run
them on the kernel.)"""
import struct

from hostagent.intercept import unixhooks
from hostagent.intercept.unixhooks import Btf, Entry, entries


def test_exact_names_prefixes_and_other_globs():
    got = entries(("/run/nscd/socket", "/run/systemd/userdb/*", "/tmp/app-?.sock", "@bus",
                   "@ci-*"), abstract_allowed=False,
                  bound={"/tmp/app-1.sock", "/tmp/app-22.sock", "/tmp/other.sock"})
    assert Entry(b"/run/nscd/socket", True) in got
    assert Entry(b"/var/run/nscd/socket", True) in got            # the other spelling
    assert Entry(b"/run/systemd/userdb/", False) in got           # a trailing '*': a prefix
    assert Entry(b"/tmp/app-1.sock", True) in got                 # matched against bound ones
    assert Entry(b"/tmp/app-22.sock", True) not in got
    assert Entry(b"\0bus", True) in got                          # abstract: its NUL leads
    assert Entry(b"\0ci-", False) in got
    assert Entry(b"\0", False) not in got


def test_abstract_allowed_is_a_prefix_of_every_abstract_name():
    assert Entry(b"\0", False) in entries((), abstract_allowed=True)


def test_globs_matched_against_bound_names_stay_within_a_segment():
    """A name bound to bait a glob (its '*' crossing '/', or climbing with '..') is not
    taken: the agent could bind it, then put a link there."""
    bound = {"/run/user/1000/bus", "/run/user/../../tmp/x/bus", "/run/user/a/b/bus",
             "/run/user/./bus", "/run/user//bus", "@agent-1", "@agent-x/y"}
    got = {e.name for e in entries(("/run/user/*/bus", "@agent-*x"), False, bound)}
    assert got == {b"/run/user/1000/bus", b"/var/run/user/1000/bus"}
    assert {e.name for e in entries(("@agent-?",), False, bound)} == {b"\0agent-1"}


def test_plain_paths():
    assert unixhooks.plain("/run/a.sock") and unixhooks.plain("/run/.hidden")
    for bad in ("run/a", "/run/../x", "/run/./x", "/run//x", "/run/x/", "/run/..", "/run/."):
        assert not unixhooks.plain(bad), bad


def test_key_lengths_are_bytes_for_names_and_bits_for_prefixes():
    assert Entry(b"/a/b", True).key_len == 4 and Entry(b"/a/b", True).table == "unix_exact"
    assert Entry(b"/a/", False).key_len == 24 and Entry(b"/a/", False).table == "unix_prefix"


def test_names_longer_than_sun_path_are_left_out():
    assert entries(("/" + "x" * 200,), False) == []


def test_only_globs_that_follow_bound_sockets_need_refreshing():
    assert not unixhooks.needs_refresh(("/run/a", "/run/b/*", "@x"))
    assert unixhooks.needs_refresh(("/run/user/*/bus",))
    assert unixhooks.needs_refresh(("/tmp/a?",))


def insn(code, regs, off, imm):
    return struct.pack("<BBhi", code, regs, off, imm)


def test_placeholder_calls_become_kfunc_calls_and_nothing_else_changes():
    btf = Btf({"bpf_cast_to_kern_ctx": 111, "bpf_rdonly_cast": 222}, 333, 32)
    prog = (insn(0x85, 0, 0, 0x7ff0) + insn(0x85, 0, 0, 1) + insn(0xb7, 1, 0, 0x7ff1)
            + insn(0x85, 0, 0, 0x7ff1) + insn(0x95, 0, 0, 0))
    out = unixhooks.patch(prog, btf)
    words = [struct.unpack("<BBhi", out[i:i + 8]) for i in range(0, len(out), 8)]
    assert words[0] == (0x85, 0x20, 0, 111)          # src_reg = BPF_PSEUDO_KFUNC_CALL
    assert words[1] == (0x85, 0, 0, 1)               # a real helper stays
    assert words[2] == (0xb7, 1, 0, 0x7ff1)          # a constant that looks alike stays
    assert words[3] == (0x85, 0x20, 0, 222)
    assert words[4] == (0x95, 0, 0, 0)
    assert btf.cflags() == ["-DAG_UNIX_HOOKS=1", "-DAG_SOCKADDR_UN_ID=333",
                            "-DAG_UADDRLEN_OFF=32"]
