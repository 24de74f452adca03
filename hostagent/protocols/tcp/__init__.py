"""Raw TCP: no parsing; every chunk is recorded (as `data` events) and passed on."""
from __future__ import annotations

from agentgate.events import DATA
from hostagent.protocols import Action, Record, ToClient, ToUpstream


class RawTcp:
    name = "tcp"

    def client_data(self, data: bytes) -> list[Action]:
        return [Record(DATA, {"dir": "in", "data": data}), ToUpstream(data)]

    def upstream_data(self, data: bytes) -> list[Action]:
        return [Record(DATA, {"dir": "out", "data": data}), ToClient(data)]

    def client_eof(self) -> list[Action]:
        return []

    def upstream_eof(self) -> list[Action]:
        return []
