"""The contract between the I/O driver (hostagent/proxy) and a protocol layer.

A layer is a sans-IO state machine: `handle(event)` takes one event and returns the
commands the driver must carry out, in order. Everything that crosses is plain frozen
data. A layer never awaits, reads a clock or touches a socket; the only exception it
lets escape on bad input is ProtocolError (the driver ends that session alone).

Ordering the driver guarantees:
- commands run in the order returned; a Record is in the spool before any later
  command's bytes leave (record before execute);
- a side is not read while a TLS handshake on it is pending, and the client is not
  read while a Hold is open (the layer sees nothing it would have to queue unboundedly);
- bytes sent to a side whose handshake is pending go out, in order, once it is done.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

CLIENT = "client"
UPSTREAM = "upstream"


class ProtocolError(Exception):
    """The only exception a layer lets escape on bad input; the driver closes that session."""


# ------------------------------------------------------------------ events in

@dataclass(frozen=True, slots=True)
class Start:
    """Upstream is connected (`upstream` is the address that answered); the layer may
    speak first on either side (e.g. PostgreSQL's SSLRequest towards the server)."""
    upstream: tuple[str, int]


@dataclass(frozen=True, slots=True)
class DataReceived:
    side: str
    data: bytes


@dataclass(frozen=True, slots=True)
class EofReceived:
    side: str


@dataclass(frozen=True, slots=True)
class TlsEstablished:
    side: str
    version: str
    alpn: str | None = None
    sni: str | None = None     # the name the client asked for (client side only)
    # the server's certificate, DER (upstream side only): channel binding hashes it
    peer_cert: bytes | None = None


@dataclass(frozen=True, slots=True)
class TlsFailed:
    side: str
    error: str


@dataclass(frozen=True, slots=True)
class HoldPending:
    """The approval a Hold asked for exists; the layer may tell its client (a notice)."""
    key: int
    approval_id: str
    expires: str


@dataclass(frozen=True, slots=True)
class ApprovalDecided:
    key: int
    approved: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Aborted:
    """The driver must end the session (recording failed, idle, over the memory budget):
    the layer answers with its protocol's own error, then Close."""
    reason: str


@dataclass(frozen=True, slots=True)
class SideAnswered:
    """What a side connection (OpenSide) found: its layer's Answer, or why it has none
    (`error`: refused, unreachable, timed out, closed before answering)."""
    key: int
    value: Any = None
    error: str = ""


Event = (Start | DataReceived | EofReceived | TlsEstablished | TlsFailed | HoldPending
         | ApprovalDecided | Aborted | SideAnswered)


# ------------------------------------------------------------------ commands out

@dataclass(frozen=True, slots=True)
class ToUpstream:
    """Send bytes to the server. Bytes the layer did not change may be the very object
    (or a memoryview slice of what) it received: nothing is rebuilt."""
    data: bytes
    starts: tuple[int, ...] = ()   # statements this sends: the driver times them from here


@dataclass(frozen=True, slots=True)
class ToClient:
    data: bytes


@dataclass(frozen=True, slots=True)
class Record:
    """Spool this event before any later command runs (record before execute). Kinds and
    their fields are declared in agentgate/events.py."""
    kind: str
    fields: dict = field(default_factory=dict)
    stop: int | None = None   # a statement's answer: the driver adds its duration_us


@dataclass(frozen=True, slots=True)
class StartClientTls:
    """Handshake as the server towards the client, with a certificate from the host
    agent's local CA naming `names`, offering `alpn`."""
    names: tuple[str, ...]
    alpn: tuple[str, ...] = ()
    # bytes of the handshake the layer was given already (a MySQL client sends its
    # ClientHello right behind its SSL request, without waiting for an answer)
    early: bytes = b""


@dataclass(frozen=True, slots=True)
class StartUpstreamTls:
    """Handshake as the client towards the server. verify=False encrypts without
    authenticating (libpq's sslmode=require); the layer decides, per its target."""
    server_name: str
    verify: bool = True
    ca: str | None = None       # a CA file; None: the system's store
    alpn: tuple[str, ...] = ()
    cert: str | None = None     # a client certificate (and its key) to present
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Hold:
    """Ask a human (the collector's approval workflow) before going on. The driver
    answers with HoldPending, then ApprovalDecided(key, ...); the client is not read
    until then."""
    key: int
    command: str
    rule: str
    reason: str


@dataclass(frozen=True, slots=True)
class Close:
    """End the session after `final` bytes to the client."""
    reason: str
    final: bytes = b""


@dataclass(frozen=True, slots=True)
class Handoff:
    """From now on `layer` gets the events (an HTTP upgrade to a websocket, a CONNECT
    tunnel). It is started with Start, then fed `client_data` / `upstream_data` the
    parent had read past its own protocol."""
    layer: Any
    client_data: bytes = b""
    upstream_data: bytes = b""


@dataclass(frozen=True, slots=True)
class OpenSide:
    """Open another connection to this session's server, for the proxy's own use (e.g.
    PostgreSQL's catalog, to learn where result columns come from). `layer` runs it: it
    gets Start, the server's DataReceived/EofReceived and its TLS events, and may answer
    with ToUpstream, StartUpstreamTls, Answer and Close; nothing of it reaches the client
    or the recording. Its Answer comes back to this session's layer as SideAnswered."""
    key: int
    layer: Any
    timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class Answer:
    """A side connection's result (see OpenSide)."""
    value: Any


Command = (ToUpstream | ToClient | Record | StartClientTls | StartUpstreamTls | Hold | Close
           | Handoff | OpenSide | Answer)
Action = Command   # the name the first PostgreSQL layer used


class Layer(Protocol):
    # whether the driver passes a side's EOF (a half-close) on to the other side at once
    # (False: the layer ends the session itself, e.g. once queued requests are answered)
    relays_eof: bool = True

    def handle(self, event: Event) -> list[Command]: ...

    def buffered(self) -> int:
        """Bytes this layer holds for later (partial messages, queues): charged to the
        host agent's memory budget."""


# ------------------------------------------------------------------ what a layer is given

@dataclass(frozen=True)
class SessionContext:
    """What a layer knows of its session when it is made. `policy` and the derived
    hooks are pure; `shared` is state shared by every session to the same target
    (e.g. PostgreSQL's cancel keys), owned by the driver."""
    target: Any                   # hostagent.proxy.targets.Target
    identity: dict
    dialed: str                   # the address the client dialed (certificates name it)
    policy: Any                   # hostagent.policy.Policy
    tls_available: bool = False   # the driver has a local CA: StartClientTls works
    samples: Any = None           # recording sample limits
    shared: dict = field(default_factory=dict)
    service: Any = None           # the protocol's host-wide state (ProtocolSpec.setup)

    @property
    def options(self) -> Any:
        return self.target.options


LayerFactory = Callable[[SessionContext], Layer]


@dataclass(frozen=True)
class Wire:
    """What a protocol whose library owns the wire (ProtocolSpec.serve: SSH) is given
    instead of a layer's events: the client's socket, and the driver's services. It
    keeps the same rules: record before execute (recorder.record raises SpoolError when
    it can't: refuse), fail closed."""
    sock: Any                          # the client's connected socket (non-blocking)
    early: bytes                       # what was read from it already: it comes first
    connect: Callable                  # async () -> a socket connected to the target
    recorder: Any                      # this session's SessionRecorder
    # a session of its own for one part of this one (an SSH channel): its session_start
    # is this session's plus `fields` (parent: this session's id); it records its end
    open_recording: Callable[[dict], Any]
    # async (recorder, command, rule, reason, on_pending=None) -> (approved, why): a
    # Hold, awaited (on_pending(approval) once it exists: tell the client)
    approve: Callable
