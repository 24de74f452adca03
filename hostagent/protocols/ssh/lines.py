"""Lines typed into a remote shell, cut from the bytes an agent sends, so each can be
judged before the shell runs it.

With a pty (`ssh -t`, an interactive shell) the remote line editor echoes and edits as
keys arrive, so keys pass through at once and only a line's end is held: the tracker
keeps its own copy of the line (printable characters; DEL erases an ASCII character, ^U
and ^C clear the line, bracketed paste is typed text) and hands it over as a Line at
Enter (CR or LF; CR LF is an Enter, then an Enter on the emptied line). The caller
sends the Enter only if the line is allowed, and `refusal()` instead: ^C, the tty's
interrupt, which bash/readline, cooked mode and most REPLs take as "discard the line".
What that promises, and what not:
- the characters of a refused line did reach the remote editor; only its Enter is
  withheld, and an interrupt sent in its place;
- an escape sequence (cursor keys, Alt/Meta+key, function keys) and, outside a bracketed
  paste, a byte past ASCII (a Meta key to readline outside a UTF-8 locale) are held as
  the line's end, unclean, and refused in its place: readline runs some without an
  Enter (M-1 M-# runs the line as it uncomments it, M-C-e runs its `$(...)` as it
  expands them). So arrows and non-ASCII can't be typed on a terminal (paste them);
  a lone ESC waits for the key after it;
- editing we can't follow (Home/End, history, Tab completion, ^R search, ^W/^Y,
  ^V, ^H (an erase to readline, a character to the tty), DEL over a non-ASCII character,
  any other control, an escape sequence, a line past `max_line`) makes the line
  unclean: the caller takes it as unparseable, whatever its text says. The next line
  starts clean; ^C makes the current one clean again;
- ^D on a non-empty line is held as its end, unclean: the tty's cooked mode hands the
  line to the reader without a newline (and a second ^D makes sh run it);
- keys readline binds to run the line without an Enter are held as its end too: ^O
  (operate-and-get-next: the line after it starts unclean, it is a history line) and
  ^X (the prefix of ^X^E edit-and-execute: always unclean). Bindings we don't know of
  (a user's inputrc, vi mode's `v`) are not covered;
- a program in raw mode (vim, less, a REPL) gets keys we judge as shell lines, and what
  a shell reads over several lines (heredoc bodies, if/then/fi, a pasted multi-line
  buffer) is judged line by line: a line incomplete on its own doesn't parse.
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

CR, LF, TAB, ESC = 0x0D, 0x0A, 0x09, 0x1B
ESC_B = b"\x1b"
INTR, EOF, KILL, DEL, BS = 0x03, 0x04, 0x15, 0x7F, 0x08
# held as a line's end: -> whether the line as typed is what then runs
ACCEPT = {0x0F: True, 0x18: False}
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
        self._esc: bytes | None = None   # an escape sequence under way (after ESC)
        self._paste = False       # inside a bracketed paste
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
        start = 0
        for i, b in enumerate(data):
            after_cr, self._after_cr = self._after_cr, False
            if after_cr and b == LF:
                continue             # CR LF: an Enter, then an Enter on an empty line
            if self._esc is not None:
                # an escape sequence is held, not passed: readline runs some without an
                # Enter (M-# with a count, M-C-e expands `$(...)`)
                more = self._escape(b)
                if more is not None:
                    start = i + 1
                    if more:
                        continue
                    out.append(self._sequence())
                    continue
                out.append(self._sequence())   # (ended by this byte: it is a key)
                start = i
            if b == ESC or (b >= 0x80 and not self._paste):
                if i > start:
                    out.append(Pass(data[start:i]))
                start = i + 1
                if b == ESC:
                    self._esc = b""
                else:
                    # a byte past ASCII is a Meta key to readline in a locale that is not
                    # UTF-8 (convert-meta): like an escape, it ends the line, unclean
                    self._clean = False
                    out.append(self._end(bytes((b,))))
                    self._clean = True
                continue
            # ^D on a line hands it to a reader in the tty's cooked mode without a
            # newline (a second ^D then runs it in sh): held as an end, and unclean
            ends = b in (CR, LF) or (b in ACCEPT and not self._paste) or (b == EOF and self._buf)
            if not ends:
                self._key(b)
                continue
            if i > start:
                out.append(Pass(data[start:i]))
            start = i + 1
            if not ACCEPT.get(b, True) or b == EOF:
                self._clean = False
            out.append(self._end(bytes((b,))))
            self._after_cr = b == CR
            # (after ^O the editor holds a history line; after ^X, a key of its own)
            self._clean = b not in ACCEPT
            self._paste = self._paste and b != EOF
        if start < len(data):
            out.append(Pass(data[start:]))
        merged: list[Pass | Line] = []
        for item in out:             # (keys passed in a row: one Pass)
            if isinstance(item, Pass) and merged and isinstance(merged[-1], Pass):
                merged[-1] = Pass(merged[-1].data + item.data)
            else:
                merged.append(item)
        return merged

    def _key(self, b: int) -> None:
        line = self._buf
        if b == INTR:                # (the tty's interrupt: read by no editor, even pasting)
            line.clear()
            self._clean, self._over, self._paste = True, False, False
        elif b >= 0x20 and b != DEL or b == TAB and self._paste:
            if len(line) >= self.max_line:
                self._over = True
            else:
                line.append(b)
        elif self._paste:
            self._clean = False      # pasted controls: inserted as they are, or not
        elif b == DEL and (not line or line[-1] < 0x80):
            # DEL erases one ASCII character alike in the tty's cooked mode (its VERASE
            # by default: the agent's own modes are not passed on) and in readline
            if line:
                del line[-1]
        elif b in (DEL, BS):
            # ^H is no erase to the tty (it is to readline), and how much of a non-ASCII
            # character DEL erases depends on IUTF8 and the locale: which line runs is
            # not known
            self._clean = False
        elif b == KILL:
            line.clear()             # (to the cursor: the whole line if we followed it)
        elif not (b == EOF and not line):
            self._clean = False      # editing we don't follow (^D on a line: deletes)

    def _escape(self, b: int) -> bool | None:
        """The byte after ESC (or after ESC [ ...): True if the sequence goes on, False if
        it ends with it, None if it is no part of it (the sequence ended before)."""
        seq = self._esc
        if not seq and (b < 0x20 or b == DEL):
            self._esc = bytes((b,))      # Meta+Ctrl+key (M-C-e): one key
            return False
        if b < 0x20 or b == DEL or b >= 0x80:
            return None
        if not seq and b in b"[O":
            self._esc = bytes((b,))
            return True
        if seq and seq[:1] == b"[" and not 0x40 <= b <= 0x7E:
            self._esc = seq + bytes((b,)) if len(seq) < 16 else seq
            return True
        self._esc = seq + bytes((b,))
        return False

    def _sequence(self) -> Pass | Line:
        """An escape sequence, complete: a bracketed paste's bounds (and anything inside a
        paste, which readline inserts as text) pass; any other key ends the line,
        unclean: the caller refuses it (^C in its place) unless unparseable lines pass."""
        seq, self._esc = ESC_B + self._esc, None
        if seq[1:] in (b"[200~", b"[201~"):
            self._paste = seq[1:] == b"[200~"
            return Pass(seq)
        if self._paste:
            return Pass(seq)
        self._clean = False
        line = self._end(seq)
        self._clean = True
        return line

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
