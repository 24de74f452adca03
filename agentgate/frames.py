"""The spool's frames, as stored and as shipped: u32 length | u32 crc32(body) | body,
body = msgpack [session_id, seq, wall_ns, mono_ns, kind, payload, prev_hash, hash] (an
event) or a map (a checkpoint: the sessions open when a segment began). The host agent
ships frames as they lie in its spool; the collector decodes them."""
from __future__ import annotations

import zlib

import msgpack

from agentgate.events import FRAME_HEADER as HEADER
from agentgate.events import Event, spool_frame

MAX_FRAME = 32 << 20   # below the 64 MiB gRPC message cap, so any frame can ship


def encode_frame(ev: Event) -> bytes:
    if ev.frame is not None:
        return ev.frame
    return spool_frame(msgpack.packb(ev.as_tuple(), use_bin_type=True))


def decode_body(body: bytes) -> "Event | dict":
    """An Event, or a checkpoint: {session id: [seq, hash, kind]} of the sessions open
    when the segment began (so a restart knows them even after older files are gone)."""
    value = msgpack.unpackb(body, raw=False)
    if isinstance(value, dict):
        return {k: tuple(v) for k, v in value.items()}
    return Event(*value)


def encode_checkpoint(open_tails: dict) -> bytes:
    return spool_frame(msgpack.packb({k: list(v) for k, v in open_tails.items()},
                                     use_bin_type=True))


def iter_frames(data: bytes, start: int = 0):
    """Yields (end_offset, Event or checkpoint) for each complete, intact frame; stops at
    the first bad one."""
    pos, end = start, len(data)
    while pos + HEADER.size <= end:
        length, crc = HEADER.unpack_from(data, pos)
        stop = pos + HEADER.size + length
        if length > MAX_FRAME or stop > end:
            return
        body = data[pos + HEADER.size:stop]
        if zlib.crc32(body) != crc:
            return
        try:
            ev = decode_body(body)
        except (ValueError, TypeError, msgpack.UnpackException):
            return
        pos = stop
        yield pos, ev


def frame_ends(data: bytes, start: int = 0, limit: int | None = None,
               count: int | None = None) -> tuple[int, int]:
    """(end of the last whole frame from `start` within `limit` bytes and `count` frames,
    how many frames): headers walked, bodies not decoded (what a writer stored whole is
    whole)."""
    pos, end, n = start, len(data) if limit is None else min(len(data), start + limit), 0
    while pos + HEADER.size <= end and (count is None or n < count):
        length = HEADER.unpack_from(data, pos)[0]
        stop = pos + HEADER.size + length
        if length > MAX_FRAME or stop > end:
            break
        pos, n = stop, n + 1
    return pos, n
