"""Register with the collector and keep heartbeating (spool backlog included)."""
from __future__ import annotations

import asyncio
import logging

import grpc

from agentgate import __version__
from agentgate.client import CollectorAddress, open_aio_channel
from agentgate.wire import pb, rpc
from hostagent.config import read_agent_id, write_agent_id
from hostagent.recording.spool import Spool

log = logging.getLogger("agentgate.hostagent")
CAPABILITIES = ("recording",)


async def heartbeat_loop(address: CollectorAddress, host: str, state_dir: str, spool: Spool,
                         capabilities=CAPABILITIES, retry: float = 5.0,
                         lost_events=lambda: 0) -> None:
    agent_id = read_agent_id(state_dir)
    md = address.metadata()
    while True:
        channel = open_aio_channel(address)
        try:
            stub = rpc.AgentsStub(channel)
            resp = await stub.Register(pb.RegisterRequest(
                host=host, version=__version__, capabilities=list(capabilities),
                agent_id=agent_id), metadata=md, timeout=10)
            if resp.agent_id != agent_id:
                agent_id = resp.agent_id
                write_agent_id(state_dir, agent_id)
            log.info("registered with collector %s as %s", address.target, agent_id)
            while True:
                await asyncio.sleep(resp.heartbeat_seconds or 15)
                await stub.Heartbeat(pb.HeartbeatRequest(
                    agent_id=agent_id, spool_bytes=spool.bytes_used(),
                    unacked_events=spool.unacked_events_estimate(),
                    lost_kernel_events=lost_events()), metadata=md, timeout=10)
        except grpc.aio.AioRpcError as exc:
            log.debug("registration/heartbeat: %s: %s", exc.code().name, exc.details())
        finally:
            await channel.close()
        await asyncio.sleep(retry)
