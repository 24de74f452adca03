"""Asking the collector for just-in-time approval, and waiting for the answer."""
from __future__ import annotations

import datetime as dt

import grpc

from agentgate.client import CollectorAddress, open_aio_channel
from agentgate.wire import pb, rpc, state_name


class Approver:
    def __init__(self, address: CollectorAddress, ttl_seconds: int = 0):
        self.address = address
        self.ttl = ttl_seconds
        self._channel = None

    def _stub(self):
        if self._channel is None:
            self._channel = open_aio_channel(self.address)
        return rpc.ApprovalsStub(self._channel)

    async def ask(self, **fields) -> "pb.Approval":
        return await self._stub().Create(pb.CreateApprovalRequest(ttl_seconds=self.ttl, **fields),
                                         metadata=self.address.metadata(), timeout=10)

    async def wait(self, approval_id: str) -> tuple[str, str, str]:
        """(state, decided_by, reason) once the request is final."""
        last = None
        async for a in self._stub().Watch(pb.ApprovalRef(id=approval_id),
                                          metadata=self.address.metadata()):
            last = a
        if last is None or last.state == pb.PENDING:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None,
                                       "the approval watch ended before a decision")
        return state_name(last.state), last.decided_by, last.decision_reason

    async def cancel(self, approval_id: str) -> None:
        """Withdraw a request nobody needs decided any more (what asked went away)."""
        await self._stub().Cancel(pb.ApprovalRef(id=approval_id),
                                  metadata=self.address.metadata(), timeout=10)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


def when(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9).strftime("%H:%M:%S")
