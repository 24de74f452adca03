"""PostgreSQL wire protocol v3: every statement parsed (pglast) and judged before it
runs, results masked as they stream, credentials injected, TLS on both legs.

Modules: messages (framing), auth (upstream login: SCRAM-SHA-256(-PLUS), md5, cleartext,
only to a server that showed it is the real one), classify + effects + plpgsql (what a
statement does, bodies and dynamic SQL included), names (table names through the
search path), requests (statements as policy requests), catalog (where result columns
come from, read on a side connection), masks (masking and its side doors), results
(which result is which), outputs (what each answer recorded), layer (the sans-IO state
machine the driver runs)."""
from __future__ import annotations

from hostagent.protocols.options import (CLIENT_TLS, CREDENTIALS, UPSTREAM_TLS,
                                         check_credentials, with_password)
from hostagent.protocols.registry import ProtocolSpec


def _layer(ctx):
    from hostagent.protocols.postgres.layer import PostgresLayer
    return PostgresLayer.for_session(ctx)


def _warm() -> None:
    from hostagent.protocols.postgres.classify import classify
    from hostagent.protocols.postgres.layer import PostgresLayer  # noqa: F401
    classify("SELECT 1 FROM t WHERE a = $1")


PROTOCOL = ProtocolSpec(
    name="postgres",
    summary="PostgreSQL v3: statements judged, rows masked, credentials injected",
    options=CREDENTIALS + UPSTREAM_TLS + CLIENT_TLS,
    layer=_layer,
    needs_ca=lambda opts: opts.client_tls == "offer",
    policy_fields=("databases", "statements", "tables", "functions", "flags"),
    idle_timeout=8 * 3600.0,   # an idle psql or pool connection is normal
    check=check_credentials,
    prepare=with_password,
    warm=_warm,
)
