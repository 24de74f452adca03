"""The raw relay layer: bytes pass untouched (the very objects read), each chunk
recorded before it is forwarded."""
from __future__ import annotations

from agentgate.events import DATA
from hostagent.protocols.api import (CLIENT, Aborted, Close, Command, DataReceived, Record,
                                     ToClient, ToUpstream)


class RawTcp:
    name = "tcp"

    def handle(self, event) -> list[Command]:
        if type(event) is DataReceived:
            if event.side == CLIENT:
                return [Record(DATA, {"dir": "in", "data": event.data}), ToUpstream(event.data)]
            return [Record(DATA, {"dir": "out", "data": event.data}), ToClient(event.data)]
        if type(event) is Aborted:
            return [Close(event.reason)]   # raw TCP has no error to send
        return []

    def buffered(self) -> int:
        return 0
