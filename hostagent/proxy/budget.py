"""One memory budget for the bytes all proxied sessions hold (partial messages, queues,
write buffers towards slow peers), so one enrolled agent can't run the root daemon out
of memory: the session whose growth would exceed it is ended with its protocol's
error; the others go on."""
from __future__ import annotations


class Budget:
    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def update(self, before: int, now: int) -> bool:
        """A session's holding went from `before` to `now`; False if it grew past the
        budget (the caller ends it, and releases what it held)."""
        self.used += now - before
        return now <= before or self.used <= self.limit
