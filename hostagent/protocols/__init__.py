"""Protocol layers. The contract is hostagent/protocols/api.py, the list of protocols
hostagent/protocols/registry.py; each protocol is a folder beside them. Re-exported here
for short imports."""
from hostagent.protocols.api import (CLIENT, UPSTREAM, Aborted, Answer, ApprovalDecided, Close,  # noqa: F401
                                     Command, DataReceived, EofReceived, Event, Handoff, Hold,
                                     HoldPending, Layer, OpenSide, ProtocolError, Record, SessionContext,
                                     SideAnswered,
                                     Start, StartClientTls, StartUpstreamTls, TlsEstablished,
                                     TlsFailed, ToClient, ToUpstream)
