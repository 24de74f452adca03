"""Lines typed into a remote shell, cut from the bytes an agent sends, so each can be
judged before the shell runs it.

With a pty (`ssh -t`, an interactive shell) the remote line editor echoes and edits as
keys arrive, so keys pass through at once and only a line's end is held. The tracker
follows only keys whose effect is the same in bash's readline and in the tty's cooked
mode (dash): printable ASCII is typed, DEL erases the last character, ^U and ^C clear
the line, Enter (CR or LF; CR LF is an Enter, then an Enter on the emptied line) ends
it, ^D on an empty line passes. Every other key ends the line too, unclean, and is held
like an Enter: escape sequences (arrows, Alt/Meta keys, bracketed paste), bytes past
ASCII (Meta keys to readline outside a UTF-8 locale), and every other control (Tab, ^V,
^W, ^Y, ^R, ^O, ^X, ^_, ^D on a line, ...). Red-teaming found each of those making the
shell run other text than the tracker's, or run it without an Enter (M-1 M-#, M-C-e,
^V ^C, ^O, ^X ^E, ^D ^D in cooked mode, text hidden in a paste).
The caller sends a line's end only if the line is allowed (an unclean line is
unparseable), and `refusal()` in its place otherwise: ^C, which discards the line in
readline and in cooked mode (no ^V can precede it: ^V is an end the caller replaces).
What that promises, and what not:
- the characters of a refused line did reach the remote editor; only its end is
  withheld, and an interrupt sent in its place;
- arrows, Tab completion, history keys and non-ASCII text can't be used on a terminal:
  the line they end is refused;
- a program in raw mode (vim, less, a REPL) gets keys we judge as shell lines, and what
  a shell reads over several lines (heredoc bodies, if/then/fi) is judged line by line:
  a line incomplete on its own doesn't parse.
Without a pty (`ssh host sh < script`) nothing of a line reaches the remote before it
is judged: each line, up to LF, is a Line with its bytes, to send only if allowed (its
text without the CR of a CR LF). Editing bytes mean nothing there: a line with other
controls than Tab, or invalid UTF-8, is unclean.
Memory is bounded either way: a line longer than `max_line` is unclean (without a pty,
judged in pieces of `max_line` bytes).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

CR, LF = 0x0D, 0x0A
INTR, EOF, KILL, DEL = 0x03, 0x04, 0x15, 0x7F
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class Pass:
    data: bytes


@dataclass(frozen=True)
class Line:
    text: str
    clean: bool
    terminator: bytes
    data: bytes = b""


class LineTracker:
    def __init__(self, pty: bool, max_line: int = 64 * 1024):
        self.pty = pty
        self.max_line = max_line
        self._buf = bytearray()   # pty: our copy of the line; else the bytes held back
        self._scan = 0            # (no "\n" before it in _buf)
        self._clean = True
        self._over = False        # past max_line: not stored any more
        self._after_cr = False

    def feed(self, data: bytes) -> list[Pass | Line]:
        return self._keys(data) if self.pty else self._held(data)

    def eof(self) -> list[Pass | Line]:
        if self.pty or not self._buf:
            return []
        raw = bytes(self._buf)
        self._buf.clear()
        self._scan = 0
        line = self._line(raw, b"", raw)
        self._over = False
        return [line]

    def refusal(self) -> bytes:
        return b"\x03" if self.pty else b""

    def buffered(self) -> int:
        """Bytes held back from the remote (only without a pty)."""
        return 0 if self.pty else len(self._buf)

    # ------------------------------------------------------------------ with a pty

    def _keys(self, data: bytes) -> list[Pass | Line]:
        out: list[Pass | Line] = []
        line, start = self._buf, 0
        for i, b in enumerate(data):
            after_cr, self._after_cr = self._after_cr, False
            if after_cr and b == LF:
                continue             # CR LF: an Enter, then an Enter on an empty line
            if 0x20 <= b < 0x7F:
                if len(line) >= self.max_line:
                    self._over = True
                else:
                    line.append(b)
                continue
            if b == DEL:
                if line and not self._over:
                    del line[-1]
                continue
            if b in (KILL, INTR):
                line.clear()
                self._over = False
                continue
            if b == EOF and not line and not self._over:
                continue             # (the shell's EOF: logout)
            if i > start:
                out.append(Pass(data[start:i]))
            start = i + 1
            self._clean = b in (CR, LF)
            out.append(self._end(bytes((b,))))
            self._clean = True
            self._after_cr = b == CR
        if start < len(data):
            out.append(Pass(data[start:]))
        return out

    def _end(self, terminator: bytes) -> Line:
        line = self._line(bytes(self._buf), terminator, b"")
        self._buf.clear()
        self._over = False
        return line

    # --------------------------------------------------------------- without a pty

    def _held(self, data: bytes) -> list[Pass | Line]:
        buf, out = self._buf, []
        buf += data
        while True:
            i = buf.find(b"\n", self._scan, self.max_line + 1)
            if i < 0 and len(buf) <= self.max_line:
                self._scan = len(buf)
                return out
            n = i + 1 if i >= 0 else self.max_line
            raw = bytes(buf[:n])
            del buf[:n]
            self._scan = 0
            if i >= 0:
                out.append(self._line(raw[:-1], b"\n", raw))
            else:
                out.append(self._line(raw, b"", raw, over=True))
            self._over = i < 0       # the rest of an overlong line is unclean too

    def _line(self, body: bytes, terminator: bytes, data: bytes, over: bool = False) -> Line:
        clean = not (over or self._over)
        if self.pty:
            clean = clean and self._clean
        else:
            if terminator and body.endswith(b"\r"):
                body, terminator = body[:-1], b"\r\n"
            clean = clean and not _CONTROL.search(body)
        try:
            text = body.decode()
        except UnicodeDecodeError:
            text, clean = body.decode(errors="replace"), False
        return Line(text, clean, terminator, data)
