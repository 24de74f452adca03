"""Raw TCP, the explicit relay: no parsing; every chunk is recorded (as `data` events)
and passed on. Only a target that says `protocol = "tcp"` (or a non-target connection
in the interceptor's `record` mode) gets it: an unknown or omitted protocol is a config
error, and so is a rule that could apply to tcp targets alone."""
from __future__ import annotations

from hostagent.protocols.registry import ProtocolSpec


def _layer(ctx):
    from hostagent.protocols.tcp.layer import RawTcp
    return RawTcp()


PROTOCOL = ProtocolSpec(name="tcp", summary="raw relay, every byte recorded", layer=_layer,
                        idle_timeout=3600.0, judges=False)
