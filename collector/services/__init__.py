"""Thin gRPC servicers over collector.storage: convert, call, map errors."""
from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import asdict

import grpc

from agentgate.wire import STATE_BY_NAME, pb
from collector.storage import ApprovalRow, Conflict, Forbidden, NotFound, SessionRow, StorageError

log = logging.getLogger("agentgate.collector")


async def run(context: grpc.aio.ServicerContext, fn, *args):
    """Run a storage call off the event loop; storage errors become gRPC statuses."""
    try:
        return await asyncio.to_thread(fn, *args)
    except NotFound as exc:
        await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
    except Conflict as exc:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    except Forbidden as exc:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
    except (StorageError, sqlite3.Error) as exc:
        # e.g. disk full: the caller keeps its data and retries later.
        log.error("storage error: %s", exc)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"collector storage error: {exc}")


def session_pb(row: SessionRow) -> "pb.Session":
    return pb.Session(**asdict(row))


def approval_pb(row: ApprovalRow) -> "pb.Approval":
    fields = asdict(row)
    fields["state"] = STATE_BY_NAME[row.state]
    return pb.Approval(**fields)
