from __future__ import annotations

import asyncio

import grpc

from agentgate.events import SESSION_START, unpack_payload
from agentgate.wire import event_from_pb, pb, rpc
from collector.hub import Hub, SessionMeta
from collector.services import run
from collector.storage import NotFound, Storage

HASH_LEN = 32


class IngestServicer(rpc.IngestServicer):
    def __init__(self, store: Storage, hub: Hub):
        self.store = store
        self.hub = hub
        self._meta: dict[str, SessionMeta] = {}

    async def Stream(self, request_iterator, context):
        async for batch in request_iterator:
            events = [event_from_pb(m) for m in batch.events]
            for ev in events:
                if (not ev.session_id or ev.seq < 1 or len(ev.hash) != HASH_LEN
                        or len(ev.prev_hash) != HASH_LEN):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"malformed event {ev.session_id!r} seq {ev.seq}")
            acks, fresh = await run(context, self.store.ingest, events)
            if fresh and self.hub.events.watched:
                await self._publish(fresh)
            yield pb.IngestAck(batch_id=batch.batch_id, sessions=[
                pb.SessionAck(session_id=sid, committed_seq=seq) for sid, seq in acks.items()])

    async def _publish(self, fresh) -> None:
        if len(self._meta) > 50_000:
            self._meta.clear()
        for ev in fresh:
            meta = self._meta.get(ev.session_id)
            if meta is None:
                meta = await self._lookup(ev)
            self.hub.events.publish((ev, meta))

    async def _lookup(self, ev) -> SessionMeta:
        if ev.kind == SESSION_START:
            start = unpack_payload(ev.payload)
            meta = SessionMeta(str(start.get("host", "")), str(start.get("target", "")),
                               str(start.get("protocol", "")))
        else:
            try:
                row = await asyncio.to_thread(self.store.get_session, ev.session_id)
                meta = SessionMeta(row.host, row.target, row.protocol)
            except NotFound:
                meta = SessionMeta()
        self._meta[ev.session_id] = meta
        return meta
