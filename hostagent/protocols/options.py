"""Target options several protocols share (credentials, TLS on either leg), declared
once so every protocol spells and checks them the same way."""
from __future__ import annotations

import os
from pathlib import Path

from agentgate.tomlconfig import ConfigError
from hostagent.protocols.registry import Option, Options

CREDENTIALS = (
    Option("user", help="the user the proxy authenticates upstream as (injected)"),
    Option("password_file", path=True, help="file holding the injected password (root's)"),
    Option("password_env", help="environment variable of the host agent holding it"),
    Option("weak_password_auth", default="refuse", choices=("refuse", "allow"),
           help="refuse: the injected password is answered to a cleartext or md5 request "
                "only over TLS that verified the server (tls = \"verify-full\"), else the "
                "session is refused (a cleartext password, or an md5 answer, is reusable by "
                "whoever receives it); allow: answer it over any leg (e.g. a loopback "
                "server without TLS)"),
)
# The default is verify-full: the injected credentials go only to a server that proved
# who it is. libpq's `prefer` is a compatibility default: a man in the middle answers
# SSLRequest with 'N' and owns the session. A server without TLS is an explicit opt-out.
UPSTREAM_TLS = (
    Option("tls", default="verify-full",
           choices=("disable", "prefer", "require", "verify-full"),
           help="TLS towards the server. verify-full (default): the certificate must chain "
                "to `ca` (or the system store) and name `server_name`; require: encrypted, "
                "not verified, so the injected credentials go only through "
                "SCRAM-SHA-256-PLUS (channel binding); prefer, disable: no protection from "
                "a man in the middle (explicit opt-outs, e.g. a loopback server)"),
    Option("ca", path=True, help="CA file to verify the server with (default: system store)"),
    Option("server_name", help="name to verify the server's certificate against (default: "
                               "the host of the target's first address)"),
)
CLIENT_TLS = (
    Option("client_tls", default="offer", choices=("offer", "decline"),
           help="terminate TLS from the agent with the local CA (offer) or refuse it"),
)


def check_credentials(opts: Options, where: str) -> None:
    if opts.password_file and opts.password_env:
        raise ConfigError(f"{where}: give 'password_file' or 'password_env', not both")


def with_password(opts: Options, where: str) -> Options:
    """The injected password read at start (from a file only root reads, or the
    daemon's environment), never from the policy or the agent."""
    password = None
    if opts.password_file:
        try:
            password = Path(opts.password_file).read_text().rstrip("\n")
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read password_file {opts.password_file}: "
                              f"{exc.strerror}") from None
    elif opts.password_env:
        if opts.password_env not in os.environ:
            raise ConfigError(f"{where}: environment variable {opts.password_env} is not set")
        password = os.environ[opts.password_env]
    return opts.replace(password=password)
