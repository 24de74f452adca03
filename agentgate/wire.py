"""The generated gRPC modules and conversions between them and our own types."""
from __future__ import annotations

try:
    from agentgate.v1 import agentgate_pb2 as pb
    from agentgate.v1 import agentgate_pb2_grpc as rpc
except ImportError as exc:  # pragma: no cover - only on a tree where `make setup` never ran
    raise ImportError("agentgate's gRPC modules are not generated: run `make proto` "
                      f"(or `make setup`) in the source tree ({exc})") from exc

from agentgate.events import Event

__all__ = ["pb", "rpc", "as_pb", "event_to_pb", "event_from_pb", "APPROVAL_STATES", "state_name"]


def event_to_pb(ev: Event) -> "pb.Event":
    return pb.Event(session_id=ev.session_id, seq=ev.seq, wall_time_ns=ev.wall_time_ns,
                    mono_ns=ev.mono_ns, kind=ev.kind, payload=ev.payload,
                    prev_hash=ev.prev_hash, hash=ev.hash)


def as_pb(ev) -> "pb.Event":
    """An Event, or a wire message already, as a wire message."""
    return ev if isinstance(ev, pb.Event) else event_to_pb(ev)


def event_from_pb(m: "pb.Event") -> Event:
    return Event(m.session_id, m.seq, m.wall_time_ns, m.mono_ns, m.kind, m.payload,
                 m.prev_hash, m.hash)


APPROVAL_STATES = {
    pb.PENDING: "pending",
    pb.APPROVED: "approved",
    pb.DENIED: "denied",
    pb.EXPIRED: "expired",
    pb.CANCELLED: "cancelled",
}
STATE_BY_NAME = {v: k for k, v in APPROVAL_STATES.items()}


def state_name(state: int) -> str:
    return APPROVAL_STATES.get(state, "unknown")
