"""HTTP/1.1, plain (`http`) or over TLS terminated with the local CA (`https`): every
request judged before it goes on, answers masked, risky requests held for approval,
the target's credentials injected, every exchange recorded.

Modules: wire (framing on h11, a fresh connection per exchange, smuggling refused),
requests (a request as a policy request: path normalized, JSON body fields), bodies
(content codings, masking of JSON, text and event streams), records (what is recorded,
secrets redacted), layer (the sans-IO state machine the driver runs)."""
from __future__ import annotations

import os
from pathlib import Path

from agentgate.tomlconfig import ConfigError
from hostagent.protocols.registry import Option, Options, ProtocolSpec

OPTIONS = (
    Option("token_file", path=True, help="file holding the bearer token sent upstream as "
                                         "`Authorization: Bearer` (root's; the agent never "
                                         "sees it)"),
    Option("token_env", help="environment variable of the host agent holding that token"),
    Option("set_headers", type=dict, default={},
           help='headers added or replaced upstream: "Name" = "value", or = { file = PATH } '
                'or = { env = NAME } (values are never recorded)'),
    Option("keep_authorization", type=bool, default=False,
           help="pass the agent's own Authorization header on (default: dropped)"),
    Option("max_body", type=int, default=8 << 20,
           help="the most bytes of a request body read to judge its JSON, and of an "
                "answer buffered to mask it; past it, refused"),
)
TLS_OPTIONS = (
    Option("ca", path=True, help="CA file the server's certificate must chain to "
                                 "(default: the system store)"),
    Option("server_name", help="name the server's certificate must carry (default: the "
                               "name the client asked for, if it is the target's, else "
                               "the target's first name)"),
)
POLICY_FIELDS = ("methods", "hosts", "paths", "headers", "json", "flags")


def _check(opts: Options, where: str) -> None:
    if opts.token_file and opts.token_env:
        raise ConfigError(f"{where}: give 'token_file' or 'token_env', not both")
    for name, value in (opts.set_headers or {}).items():
        if not name or any(c in name for c in " :\r\n"):
            raise ConfigError(f"{where}: set_headers: {name!r} is not a header name")
        if isinstance(value, dict):
            if set(value) not in ({"file"}, {"env"}):
                raise ConfigError(f"{where}: set_headers.{name}: give {{ file = PATH }} or "
                                  f"{{ env = NAME }}")
        elif not isinstance(value, str):
            raise ConfigError(f"{where}: set_headers.{name} must be a string or a table")
    if opts.max_body < 1024:
        raise ConfigError(f"{where}: 'max_body' must be at least 1024")


def _secret(where: str, what: str, *, file: str | None = None, env: str | None = None,
            base: Path | None = None) -> str:
    if file:
        path = Path(file) if base is None else base / file
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {what} {path}: {exc.strerror}") from None
    else:
        if env not in os.environ:
            raise ConfigError(f"{where}: environment variable {env} ({what}) is not set")
        value = os.environ[env].strip()
    if any(c in value for c in "\r\n\0"):
        raise ConfigError(f"{where}: {what} holds a line break or NUL")
    return value


def _prepare(opts: Options, where: str) -> Options:
    """The injected headers, read at start (files only root reads, or the daemon's
    environment): never from the policy or the agent."""
    inject: list[tuple[bytes, bytes]] = []
    if opts.token_file or opts.token_env:
        token = _secret(where, "the token", file=opts.token_file, env=opts.token_env)
        inject.append((b"authorization", b"Bearer " + token.encode()))
    for name, value in (opts.set_headers or {}).items():
        if isinstance(value, dict):
            value = _secret(where, f"set_headers.{name}", **value)
        inject.append((name.lower().encode(), value.encode()))
    return opts.replace(secret_headers=tuple(inject))


def _layer(ctx, tls: bool = False):
    from hostagent.protocols.http.setup import layer_for
    return layer_for(ctx, tls)


def _warm() -> None:
    import hostagent.protocols.http.layer  # noqa: F401


def json_matcher(table: dict) -> list[str]:
    from hostagent.protocols.http.requests import json_patterns
    return json_patterns(table)


PROTOCOL = ProtocolSpec(
    name="http",
    summary="HTTP/1.1: requests judged, answers masked, credentials injected",
    options=OPTIONS,
    layer=_layer,
    policy_fields=POLICY_FIELDS,
    table_matchers={"json": json_matcher},
    idle_timeout=900.0,
    check=_check,
    prepare=_prepare,
    warm=_warm,
)
