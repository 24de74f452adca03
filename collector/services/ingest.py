from __future__ import annotations

import asyncio

import grpc

from agentgate.events import SESSION_START, unpack_payload
from agentgate.frames import iter_frames
from agentgate.wire import pb, rpc
from collector.auth import current_principal
from collector.hub import Hub, SessionMeta
from collector.services import run
from collector.storage import NotFound, Storage

HASH_LEN = 32


def decode_frames(data: bytes) -> list:
    """Spool frames (agentgate/frames.py) as events; checkpoints skipped. ValueError if
    any is torn or damaged: nothing of such a batch is stored."""
    events, end = [], 0
    for end, ev in iter_frames(data):
        if not isinstance(ev, dict):
            events.append(ev)
    if end != len(data):
        raise ValueError(f"a damaged frame at byte {end} of a batch of {len(data)}")
    return events


class IngestServicer(rpc.IngestServicer):
    def __init__(self, store: Storage, hub: Hub):
        self.store = store
        self.hub = hub
        self._meta: dict[str, SessionMeta] = {}

    async def Stream(self, request_iterator, context):
        # Batch N+1 is received and decoded while batch N commits (sqlite releases the
        # GIL); commits stay in order, and each batch is acked as soon as it is durable.
        writes: asyncio.Queue = asyncio.Queue(maxsize=2)
        owner = current_principal().name

        async def receive():
            try:
                await receive_batches()
            except BaseException as exc:   # a broken request stream ends the response too
                await writes.put(exc)
                raise

        async def receive_batches():
            previous = None
            async for batch in request_iterator:
                # The storage takes the wire messages as they are (same field names as
                # agentgate.events.Event): converting 100k events/s would cost a tenth.
                events = list(batch.events)
                if batch.frames:
                    try:
                        events += decode_frames(batch.frames)
                    except ValueError as exc:
                        await writes.put(exc)
                        return
                bad = next((e for e in events if not e.session_id or e.seq < 1
                            or len(e.hash) != HASH_LEN or len(e.prev_hash) != HASH_LEN), None)
                if bad is not None:
                    await writes.put(ValueError(f"malformed event {bad.session_id!r} seq {bad.seq}"))
                    return
                previous = asyncio.ensure_future(self._write(context, previous, events, owner))
                await writes.put((batch.batch_id, previous))
            await writes.put(None)

        receiver = asyncio.ensure_future(receive())
        try:
            while (item := await writes.get()) is not None:
                if isinstance(item, ValueError):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(item))
                if isinstance(item, BaseException):
                    raise item
                batch_id, write = item
                acks, fresh = await write
                if fresh and self.hub.events.watched:
                    await self._publish(fresh)
                yield pb.IngestAck(batch_id=batch_id, sessions=[
                    pb.SessionAck(session_id=sid, committed_seq=seq) for sid, seq in acks.items()])
            await receiver   # surfaces a broken request stream
        finally:
            receiver.cancel()

    async def _write(self, context, previous: asyncio.Future | None, events, owner: str):
        if previous is not None:
            await asyncio.shield(previous)
        return await run(context, self.store.ingest, events, owner)

    async def _publish(self, fresh) -> None:
        if len(self._meta) > 50_000:
            self._meta.clear()
        for ev in fresh:
            meta = self._meta.get(ev.session_id)
            if meta is None or (not meta.host and ev.kind == SESSION_START):
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
                return SessionMeta()
        if meta.host or meta.target:   # don't remember "unknown": the start may come later
            self._meta[ev.session_id] = meta
        return meta
