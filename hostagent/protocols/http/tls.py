"""`https`: the HTTP layer with TLS terminated towards the agent (the local CA, names
limited by its constraints) and verified towards the server."""
from __future__ import annotations

from hostagent.protocols.http import (OPTIONS, POLICY_FIELDS, TLS_OPTIONS, _check,
                                      _prepare, _warm, json_matcher)
from hostagent.protocols.registry import ProtocolSpec


def _layer(ctx):
    from hostagent.protocols.http.setup import layer_for
    return layer_for(ctx, True)


PROTOCOL = ProtocolSpec(
    name="https",
    summary="HTTP/1.1 over TLS (terminated with the local CA): requests judged, answers "
            "masked, credentials injected",
    options=OPTIONS + TLS_OPTIONS,
    layer=_layer,
    needs_ca=lambda opts: True,
    policy_fields=POLICY_FIELDS,
    table_matchers={"json": json_matcher},
    idle_timeout=900.0,
    check=_check,
    prepare=_prepare,
    warm=_warm,
)
