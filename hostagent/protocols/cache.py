"""A least-recently-used cache bounded by bytes as well as entries: keys are texts an
agent chooses (statements up to the protocol's message cap), so a count alone would let
one agent park gigabytes in the root daemon."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any


class TextCache:
    def __init__(self, max_entries: int = 4096, max_bytes: int = 16 << 20,
                 max_item: int = 64 << 10):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_item = max_item      # bigger texts are not kept at all
        self.bytes = 0
        self._d: OrderedDict[str, tuple[Any, int]] = OrderedDict()

    def get(self, key: str) -> Any:
        hit = self._d.get(key)
        if hit is None:
            return None
        self._d.move_to_end(key)
        return hit[0]

    def put(self, key: str, value: Any, size: int) -> None:
        if size > self.max_item or key in self._d:
            return
        self._d[key] = (value, size)
        self.bytes += size
        while len(self._d) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, old) = self._d.popitem(last=False)
            self.bytes -= old

    def __len__(self) -> int:
        return len(self._d)
