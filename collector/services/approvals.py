from __future__ import annotations

import asyncio
import logging
import time

import grpc

from agentgate.wire import pb, rpc
from collector.auth import current_principal
from collector.hub import Hub, Overflow
from collector.requester import is_own_request, may_act_on
from collector.services import approval_pb, run
from collector.storage import FINAL_STATES, PENDING, ApprovalRow, Forbidden, Storage

log = logging.getLogger("agentgate.collector")


class ApprovalsServicer(rpc.ApprovalsServicer):
    def __init__(self, store: Storage, hub: Hub, default_ttl_s: int, max_ttl_s: int):
        self.store = store
        self.hub = hub
        self.default_ttl_s = default_ttl_s
        self.max_ttl_s = max_ttl_s

    def _changed(self, row: ApprovalRow) -> None:
        self.hub.approvals.publish(row)

    async def Create(self, request, context):
        now = time.time_ns()
        ttl = min(request.ttl_seconds or self.default_ttl_s, self.max_ttl_s)
        if not request.command:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an approval request needs a command")
        row = ApprovalRow(
            id="", state=PENDING, session_id=request.session_id, host=request.host,
            target=request.target, protocol=request.protocol, command=request.command,
            requested_by=request.requested_by, rule=request.rule, reason=request.reason,
            created_ns=now, expires_ns=now + ttl * 1_000_000_000,
            created_by=current_principal().name)
        row = await run(context, self.store.create_approval, row)
        self._changed(row)
        self.hub.expiry_changed.set()
        return approval_pb(row)

    async def _visible(self, context, approval_id: str) -> ApprovalRow:
        row = await run(context, self.store.get_approval, approval_id)
        if not may_act_on(current_principal(), row):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, _not_yours(approval_id))
        return row

    async def Get(self, request, context):
        return approval_pb(await self._visible(context, request.id))

    async def Watch(self, request, context):
        with self.hub.approvals.subscribe() as sub:
            row = await self._visible(context, request.id)
            yield approval_pb(row)
            while row.state not in FINAL_STATES:
                try:
                    changed = await sub.get()
                except Overflow:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        "approval watcher fell behind; watch again")
                if changed.id == request.id and changed.state != row.state:
                    row = changed
                    yield approval_pb(row)

    async def Cancel(self, request, context):
        who = current_principal()

        def check(cur: ApprovalRow) -> None:
            if not may_act_on(who, cur):
                raise Forbidden(_not_yours(cur.id))
        row = await run(context, self.store.cancel_approval, request.id, who.name,
                        time.time_ns(), check)
        self._changed(row)
        return approval_pb(row)

    async def List(self, request, context):
        rows = await run(context, self.store.list_approvals, request.pending_only,
                         min(request.limit or 100, 10_000))
        return pb.ListApprovalsResponse(approvals=[approval_pb(r) for r in rows])

    async def Decide(self, request, context):
        if not request.approve and not request.reason:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a denial needs a reason")
        who = current_principal()

        def check(cur: ApprovalRow) -> None:
            if is_own_request(who, cur):
                raise Forbidden("you cannot decide your own request")
        row = await run(context, self.store.decide_approval, request.id, request.approve,
                        request.reason, who.name, time.time_ns(), check)
        log.info("approval %s %s by %s", row.id, row.state, who.name)
        self._changed(row)
        return approval_pb(row)

    async def WatchAll(self, request, context):
        with self.hub.approvals.subscribe() as sub:
            if request.include_existing:
                for row in reversed(await run(context, self.store.list_approvals, True, 10_000)):
                    yield approval_pb(row)
            while True:
                try:
                    yield approval_pb(await sub.get())
                except Overflow:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        "approval watcher fell behind and was cut off")


def _not_yours(approval_id: str) -> str:
    return f"approval request {approval_id} was filed by another host agent"


async def expire_loop(store: Storage, hub: Hub) -> None:
    """Mark pending requests expired the moment their time is up, and tell watchers."""
    while True:
        hub.expiry_changed.clear()   # before looking: a request created meanwhile wakes us
        try:
            for row in await asyncio.to_thread(store.expire_approvals, time.time_ns()):
                hub.approvals.publish(row)
            nxt = await asyncio.to_thread(store.next_expiry_ns)
        except Exception as exc:  # storage trouble must not end expiry for good
            log.error("approval expiry: %s", exc)
            nxt = None
        delay = 5.0 if nxt is None else max(0.0, min(5.0, (nxt - time.time_ns()) / 1e9))
        try:
            await asyncio.wait_for(hub.expiry_changed.wait(), timeout=delay)
        except asyncio.TimeoutError:
            pass
