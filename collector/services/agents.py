from __future__ import annotations

import time

import grpc

from agentgate.wire import pb, rpc
from collector.auth import current_principal
from collector.services import run
from collector.storage import AgentRow, Storage


class AgentsServicer(rpc.AgentsServicer):
    def __init__(self, store: Storage, heartbeat_s: int):
        self.store = store
        self.heartbeat_s = heartbeat_s

    async def Register(self, request, context):
        if not request.host:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "register needs a host name")
        now = time.time_ns()
        row = AgentRow(agent_id=request.agent_id, host=request.host, version=request.version,
                       capabilities=tuple(request.capabilities), registered_ns=now,
                       last_seen_ns=now, principal=current_principal().name)
        row = await run(context, self.store.register_agent, row)
        return pb.RegisterResponse(agent_id=row.agent_id, heartbeat_seconds=self.heartbeat_s)

    async def Heartbeat(self, request, context):
        await run(context, self.store.heartbeat_agent, request.agent_id, request.spool_bytes,
                  request.unacked_events, time.time_ns(), request.lost_kernel_events)
        return pb.HeartbeatResponse()

    async def List(self, request, context):
        rows = await run(context, self.store.list_agents)
        return pb.ListAgentsResponse(agents=[
            pb.Agent(agent_id=r.agent_id, host=r.host, version=r.version,
                     capabilities=list(r.capabilities), registered_ns=r.registered_ns,
                     last_seen_ns=r.last_seen_ns, spool_bytes=r.spool_bytes,
                     unacked_events=r.unacked_events, principal=r.principal,
                     lost_kernel_events=r.lost_kernel_events)
            for r in rows])
