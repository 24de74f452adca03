"""In-process fan-out of new events and approval changes to live watchers.

A slow watcher must never slow ingest: each has a bounded queue, and one that
overflows is cut off (its stream ends with RESOURCE_EXHAUSTED) instead.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Overflow(Exception):
    pass


class Subscription(Generic[T]):
    def __init__(self, topic: "Topic[T]", maxsize: int):
        self._topic = topic
        self._queue: asyncio.Queue = asyncio.Queue(maxsize)
        self.overflowed = False

    def _offer(self, item: T) -> None:
        if self.overflowed:
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed = True
            self._queue.get_nowait()
            self._queue.put_nowait(_OVERFLOW)

    async def get(self) -> T:
        item = await self._queue.get()
        if item is _OVERFLOW:
            raise Overflow("watcher fell behind and was cut off")
        return item

    def close(self) -> None:
        self._topic._subs.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_OVERFLOW = object()


class Topic(Generic[T]):
    def __init__(self, maxsize: int = 10_000):
        self._subs: set[Subscription[T]] = set()
        self._maxsize = maxsize

    def subscribe(self) -> Subscription[T]:
        sub = Subscription(self, self._maxsize)
        self._subs.add(sub)
        return sub

    def publish(self, item: T) -> None:
        for sub in list(self._subs):
            sub._offer(item)

    @property
    def watched(self) -> bool:
        return bool(self._subs)


@dataclass(frozen=True, slots=True)
class SessionMeta:
    host: str = ""
    target: str = ""
    protocol: str = ""


class Hub:
    def __init__(self) -> None:
        self.events: Topic[tuple[Any, SessionMeta]] = Topic()
        self.approvals: Topic[Any] = Topic(1_000)
        self.expiry_changed = asyncio.Event()
