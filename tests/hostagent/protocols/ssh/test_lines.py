"""Lines typed into a remote shell: scripts of bytes in, exactly what is passed on and
what is judged out; and the same, however the bytes are cut into chunks."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from hostagent.protocols.ssh.lines import Line, LineTracker, Pass


def feed(tracker: LineTracker, *chunks: bytes) -> list:
    out = []
    for chunk in chunks:
        out += tracker.feed(chunk)
    return out


def pty(*chunks: bytes) -> list:
    return feed(LineTracker(pty=True), *chunks)


def held(*chunks: bytes, max_line: int = 64 * 1024) -> list:
    t = LineTracker(pty=False, max_line=max_line)
    return feed(t, *chunks) + t.eof()


# ------------------------------------------------------------------------ with a pty

@pytest.mark.parametrize("data, out", [
    (b"ls -l\r", [Pass(b"ls -l"), Line("ls -l", True, b"\r")]),
    (b"ls\n", [Pass(b"ls"), Line("ls", True, b"\n")]),
    (b"\r", [Line("", True, b"\r")]),
    # CR LF: an Enter, then an Enter on the line the Enter left empty
    (b"ls\r\npwd\r", [Pass(b"ls"), Line("ls", True, b"\r"), Pass(b"\npwd"),
                      Line("pwd", True, b"\r")]),
    (b"ls\n\r", [Pass(b"ls"), Line("ls", True, b"\n"), Line("", True, b"\r")]),
    # DEL erases a character; ^U and ^C clear the line (the same in readline and cooked)
    (b"rm\x7f\x7f\x7fecho hi\r", [Pass(b"rm\x7f\x7f\x7fecho hi"), Line("echo hi", True, b"\r")]),
    (b"rm -rf /\x15ls\r", [Pass(b"rm -rf /\x15ls"), Line("ls", True, b"\r")]),
    (b"rm -rf /\x03ls\r", [Pass(b"rm -rf /\x03ls"), Line("ls", True, b"\r")]),
    # ^D: on an empty line it passes (logout); on a line, cooked mode hands the line to
    # sh without a newline (a second ^D runs it): an end, unclean
    (b"\x04", [Pass(b"\x04")]),
    (b"ls\x04\r", [Pass(b"ls"), Line("ls", False, b"\x04"), Line("", True, b"\r")]),
    # any other key ends the line, unclean (the caller sends ^C in its place): ^H (an
    # erase to readline, a character to the tty), escape sequences (M-1 M-# and M-C-e
    # run a line without an Enter), bytes past ASCII (Meta keys outside UTF-8), ^V (the
    # ^C after it would be literal), Tab, ^O, bracketed paste (text inserted as is)
    (b"rm -fr x #\x08\x08echo hi\r", [Pass(b"rm -fr x #"), Line("rm -fr x #", False, b"\x08"),
                                       Line("", False, b"\x08"), Pass(b"echo hi"),
                                       Line("echo hi", True, b"\r")]),
    (b"ls\x1b[A\r", [Pass(b"ls"), Line("ls", False, b"\x1b"), Pass(b"[A"),
                     Line("[A", True, b"\r")]),
    (b"#touch x\x1b1\x1b#", [Pass(b"#touch x"), Line("#touch x", False, b"\x1b"), Pass(b"1"),
                             Line("1", False, b"\x1b"), Pass(b"#")]),
    (b"\xc3\xa9\r", [Line("", False, b"\xc3"), Line("", False, b"\xa9"), Line("", True, b"\r")]),
    (b"touch x;\x16\x03echo hi\r", [Pass(b"touch x;"), Line("touch x;", False, b"\x16"),
                                     Pass(b"\x03echo hi"), Line("echo hi", True, b"\r")]),
    (b"cat /et\t\r", [Pass(b"cat /et"), Line("cat /et", False, b"\t"), Line("", True, b"\r")]),
    (b"ls\x0fpwd\r", [Pass(b"ls"), Line("ls", False, b"\x0f"), Pass(b"pwd"),
                      Line("pwd", True, b"\r")]),
    (b"\x1b[200~ls\n\x1b[201~", [Line("", False, b"\x1b"), Pass(b"[200~ls"),
                                 Line("[200~ls", True, b"\n"), Line("", False, b"\x1b"),
                                 Pass(b"[201~")]),
    (b"ls\x00\r", [Pass(b"ls"), Line("ls", False, b"\x00"), Line("", True, b"\r")]),
])
def test_pty(data, out):
    assert pty(data) == out


def test_pty_long_lines_are_unclean_and_bounded():
    t = LineTracker(pty=True, max_line=8)
    assert feed(t, b"12345678") == [Pass(b"12345678")]
    assert feed(t, b"9\r") == [Pass(b"9"), Line("12345678", False, b"\r")]
    assert feed(t, b"12345678\r") == [Pass(b"12345678"), Line("12345678", True, b"\r")]
    t.feed(b"x" * 100_000)
    assert len(t._buf) == 8 and t.buffered() == 0
    assert feed(t, b"\x03ls\r") == [Pass(b"\x03ls"), Line("ls", True, b"\r")]


def test_pty_refusal_and_eof():
    t = LineTracker(pty=True)
    assert t.refusal() == b"\x03"
    assert t.feed(b"rm -rf /") == [Pass(b"rm -rf /")]
    assert t.eof() == []


# ------------------------------------------------------------------- without a pty

@pytest.mark.parametrize("data, out", [
    (b"ls -l\n", [Line("ls -l", True, b"\n", b"ls -l\n")]),
    (b"ls\r\n", [Line("ls", True, b"\r\n", b"ls\r\n")]),
    (b"ls\npwd\n\n", [Line("ls", True, b"\n", b"ls\n"), Line("pwd", True, b"\n", b"pwd\n"),
                      Line("", True, b"\n", b"\n")]),
    (b"echo\thi\n", [Line("echo\thi", True, b"\n", b"echo\thi\n")]),
    # editing bytes mean nothing here: the line is unclean, as it is
    (b"rm\x7fls\n", [Line("rm\x7fls", False, b"\n", b"rm\x7fls\n")]),
    (b"ls\rrm\n", [Line("ls\rrm", False, b"\n", b"ls\rrm\n")]),
    (b"\x1b[Als\n", [Line("\x1b[Als", False, b"\n", b"\x1b[Als\n")]),
    (b"ls \xff\n", [Line("ls \ufffd", False, b"\n", b"ls \xff\n")]),
    (b"echo h\xc3\xa9\n", [Line("echo hé", True, b"\n", b"echo h\xc3\xa9\n")]),
    # the last line, unterminated, comes at eof
    (b"ls\nexit", [Line("ls", True, b"\n", b"ls\n"), Line("exit", True, b"", b"exit")]),
    (b"", []),
])
def test_held(data, out):
    assert held(data) == out


def test_held_sends_nothing_before_the_line_ends():
    t = LineTracker(pty=False)
    assert t.feed(b"rm -rf") == [] and t.buffered() == 6
    assert t.feed(b" /\nl") == [Line("rm -rf /", True, b"\n", b"rm -rf /\n")]
    assert t.buffered() == 1 and t.refusal() == b""
    assert t.eof() == [Line("l", True, b"", b"l")] and t.buffered() == 0
    assert t.eof() == []


def test_held_long_lines_come_in_unclean_pieces():
    assert held(b"12345678\n", max_line=8) == [Line("12345678", True, b"\n", b"12345678\n")]
    assert held(b"0123456789abcdefghij\nok\n", max_line=8) == [
        Line("01234567", False, b"", b"01234567"), Line("89abcdef", False, b"", b"89abcdef"),
        Line("ghij", False, b"\n", b"ghij\n"), Line("ok", True, b"\n", b"ok\n")]
    assert held(b"123456789", max_line=8) == [Line("12345678", False, b"", b"12345678"),
                                               Line("9", False, b"", b"9")]
    t = LineTracker(pty=False, max_line=1000)
    for _ in range(100):
        t.feed(b"x" * 997)
        assert t.buffered() <= 1000


# ------------------------------------------------------- however the bytes are cut

_KEYS = st.lists(st.sampled_from([
    b"l", b"s", b" ", b"\xc3\xa9", b"\xe2", b"\x82\xac", b"\r", b"\n", b"\r\n", b"\x7f", b"\x08",
    b"\x15", b"\x03", b"\x04", b"\t", b"\x0f", b"\x18", b"\x1b", b"\x1b[A", b"\x1b[1;5D", b"\x1bb",
    b"\x1bO", b"[", b"~", b"\x1b[200~", b"\x1b[201~", b"\x00", b"\xff"]), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_KEYS, st.data(), st.booleans(), st.sampled_from([4, 1024]))
def test_the_same_however_cut(keys, data, with_pty, max_line):
    stream = b"".join(keys)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    whole, t = LineTracker(with_pty, max_line), LineTracker(with_pty, max_line)
    one = whole.feed(stream) + whole.eof()
    cut = feed(t, *chunks) + t.eof()
    lines = [x for x in one if isinstance(x, Line)]
    assert lines == [x for x in cut if isinstance(x, Line)]
    passed = b"".join(x.data for x in one if isinstance(x, Pass))
    assert passed == b"".join(x.data for x in cut if isinstance(x, Pass))
    if with_pty:    # every byte reaches the remote: passed, or as a line's end (but an
        # escape sequence under way at the end, held until the key after it)
        assert b"".join(x.data if isinstance(x, Pass) else x.terminator for x in one) == stream
        assert all(len(x.text.encode()) <= max_line * 3 for x in lines)
    else:           # nothing passes; every byte is in exactly one line
        assert passed == b"" and b"".join(x.data for x in lines) == stream


def test_ctrl_d_on_a_line_is_held_like_an_enter():
    """Red team round 3: the tty's cooked mode hands a line to sh at ^D, and a second ^D
    runs it: no Enter, so nothing was judged."""
    t = LineTracker(pty=True)
    assert t.feed(b"rm -f x\x04\x04") == [Pass(b"rm -f x"), Line("rm -f x", False, b"\x04"),
                                         Pass(b"\x04")]
    assert t.feed(b"\x1b[200~rm -f x\x04\x04") == [
        Line("", False, b"\x1b"), Pass(b"[200~rm -f x"), Line("[200~rm -f x", False, b"\x04"),
        Pass(b"\x04")]
    assert t.feed(b"\x04") == [Pass(b"\x04")]       # on an empty line: the shell's EOF
