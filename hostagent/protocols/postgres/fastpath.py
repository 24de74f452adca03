"""The PostgreSQL layer's steady state, walked by frame headers: a mixin of PostgresLayer.

Once a session is ready, nearly every message is one the layer passes on unchanged
(Bind, Execute, Sync; ParseComplete, DataRow, CommandComplete, ReadyForQuery). Here
they are read where they lie in what arrived, without an object per message, and
forwarded as runs of the very bytes read; what the layer must judge, rewrite or
watch closely (Query, Parse, a function call; errors, notices, parameter changes,
keys, authentication) goes through the general path one message at a time, in
order. Only while nothing needs every message looked at: no masking, no hold, no
catalog read under way, no partial message waiting in a reader.

The commands are those of the general path, merged: the records of one arrival come
first, then its bytes in one piece per side. A Record is in the spool before any byte
of the same turn leaves (the driver's turn), so this is what the general path does.
tests/hostagent/protocols/postgres/test_fastpath.py holds the two paths to identical
results on any input. (Each walk spells out its header loop: a generator of frames would
cost more per message than the rest of the loop.)
"""
from __future__ import annotations

import struct

from agentgate.events import OUTPUT
from hostagent.protocols.api import Close, Command, Record, ToClient, ToUpstream
from hostagent.protocols.postgres import messages as m
from hostagent.protocols.postgres.walk import skip_frames

_LEN = struct.Struct("!i").unpack_from
# client messages passed on as they are: Execute, Sync, Flush, Describe, Close,
# CopyData/Done/Fail, Terminate ... (Bind too, with a record first)
_CLIENT_SLOW = frozenset(b"QPF")
# server messages the general path must see: errors, notices, parameters, keys,
# authentication, notifications, and anything unknown
_SERVER_FAST = frozenset(b"123ntDCTZsIcdHGW")


