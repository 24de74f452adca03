"""The local spool: append-only segment files of recording events.

Guarantees (see README "Durability"):
- `append()` returns once the event is written to the spool file (one write(2) into
  the page cache): it survives a crash or SIGKILL of the host agent.
- Disk durability is group-committed: a syncer thread fdatasyncs at most every
  `fsync_interval` seconds, one fsync covering every session's appends. In strict
  mode `append()` also waits for the fsync that covers its event.
- Files are deleted only when the collector has acked every event in them.
- At `max_bytes` `append()` raises SpoolFull; nothing is dropped silently.

Frames: agentgate/frames.py. A torn frame at the tail of a segment (crash mid-write) is
cut off on recovery.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from agentgate.events import SESSION_END, Event
from agentgate.frames import (HEADER, MAX_FRAME, encode_checkpoint, encode_frame, frame_ends,
                              iter_frames)
from agentgate.tomlconfig import private_dir

log = logging.getLogger("agentgate.spool")

SEGMENT_RE = re.compile(r"^seg-(\d{12})\.log$")


class SpoolError(Exception):
    """The spool could not persist an event; the caller must fail closed."""


class SpoolFull(SpoolError):
    pass


@dataclass
class Segment:
    number: int
    path: Path
    size: int = 0                                            # bytes of complete frames
    base: int = 0                                            # of which the checkpoint
    max_seq: dict[str, int] = field(default_factory=dict)    # session -> highest seq here


@dataclass(frozen=True, slots=True)
class Position:
    segment: int
    offset: int


class Spool:
    def __init__(self, directory: str | os.PathLike, *, max_bytes: int = 1 << 30,
                 segment_bytes: int = 16 << 20, fsync_interval: float = 0.05,
                 strict: bool = False):
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync_interval = fsync_interval
        self.strict = strict
        self._lock = threading.Lock()          # append / rotate / release
        self._sync_cond = threading.Condition(threading.Lock())
        self._segments: dict[int, Segment] = {}
        self._bytes = 0                        # sum of segment sizes
        self._active: Segment | None = None
        self._fd = -1
        self._written = 0                      # appends so far (a generation counter)
        self._synced = 0                       # appends covered by a completed fsync
        self._syncer_idle = False              # waiting for an append (else on its interval)
        self._sync_error: OSError | None = None
        self._acked: dict[str, int] = {}
        self._listeners: list[Callable[[], None]] = []
        self._closed = False
        self._broken = ""                      # why the spool takes no more appends
        # session -> (seq, hash, kind) of its latest event, while it has not ended;
        # written as a checkpoint at the start of each segment
        self._open_tails: dict[str, tuple[int, bytes, str]] = {}
        # session -> (seq, hash, kind) of its last event found on recovery
        self.tails: dict[str, tuple[int, bytes, str]] = {}
        self._open()
        self._syncer = threading.Thread(target=self._sync_loop, name="spool-fsync", daemon=True)
        self._syncer.start()

    # ------------------------------------------------------------------ recovery

    def _open(self) -> None:
        try:
            private_dir(self.dir)
        except OSError as exc:
            raise SpoolError(f"cannot create spool directory {self.dir}: {exc.strerror}") from None
        # One process per spool: two writers would race for segment numbers.
        self._lock_fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolError(f"spool {self.dir} is in use by another process "
                             "(a running host agent or agentgate run)") from None
        for name in sorted(os.listdir(self.dir)):
            m = SEGMENT_RE.match(name)
            if m:
                self._recover(Segment(int(m.group(1)), self.dir / name))
        self._open_tails = {k: v for k, v in self.tails.items() if v[2] != SESSION_END}
        try:
            self._rotate()
        except SpoolError as exc:
            # e.g. the disk is full: what is spooled can still be read and shipped;
            # appends retry starting a segment (and fail closed until they can).
            log.error("%s", exc)

    def _recover(self, seg: Segment) -> None:
        data = seg.path.read_bytes()
        good = 0
        for end, ev in iter_frames(data):
            good = end
            if isinstance(ev, dict):   # checkpoint: exactly these were open then
                self.tails = dict(ev)
                continue
            if ev.seq > seg.max_seq.get(ev.session_id, 0):
                seg.max_seq[ev.session_id] = ev.seq
            self.tails[ev.session_id] = (ev.seq, ev.hash, ev.kind)
        if good < len(data):
            log.warning("spool %s: cut %d bytes of a torn or damaged frame at offset %d",
                        seg.path.name, len(data) - good, good)
            with open(seg.path, "r+b") as fh:
                fh.truncate(good)
                os.fsync(fh.fileno())
        seg.size = good
        self._bytes += good
        if good == 0:
            seg.path.unlink()
            return
        self._segments[seg.number] = seg

    # ------------------------------------------------------------------ writing

    def _rotate(self) -> None:
        """Start a new active segment (lock held, or during open). The old one stays
        active until the new one exists, so a failure leaves the spool as it was."""
        number = max(self._segments, default=0) + 1
        seg = Segment(number, self.dir / f"seg-{number:012d}.log")
        try:
            if self._fd >= 0:
                os.fdatasync(self._fd)   # the old segment is complete: make it durable now
            fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                         | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SpoolError(f"cannot start spool segment {seg.path}: {exc.strerror}") from None
        try:
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)            # the new file's name is durable too
            finally:
                os.close(dfd)
        except OSError as exc:
            os.close(fd)
            seg.path.unlink(missing_ok=True)
            raise SpoolError(f"cannot start spool segment {seg.path}: {exc.strerror}") from None
        if self._open_tails:
            checkpoint = encode_checkpoint(self._open_tails)
            try:
                os.write(fd, checkpoint)
            except OSError as exc:
                os.close(fd)
                seg.path.unlink(missing_ok=True)
                raise SpoolError(f"cannot start spool segment {seg.path}: {exc.strerror}") from None
            seg.size = seg.base = len(checkpoint)
            self._bytes += seg.size
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._segments[number] = seg
        self._active = seg

    def append(self, ev: Event) -> None:
        """Persist one event; raises SpoolError/SpoolFull if it can't (fail closed)."""
        self.append_many((ev,))

    def append_many(self, events: Sequence[Event]) -> None:
        """Persist events in one write: all of them or, on error, none (the partial
        write is cut off). A batch may run a segment past segment_bytes a little."""
        frames = [encode_frame(ev) for ev in events]
        for frame in frames:
            if len(frame) > MAX_FRAME:
                raise SpoolError(f"event of {len(frame)} bytes is larger than the "
                                 f"{MAX_FRAME}-byte limit of a spool frame")
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        with self._lock:
            if self._closed:
                raise SpoolError("spool is closed")
            if self._broken:
                raise SpoolError(self._broken)
            if self._sync_error is not None:
                raise SpoolError(f"spool fsync failed: {self._sync_error.strerror}")
            used = self._bytes
            if used + len(data) > self.max_bytes:
                raise SpoolFull(f"spool full: {used} of {self.max_bytes} bytes used in {self.dir} "
                                "(is the collector reachable?)")
            if self._active is None:
                self._rotate()
            seg = self._active
            if seg.size > seg.base and seg.size + len(data) > self.segment_bytes:
                self._rotate()
                seg = self._active
            n = 0
            try:
                while n < len(data):   # a short write is retried to learn its errno
                    n += os.write(self._fd, data[n:] if n else data)
            except OSError as exc:
                # ENOSPC, EIO...: cut the partial frames so the file stays parseable.
                try:
                    os.ftruncate(self._fd, seg.size)
                except OSError as cut:
                    # Garbage would sit in front of the next frame: take no more.
                    self._broken = (f"spool segment {seg.path} is damaged (a failed write "
                                    f"could not be cut: {cut.strerror}); restart the host agent")
                raise SpoolError(f"cannot write to spool {seg.path}: {exc.strerror}") from None
            seg.size += n
            self._bytes += n
            for ev in events:
                if ev.seq > seg.max_seq.get(ev.session_id, 0):
                    seg.max_seq[ev.session_id] = ev.seq
                if ev.kind == SESSION_END:
                    self._open_tails.pop(ev.session_id, None)
                else:
                    self._open_tails[ev.session_id] = (ev.seq, ev.hash, ev.kind)
            listeners = self._listeners
            if listeners:
                self._listeners = []
        with self._sync_cond:
            self._written += 1
            gen = self._written
            if self._syncer_idle:
                # woken only from idle: while appends go on, the syncer runs on its
                # interval alone (a wake-up per append is a GIL hand-off on the hot path)
                self._sync_cond.notify_all()
        for notify in listeners:
            try:
                notify()
            except Exception:   # the events are written: a dead listener must not undo that
                log.exception("spool listener failed")
        if self.strict:
            self.wait_durable(gen)

    def wait_durable(self, gen: int | None = None, timeout: float | None = None) -> bool:
        """Block until appends up to `gen` (default: all so far) are fsynced."""
        with self._sync_cond:
            gen = self._written if gen is None else gen
            ok = self._sync_cond.wait_for(
                lambda: self._synced >= gen or self._sync_error is not None or self._closed,
                timeout)
            if self._sync_error is not None:
                raise SpoolError(f"spool fsync failed: {self._sync_error.strerror}")
            return ok and self._synced >= gen

    def _sync_loop(self) -> None:
        last = 0.0
        while True:
            with self._sync_cond:
                self._syncer_idle = True
                self._sync_cond.wait_for(lambda: self._written > self._synced or self._closed)
                self._syncer_idle = False
                if self._closed and self._written == self._synced:
                    return
            # Strict callers are waiting right now: sync at once (they batch up behind us).
            delay = 0.0 if self.strict else last + self.fsync_interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            with self._sync_cond:
                target = self._written
            # Sync a duplicate so appends never wait for the disk: a rotation may close
            # the original meanwhile, and it fdatasyncs the old segment itself.
            err = None
            try:
                with self._lock:
                    fd = os.dup(self._fd)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                err = exc
            last = time.monotonic()
            with self._sync_cond:
                if err is not None:
                    log.error("spool fsync failed: %s", err)
                    self._sync_error = err
                else:
                    self._synced = max(self._synced, target)
                self._sync_cond.notify_all()
                if err is not None:
                    return

    # ------------------------------------------------------------------ reading (shipper)

    def add_listener(self, notify: Callable[[], None]) -> None:
        """Call `notify()` once, after the next append (from the appending thread)."""
        with self._lock:
            self._listeners.append(notify)

    def start(self) -> Position:
        with self._lock:
            return Position(min(self._segments, default=1), 0)

    def read(self, pos: Position, max_events: int = 1000,
             max_bytes: int = 4 << 20) -> tuple[list[Event], Position]:
        """Events from `pos` on (complete frames only), and the position after them."""
        while True:   # a read may pass only a checkpoint: go on until events or the end
            events, new = self._read(pos, max_events, max_bytes)
            if events or new == pos:
                return events, new
            pos = new

    def _segments_from(self, pos: Position):
        """The segments from `pos` on (numbers, sizes, paths as now), and `pos` moved to
        the first of them if its own was deleted under us."""
        with self._lock:
            numbers = sorted(n for n in self._segments if n >= pos.segment)
            sizes = {n: self._segments[n].size for n in numbers}
            paths = {n: self._segments[n].path for n in numbers}
        if pos.segment not in sizes and numbers:
            pos = Position(numbers[0], 0)
        return numbers, sizes, paths, pos

    def _read(self, pos: Position, max_events: int, max_bytes: int):
        numbers, sizes, paths, pos = self._segments_from(pos)
        if not numbers:
            return [], pos
        events: list[Event] = []
        budget = max_bytes
        for n in numbers:
            if n < pos.segment:
                continue
            offset = pos.offset if n == pos.segment else 0
            remaining = sizes[n] - offset
            if remaining <= 0:
                continue
            if budget <= 0:
                return events, pos
            want = min(remaining, budget)
            while True:
                with open(paths[n], "rb") as fh:
                    fh.seek(offset)
                    data = fh.read(want)
                done = offset
                for end, ev in iter_frames(data):
                    done = offset + end
                    if isinstance(ev, dict):
                        continue
                    events.append(ev)
                    if len(events) >= max_events:
                        return events, Position(n, done)
                if done > offset or want == remaining:
                    break
                if events:            # the next frame is bigger than what is left of
                    return events, pos  # the budget: it starts the next read
                want = remaining      # a frame bigger than the whole budget: read it alone
            pos = Position(n, done)
            if done == offset:
                raise SpoolError(f"damaged frame in spool segment {paths[n]} at offset {offset}")
            if done < sizes[n]:
                return events, pos    # the budget ended inside this segment
            budget -= want
        return events, pos

    def read_frames(self, pos: Position, max_bytes: int = 4 << 20,
                    max_frames: int | None = None) -> tuple[bytes, int, Position]:
        """Whole frames from `pos` on, as they lie in the segments (events and
        checkpoints; for the shipper, which does not decode them), how many, and the
        position after them. At least one frame, however big, once there is one."""
        numbers, sizes, paths, pos = self._segments_from(pos)
        if not numbers:
            return b"", 0, pos
        chunks, count, budget = [], 0, max_bytes
        for n in numbers:
            offset = pos.offset if n == pos.segment else 0
            remaining = sizes[n] - offset
            if n < pos.segment or remaining <= 0:
                continue
            if budget <= 0:
                break
            with open(paths[n], "rb") as fh:
                fh.seek(offset)
                data = fh.read(min(remaining, budget))
                left = None if max_frames is None else max_frames - count
                end, k = frame_ends(data, count=left)
                if k == 0 and not chunks and len(data) >= HEADER.size:
                    # one frame bigger than the whole budget: it alone
                    whole = HEADER.size + HEADER.unpack_from(data, 0)[0]
                    data += fh.read(max(0, min(whole, remaining) - len(data)))
                    end, k = frame_ends(data)
            if k == 0:
                if chunks:
                    break                  # the next frame starts the next read
                raise SpoolError(f"damaged frame in spool segment {paths[n]} at offset {offset}")
            chunks.append(data[:end])
            count += k
            budget -= end
            pos = Position(n, offset + end)
            if offset + end < sizes[n] or (max_frames is not None and count >= max_frames):
                break                      # the budget ended inside this segment
        return b"".join(chunks), count, pos

    def acked(self, session_id: str) -> int:
        return self._acked.get(session_id, 0)

    def ack(self, session_id: str, seq: int) -> None:
        if seq > self._acked.get(session_id, 0):
            self._acked[session_id] = seq

    def release(self) -> int:
        """Delete segments whose every event is acked. Returns how many were deleted."""
        removed = []
        with self._lock:
            for number, seg in sorted(self._segments.items()):
                if seg is self._active:
                    break
                if all(self._acked.get(s, 0) >= m for s, m in seg.max_seq.items()):
                    removed.append(seg)
                    del self._segments[number]
                    self._bytes -= seg.size
            if removed:
                live = set()
                for seg in self._segments.values():
                    live.update(seg.max_seq)
                self._acked = {s: q for s, q in self._acked.items() if s in live}
        for seg in removed:
            try:
                seg.path.unlink()
            except OSError as exc:
                log.error("cannot delete acked spool segment %s: %s", seg.path, exc)
        return len(removed)

    def rotate_if_acked(self) -> None:
        """Retire a fully acked active segment so release() can delete it."""
        with self._lock:
            seg = self._active
            if seg is not None and (seg.size > seg.base
                    and all(self._acked.get(s, 0) >= m for s, m in seg.max_seq.items())):
                self._rotate()

    # ------------------------------------------------------------------ status

    def bytes_used(self) -> int:
        return self._bytes

    def segment_count(self) -> int:
        return len(self._segments)

    def unacked_events_estimate(self) -> int:
        with self._lock:
            top: dict[str, int] = {}
            for seg in self._segments.values():
                for s, m in seg.max_seq.items():
                    top[s] = max(top.get(s, 0), m)
        return sum(max(0, m - self._acked.get(s, 0)) for s, m in top.items())

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with self._sync_cond:
            self._sync_cond.notify_all()
        self._syncer.join()
        with self._lock:
            try:
                if self._fd >= 0:
                    os.fdatasync(self._fd)
            except OSError as exc:
                log.error("spool fsync at close failed: %s", exc)
            finally:
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
                os.close(self._lock_fd)
