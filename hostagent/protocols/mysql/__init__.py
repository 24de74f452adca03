"""MySQL and MariaDB (client/server protocol 4.1+): every statement judged (sqlglot,
MySQL's own lexical rules first), rows masked in the text and binary protocols,
credentials injected, TLS on both legs.

Modules: packets (framing, 16 MiB splits), messages (the handshake, OK/ERR, column
definitions, rows, prepared statements), auth (each leg's login: native, caching_sha2
with its RSA path, ed25519, auth switch), lexer + classify (what a text does), results
(masking), layer (the sans-IO state machine the driver runs)."""
from __future__ import annotations

from agentgate.tomlconfig import ConfigError
from hostagent.protocols.options import (CLIENT_TLS, CREDENTIALS, UPSTREAM_TLS,
                                         check_credentials, with_password)
from hostagent.protocols.registry import Option, ProtocolSpec


def _layer(ctx):
    from hostagent.protocols.mysql.layer import MysqlLayer
    return MysqlLayer.for_session(ctx)


def _warm() -> None:
    from hostagent.protocols.mysql.classify import classify
    from hostagent.protocols.mysql.layer import MysqlLayer  # noqa: F401
    classify("SELECT 1 FROM t WHERE a = ?")


def _check(opts, where: str) -> None:
    check_credentials(opts, where)
    if not opts.user or not (opts.password_file or opts.password_env):
        # the agent never holds the server's password: without injected credentials
        # there is nothing it could log in with
        raise ConfigError(f"{where}: a mysql target needs 'user' and 'password_file' (or "
                          f"'password_env'): the proxy logs in for the agent")


PROTOCOL = ProtocolSpec(
    name="mysql",
    summary="MySQL/MariaDB: statements judged, rows masked, credentials injected",
    options=CREDENTIALS + UPSTREAM_TLS + CLIENT_TLS + (
        Option("server_public_key", path=True,
               help="the server's RSA public key (PEM), for caching_sha2_password's full "
                    "authentication without TLS (else it is asked of the server, which a "
                    "man in the middle can answer: refused unless weak_password_auth = "
                    "\"allow\")"),),
    layer=_layer,
    needs_ca=lambda opts: opts.client_tls == "offer",
    policy_fields=("databases", "statements", "tables", "functions", "flags", "paths"),
    idle_timeout=8 * 3600.0,
    check=_check,
    prepare=with_password,
    warm=_warm,
)
