"""Authentication and authorization for every RPC, in one server interceptor.

Who is calling: a verified client certificate (the mTLS host agent listener) makes a
host agent named by its certificate's CN; otherwise a bearer token from the config; in
open mode (no tokens, loopback only) every caller is the local admin. What they may
call: METHOD_ROLES below. A method missing from it is refused: fail closed.
"""
from __future__ import annotations

import contextvars
import hashlib
from dataclasses import dataclass
from typing import Awaitable, Callable

import grpc

from collector.config import Token

READERS = frozenset({"admin", "approver", "auditor"})
HOSTAGENT = frozenset({"admin", "hostagent"})

METHOD_ROLES: dict[str, frozenset[str]] = {
    "/agentgate.v1.Ingest/Stream": HOSTAGENT,
    "/agentgate.v1.Sessions/List": READERS,
    "/agentgate.v1.Sessions/Get": READERS,
    "/agentgate.v1.Sessions/StreamEvents": READERS,
    "/agentgate.v1.Sessions/Tail": READERS,
    "/agentgate.v1.Approvals/Create": HOSTAGENT,
    "/agentgate.v1.Approvals/Watch": READERS | HOSTAGENT,
    "/agentgate.v1.Approvals/Cancel": HOSTAGENT,
    "/agentgate.v1.Approvals/Get": READERS | HOSTAGENT,
    "/agentgate.v1.Approvals/List": READERS,
    "/agentgate.v1.Approvals/Decide": frozenset({"admin", "approver"}),
    "/agentgate.v1.Approvals/WatchAll": READERS,
    "/agentgate.v1.Agents/Register": HOSTAGENT,
    "/agentgate.v1.Agents/Heartbeat": HOSTAGENT,
    "/agentgate.v1.Agents/List": READERS,
}
PUBLIC = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    via: str  # "token", "mtls" or "local"
    unix_users: tuple[str, ...] = ()  # the Unix accounts linked to a token (config)


LOCAL_ADMIN = Principal("local", "admin", "local")  # every caller in open mode
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")


def current_principal() -> Principal:
    """The authenticated caller of the RPC being served."""
    return _current.get()


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: list[Token]):
        self._by_digest = {t.sha256: t for t in tokens}
        self._open = not tokens

    def _identify(self, context: grpc.aio.ServicerContext) -> Principal | None:
        auth = context.auth_context() or {}
        cn = auth.get("x509_common_name")
        if cn:
            return Principal(cn[0].decode(errors="replace"), "hostagent", "mtls")
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                scheme, _, secret = value.partition(" ")
                if scheme.lower() != "bearer" or not secret:
                    return None
                tok = self._by_digest.get(hashlib.sha256(secret.encode()).digest())
                return Principal(tok.name, tok.role, "token", tok.unix_users) if tok else None
        return LOCAL_ADMIN if self._open else None

    async def _authorize(self, context, method: str) -> Principal:
        principal = self._identify(context)
        if principal is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or unknown token (give --token or AGENTGATE_TOKEN)")
        allowed = METHOD_ROLES.get(method, frozenset())
        if principal.role not in allowed:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{principal.name} (role {principal.role}) may not call {method}")
        return principal

    async def intercept_service(self, continuation: Callable[..., Awaitable],
                                details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method in PUBLIC:
            return handler
        return _guard(handler, lambda ctx: self._authorize(ctx, details.method))


def _guard(handler: grpc.RpcMethodHandler, authorize) -> grpc.RpcMethodHandler:
    """The same handler, with `authorize` run first; the principal set for the servicer."""
    ser = dict(request_deserializer=handler.request_deserializer,
               response_serializer=handler.response_serializer)
    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary_unary(request, context):
            _current.set(await authorize(context))
            return await inner(request, context)
        return grpc.unary_unary_rpc_method_handler(unary_unary, **ser)
    if handler.unary_stream:
        inner = handler.unary_stream

        async def unary_stream(request, context):
            _current.set(await authorize(context))
            async for item in inner(request, context):
                yield item
        return grpc.unary_stream_rpc_method_handler(unary_stream, **ser)
    if handler.stream_unary:
        inner = handler.stream_unary

        async def stream_unary(request_iterator, context):
            _current.set(await authorize(context))
            return await inner(request_iterator, context)
        return grpc.stream_unary_rpc_method_handler(stream_unary, **ser)
    inner = handler.stream_stream

    async def stream_stream(request_iterator, context):
        _current.set(await authorize(context))
        async for item in inner(request_iterator, context):
            yield item
    return grpc.stream_stream_rpc_method_handler(stream_stream, **ser)
