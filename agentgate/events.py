"""Recording events and their per-session SHA-256 hash chain.

An event's hash covers every field but itself, including the previous event's
hash, so removing, reordering or editing any stored event breaks the chain at
that point. The encoding hashed is msgpack of a fixed-order list: msgpack is
deterministic for these types, and any language can recompute it.
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field
from typing import Iterable

import msgpack

GENESIS = bytes(32)
# a spool frame's header: u32 length, u32 crc32 of the body (agentgate/frames.py)
FRAME_HEADER = struct.Struct("<II")


def spool_frame(body: bytes) -> bytes:
    """`body` framed as the spool stores it and the shipper sends it."""
    return FRAME_HEADER.pack(len(body), zlib.crc32(body)) + body

# Every kind a recording can hold, and its fields: the one list producers (the proxy,
# each protocol, run sessions) and readers (collector, replay, export) share. A test
# holds the producers to it; the README lists it.
SESSION_START = "session_start"
COMMAND = "command"
DECISION = "decision"
APPROVAL = "approval"
OUTPUT = "output"
DATA = "data"
SESSION_END = "session_end"

EVENT_KINDS: dict[str, tuple[str, str]] = {
    # kind: (who records it, its fields)
    SESSION_START: ("all", "host, target, protocol, destination, process (the kernel's "
                    "identity), agent, session_group, mode, layer, via; an SSH channel's "
                    "session: parent (its connection's session), channel (exec|shell|"
                    "subsystem|forward), remote_user, command, subsystem, forward, "
                    "destination, origin"),
    COMMAND: ("protocols", "text, decision (action allow|deny|review, rule, reason, would "
              "in audit mode), plus the protocol's: kinds, tables, functions, flags, "
              "database, statement, protocol (postgres; mysql: query, prepare, COM_INIT_DB, "
              "COM_FIELD_LIST), text_chars (a text cut for the record); method, host, path, query, "
              "http_version, headers (credentials redacted), body, body_bytes (http); kind "
              "(login|exec|shell|line|subsystem|sftp|forward), remote_user, commands, "
              "flags, via (stdin|terminal), term, cols, rows, modes, operation, paths, "
              "writes, forward, destination (ssh)"),
    DECISION: ("protocols", "a verdict no command's own (masking refusing what would carry "
               "masked values elsewhere): action, rule, reason, would"),
    APPROVAL: ("proxy", "id, state (pending|approved|denied|expired|unavailable|cancelled), rule, "
               "expires_ns, decided_by, reason, error"),
    OUTPUT: ("protocols", "summary, rows_returned, rows_affected, duration_us, columns, "
             "sample, sample_capped, masked, sqlstate, error; code, warnings, statement, params "
             "(mysql); status, headers, bytes (http); "
             "exit_status, exit_signal, bytes_in, bytes_out; kind file: path, mode, "
             "bytes_read, bytes_written, status (ssh)"),
    DATA: ("tcp, kubernetes, ssh", "dir (in|out), data (bytes); stream (stdin, stdout, stderr, "
           "close: kubernetes)"),
    "resize": ("kubernetes, ssh", "cols, rows (a terminal's size changed)"),
    "signal": ("ssh", "signal (sent by the agent to the remote command)"),
    SESSION_END: ("all", "reason, bytes_in, bytes_out; runs: exit_code, "
                  "refused_connections, incomplete, lost_events, events_suppressed"),
    "tls": ("protocols", "side (client|upstream), version, sni, alpn, verified (upstream), "
            "error"),
    "startup": ("postgres, mysql", "user, database, upstream_user, application_name, "
                "credentials, refused, dropped_params, client_tls; plugin, server_version, "
                "program, change_user (mysql)"),
    "bind": ("postgres, mysql", "statement, portal, params (each cut at 1 KiB), formats; "
             "text (mysql: the prepared statement's)"),
    "kill": ("mysql", "thread (the stand-in id the agent named), matched, query"),
    "local_file": ("mysql", "path (the file the server asked the agent for), decision; "
                   "bytes, sent (once sent)"),
    "cancel": ("postgres", "matched, forwarded"),
    "auth": ("postgres, mysql, ssh", "method (scram-sha-256[-plus], md5, cleartext, none; "
             "mysql_native_password, caching_sha2_password, client_ed25519...; publickey, "
             "password), channel_binding, server_verified (certificate, scram, known_hosts...); "
             "path (scramble, fast, rsa, cleartext), switched, server_key (pinned, requested): "
             "mysql; remote_user, asked_user, server_key, refused (ssh)"),
    "catalog": ("postgres", "error, masking (the catalog could not be read: every result "
                "column is masked)"),
    "exec": ("run", "pid, uid, comm, filename"),
    "exit": ("run", "pid, uid, comm"),
    "connect_denied": ("run", "pid, uid, comm, address"),
    "connect_direct": ("run", "pid, uid, comm, address"),
    "udp_denied": ("run", "pid, uid, comm, address"),
    "socket_denied": ("run", "pid, uid, comm"),
    "bind_denied": ("run", "pid, uid, comm, address"),
    "exec_outside": ("run", "pid, uid, comm, filename"),
    "events_suppressed": ("run", "count"),
    "unix_denied": ("run", "pid, uid, comm, address (the unix address as given: a path, "
                    "or @name for an abstract one)"),
    "unix_guard": ("run", "connect (the BPF hooks), hidden (sockets covered), allowed, "
                   "abstract, gap"),
}
KINDS = tuple(EVENT_KINDS)


@dataclass(frozen=True, slots=True)
class Event:
    session_id: str
    seq: int
    wall_time_ns: int
    mono_ns: int
    kind: str
    payload: bytes  # msgpack map
    prev_hash: bytes
    hash: bytes
    # the spool frame (header, then the msgpack of as_tuple()), when make_event made it
    frame: bytes | None = field(default=None, compare=False, repr=False)

    def as_tuple(self) -> tuple:
        return (self.session_id, self.seq, self.wall_time_ns, self.mono_ns,
                self.kind, self.payload, self.prev_hash, self.hash)

    def fields(self) -> dict:
        """The payload decoded (bytes inside it stay bytes)."""
        return unpack_payload(self.payload)


def chain_hash(session_id: str, seq: int, wall_time_ns: int, mono_ns: int,
               kind: str, payload: bytes, prev_hash: bytes) -> bytes:
    body = msgpack.packb([session_id, seq, wall_time_ns, mono_ns, kind, payload, prev_hash],
                         use_bin_type=True)
    return hashlib.sha256(body).digest()


def make_event(session_id: str, seq: int, wall_time_ns: int, mono_ns: int, kind: str,
               payload: bytes, prev_hash: bytes) -> Event:
    chained = msgpack.packb([session_id, seq, wall_time_ns, mono_ns, kind, payload, prev_hash],
                            use_bin_type=True)
    digest = hashlib.sha256(chained).digest()
    # the stored form is the same array with the hash after it: an 8-array header, the
    # 7 packed items, the hash as bin 8 (packed once, not twice), framed for the spool
    return Event(session_id, seq, wall_time_ns, mono_ns, kind, payload, prev_hash, digest,
                 spool_frame(b"\x98" + chained[1:] + b"\xc4\x20" + digest))


def pack_payload(fields: dict) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def unpack_payload(payload: bytes) -> dict:
    if not payload:
        return {}
    value = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    return value if isinstance(value, dict) else {"value": value}


@dataclass(frozen=True, slots=True)
class ChainReport:
    ok: bool
    count: int
    head: bytes          # hash of the last event that verified
    broken_seq: int = 0  # first seq at which verification failed
    problem: str = ""


def verify_chain(events: Iterable[Event]) -> ChainReport:
    """Check seq runs 1..n without gaps, each hash is right and links to the previous one."""
    prev = GENESIS
    count = 0
    for ev in events:
        expected_seq = count + 1
        if ev.seq != expected_seq:
            what = "missing" if ev.seq > expected_seq else "duplicate or out of order"
            return ChainReport(False, count, prev, expected_seq,
                               f"seq {expected_seq} {what} (found seq {ev.seq})")
        if ev.prev_hash != prev:
            return ChainReport(False, count, prev, ev.seq,
                               f"seq {ev.seq} does not link to seq {ev.seq - 1} (previous hash differs)")
        actual = chain_hash(ev.session_id, ev.seq, ev.wall_time_ns, ev.mono_ns, ev.kind,
                            ev.payload, ev.prev_hash)
        if actual != ev.hash:
            return ChainReport(False, count, prev, ev.seq,
                               f"seq {ev.seq} was altered (its content does not match its hash)")
        prev = ev.hash
        count += 1
    return ChainReport(True, count, prev)
