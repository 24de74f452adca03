"""Stand-ins for what a server gives a session that is a capability in an agent's hands
(PostgreSQL's backend key, which cancels; MySQL's thread id, which KILL takes): the
agent holds a random stand-in, and a table of the target's maps it back to the server's
value, good only for the uid whose session it is, and only while that session lives."""
from __future__ import annotations

import weakref
from typing import Any, Callable


class Owned(tuple):
    """The server's value behind a stand-in, with the uid of the session it belongs to
    and that session's layer, weakly: a value whose session is gone (collected, or a
    layer that says `closed`) maps to nothing, however the session ended."""

    def __new__(cls, *value, uid: int | None = None, layer=None):
        owned = super().__new__(cls, value)
        owned.uid = uid
        owned._layer = weakref.ref(layer) if layer is not None else None
        return owned

    def live(self) -> bool:
        if self._layer is None:
            return True
        layer = self._layer()
        return layer is not None and not getattr(layer, "closed", False)


def new_stand_in(keys: dict, draw: Callable[[], Any]) -> Any:
    """A stand-in from `draw` unused among `keys`. Entries whose sessions are gone are
    swept from time to time (each time the table doubles past 64)."""
    n = len(keys)
    if n >= 64 and not n & (n - 1):
        for k in [k for k, v in keys.items() if isinstance(v, Owned) and not v.live()]:
            del keys[k]
    while True:
        fake = draw()
        if fake not in keys:
            return fake
