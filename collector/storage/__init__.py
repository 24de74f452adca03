"""The collector's storage interface: everything the servicers may ask of a database.

Kept narrow on purpose so a PostgreSQL backend (several collector replicas) can sit
beside the SQLite one. All methods are synchronous and thread-safe; the servicers run
them off the event loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from agentgate.events import Event

# Approval states, as stored (the names are the wire enum's, lower-case).
PENDING, APPROVED, DENIED, EXPIRED, CANCELLED = "pending", "approved", "denied", "expired", "cancelled"
FINAL_STATES = frozenset({APPROVED, DENIED, EXPIRED, CANCELLED})


class StorageError(Exception):
    """Base of the errors a servicer turns into a gRPC status."""


class NotFound(StorageError):
    pass


class Conflict(StorageError):
    """The request is valid but the record's state forbids it (decided, expired)."""


class Forbidden(StorageError):
    """The caller may never do this to this record (e.g. decide their own request)."""


@dataclass(frozen=True, slots=True)
class SessionRow:
    id: str
    host: str = ""
    agent: str = ""
    target: str = ""
    protocol: str = ""
    started_ns: int = 0
    ended_ns: int = 0
    end_reason: str = ""
    event_count: int = 0
    command_count: int = 0
    start_payload: bytes = b""


@dataclass(frozen=True, slots=True)
class SessionFilter:
    host: str = ""
    agent: str = ""
    target: str = ""
    protocol: str = ""
    since_ns: int = 0
    until_ns: int = 0
    text: str = ""
    limit: int = 100


@dataclass(frozen=True, slots=True)
class ApprovalRow:
    id: str
    state: str
    session_id: str = ""
    host: str = ""
    target: str = ""
    protocol: str = ""
    command: str = ""
    requested_by: str = ""
    rule: str = ""
    reason: str = ""
    created_ns: int = 0
    expires_ns: int = 0
    decided_ns: int = 0
    decided_by: str = ""
    decision_reason: str = ""
    created_by: str = ""


@dataclass(frozen=True, slots=True)
class AgentRow:
    agent_id: str
    host: str
    version: str = ""
    capabilities: tuple[str, ...] = field(default_factory=tuple)
    registered_ns: int = 0
    last_seen_ns: int = 0
    spool_bytes: int = 0
    unacked_events: int = 0
    principal: str = ""
    lost_kernel_events: int = 0


Check = Callable[[ApprovalRow], None]


class Storage(Protocol):
    # recordings
    def ingest(self, events: Sequence[Event], owner: str = "") -> tuple[dict[str, int], list[Event]]:
        """Store events durably, once each. Returns (session id -> highest seq such that
        1..seq are all stored, the events that were now contiguous). Any object with
        Event's field names will do (the servicer passes the wire messages as they are).
        A session belongs to the `owner` that sent its first event; Forbidden for others."""
    def list_sessions(self, flt: SessionFilter) -> list[SessionRow]: ...
    def get_session(self, session_id: str) -> SessionRow: ...
    def events(self, session_id: str, after_seq: int = 0, limit: int = 1000) -> list[Event]: ...

    # approvals
    def create_approval(self, row: ApprovalRow) -> ApprovalRow: ...
    def get_approval(self, approval_id: str) -> ApprovalRow: ...
    def list_approvals(self, pending_only: bool, limit: int) -> list[ApprovalRow]: ...
    # `check` sees the pending record inside the transition and raises Forbidden to refuse
    # it: who may decide or cancel is the servicer's rule, made atomic here.
    def decide_approval(self, approval_id: str, approve: bool, reason: str, decider: str,
                        now_ns: int, check: Check | None = None) -> ApprovalRow: ...
    def cancel_approval(self, approval_id: str, by: str, now_ns: int,
                        check: Check | None = None) -> ApprovalRow: ...
    def expire_approvals(self, now_ns: int) -> list[ApprovalRow]: ...
    def next_expiry_ns(self) -> int | None: ...

    # host agents
    def register_agent(self, row: AgentRow) -> AgentRow: ...
    def heartbeat_agent(self, agent_id: str, spool_bytes: int, unacked_events: int,
                        now_ns: int, lost_kernel_events: int = 0) -> None: ...
    def list_agents(self) -> list[AgentRow]: ...

    def close(self) -> None: ...


def open_storage(url: str) -> Storage:
    """`sqlite:///path`, or a plain path, opens the SQLite backend."""
    from collector.storage.sqlite import SqliteStorage
    path = url[len("sqlite://"):] if url.startswith("sqlite://") else url
    return SqliteStorage(path)