class FastPath:
    lean = True   # tests turn it off to compare with the general path

    def _client_fast(self, data: bytes) -> list[Command] | None:
        """The commands for `data`, or None when the general path must take it all."""
        if not (self.lean and self.state == "ready" and self._results is None
                and not self.enforcer.holding and not self.client.expect_untyped):
            return None
        data = self.client.take(data)
        if data is None:
            return []                  # more of a message still arriving
        out: list[Command] = []
        records: list[Command] = []
        starts: list[int] = []
        pos = run = 0
        end = len(data)
        cap = self.client.max_message
        outputs = self.outputs
        while pos + 5 <= end:
            kind = data[pos]
            length = _LEN(data, pos + 1)[0]
            if length < 4 or length > cap:
                break                  # the general path raises the error
            nxt = pos + 1 + length
            if nxt > end:
                break                  # a partial message: the reader keeps it
            if kind == 69:             # E
                starts += outputs.sent_execute()
            elif kind == 83:           # S
                outputs.sent_sync()
            elif kind == 66:           # B
                records.append(Record("bind", m.bind_fields(data, pos + 5, nxt)))
            elif kind in _CLIENT_SLOW:
                if run < pos:
                    out += records
                    out.append(ToUpstream(data[run:pos], tuple(starts)))
                    records, starts = [], []
                out += self._from_client(bytes((kind,)), data[pos + 5:nxt])
                pos = run = nxt
                if self.enforcer.holding or self.state != "ready" or (
                        out and type(out[-1]) not in (Record, ToUpstream, ToClient)):
                    break              # the rest is the general path's (deferred...)
                continue
            pos = nxt
        if run < pos:
            out += records
            out.append(ToUpstream(data if run == 0 and pos == end else data[run:pos],
                                  tuple(starts)))
        if pos < end:
            out += self._client_frames(self.client.receive_data(data[pos:] if pos else data))
        return out

    def _upstream_fast(self, data: bytes) -> list[Command] | None:
        if not (self.lean and self.state == "ready" and self._stalled is None):
            return None
        if self._results is not None:
            return self._upstream_masked(data)
        data = self.upstream.take(data)
        if data is None:
            return []
        out: list[Command] = []
        records: list[Command] = []
        pos = run = 0
        end = len(data)
        cap = self.upstream.max_message
        outputs = self.outputs
        sampled = outputs.limits.rows   # (wants_sample() is false from this row on)
        while pos + 5 <= end:
            kind = data[pos]
            length = _LEN(data, pos + 1)[0]
            if length < 4 or length > cap:
                break
            nxt = pos + 1 + length
            if nxt > end:
                break
            if kind not in _SERVER_FAST:
                if run < pos:
                    out += records
                    out.append(ToClient(data[run:pos]))
                    records = []
                out += self._from_upstream(bytes((kind,)), data[pos + 5:nxt])
                pos = run = nxt
                if out and type(out[-1]) not in (Record, ToClient) or self.state != "ready":
                    break
                continue
            if kind == 68:             # D
                if outputs.rows < sampled and outputs.wants_sample():
                    outputs.row(m.parse_data_row(data[pos + 5:nxt]))
                else:
                    # past the sample, a run of rows is only counted
                    pos, rows = skip_frames(data, nxt, end, cap, 68)
                    outputs.rows += rows + 1
                    continue
            elif kind == 100:          # d: COPY data, passed on as it is
                pos = skip_frames(data, nxt, end, cap, 100)[0]
                continue
            elif kind == 67:           # C
                sid, fields = outputs.complete(data[pos + 5:nxt].rstrip(b"\0")
                                               .decode(errors="replace"))
                records.append(Record(OUTPUT, fields, stop=sid))
            elif kind == 90:           # Z
                self._ready_for_query(data[pos + 5:nxt])
            elif kind == 84:           # T
                self._described(data[pos + 5:nxt])
            elif kind == 73:           # I
                sid, fields = outputs.empty()
                records.append(Record(OUTPUT, fields, stop=sid))
            elif kind == 115:          # s
                sid, fields = outputs.suspended()
                records.append(Record(OUTPUT, fields, stop=sid))
            pos = nxt
        if run < pos:
            out += records
            out.append(ToClient(data if run == 0 and pos == end else data[run:pos]))
        if pos < end and not (out and type(out[-1]) is Close):   # (after a Close: nothing)
            out += self._upstream_frames(self.upstream.receive_data(data[pos:] if pos else data))
        return out

    def _upstream_masked(self, data: bytes) -> list[Command]:
        """A masked session's answers: each row rewritten where it lies (masks.py),
        every other message through the general path, in order."""
        data = self.upstream.take(data)
        if data is None:
            return []
        out: list[Command] = []
        pieces: list[bytes] = []
        pos = 0
        end = len(data)
        cap = self.upstream.max_message
        outputs = self.outputs
        sampled = outputs.limits.rows
        while pos + 5 <= end:
            kind = data[pos]
            length = _LEN(data, pos + 1)[0]
            if length < 4 or length > cap:
                break
            nxt = pos + 1 + length
            if nxt > end:
                break
            if kind == 68:             # D
                if not (outputs.rows < sampled and outputs.wants_sample()):
                    # past the sample: a run of rows at a time
                    pos, count, rows = self._mask_run(data, pos, end, cap)
                    if count:
                        pieces.append(rows)
                        outputs.rows += count
                        continue
                values = self._mask_row(data[pos + 5:nxt])
                outputs.row(values if outputs.wants_sample() else None)
                pieces.append(m.data_row(values))
                pos = nxt
                continue
            if pieces:
                out.append(ToClient(b"".join(pieces)))
                pieces = []
            out += self._upstream_frames([(bytes((kind,)), data[pos + 5:nxt])])
            pos = nxt
            if self._stalled is not None or self.state != "ready" or (
                    out and type(out[-1]) not in (Record, ToClient)):
                break
        if pieces:
            out.append(ToClient(b"".join(pieces)))
        if pos < end and not (out and type(out[-1]) is Close):   # (after a Close: nothing)
            out += self._upstream_frames(self.upstream.receive_data(data[pos:] if pos else data))
        return out
