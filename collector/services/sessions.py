from __future__ import annotations

import grpc

from agentgate.events import SESSION_END
from agentgate.wire import as_pb, pb, rpc
from collector.hub import Hub, Overflow
from collector.services import run, session_pb
from collector.storage import SessionFilter, Storage

PAGE = 2000


class SessionsServicer(rpc.SessionsServicer):
    def __init__(self, store: Storage, hub: Hub):
        self.store = store
        self.hub = hub

    async def List(self, request, context):
        flt = SessionFilter(host=request.host, agent=request.agent, target=request.target,
                            protocol=request.protocol, since_ns=request.since_ns,
                            until_ns=request.until_ns, text=request.text,
                            limit=min(request.limit or 100, 10_000))
        rows = await run(context, self.store.list_sessions, flt)
        return pb.ListSessionsResponse(sessions=[session_pb(r) for r in rows])

    async def Get(self, request, context):
        return session_pb(await run(context, self.store.get_session, request.id))

    async def StreamEvents(self, request, context):
        await run(context, self.store.get_session, request.session_id)  # NOT_FOUND early
        last = request.after_seq
        while True:
            # Subscribe before reading so nothing committed meanwhile falls in between.
            with self.hub.events.subscribe() as sub:
                ended = False
                while True:
                    page = await run(context, self.store.events, request.session_id, last, PAGE)
                    for ev in page:
                        if request.follow and ev.seq != last + 1:
                            break   # past a gap: those come again once it is filled
                        yield as_pb(ev)
                        last = ev.seq
                        ended = ended or ev.kind == SESSION_END
                    else:
                        if len(page) == PAGE:
                            continue
                    break
                if not request.follow or ended:
                    return
                try:
                    while True:
                        ev, _meta = await sub.get()
                        if ev.session_id != request.session_id or ev.seq <= last:
                            continue
                        if ev.seq != last + 1:
                            break   # missed some (cannot happen: new events are contiguous)
                        yield as_pb(ev)
                        last = ev.seq
                        if ev.kind == SESSION_END:
                            return
                except Overflow:
                    pass
            # fell behind the live stream: catch up from storage and subscribe again

    async def Tail(self, request, context):
        with self.hub.events.subscribe() as sub:
            while True:
                try:
                    ev, meta = await sub.get()
                except Overflow:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        "tail fell behind the event rate and was cut off")
                if ((request.host and meta.host != request.host)
                        or (request.target and meta.target != request.target)
                        or (request.protocol and meta.protocol != request.protocol)):
                    continue
                yield pb.TailEvent(event=as_pb(ev), host=meta.host, target=meta.target,
                                   protocol=meta.protocol)
