"""Collector configuration: TOML file, overridable by flags."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from agentgate.client import is_loopback_target
from agentgate.tomlconfig import ConfigError, Section, default_state_dir, read_secret, read_toml

ROLES = ("admin", "approver", "auditor", "hostagent")
DECIDERS = ("admin", "approver")
# A Unix account as a host agent reports it: the passwd name, or the uid when it has none.
_UNIX_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
DEFAULT_LISTEN = "127.0.0.1:7421"


@dataclass(frozen=True)
class Token:
    name: str
    role: str
    sha256: bytes
    # The Unix accounts this person acts as: "user" on any host, "user@host" on one host.
    # Requests filed for these accounts are theirs, so they may not decide them.
    unix_users: tuple[str, ...] = ()


@dataclass
class CollectorConfig:
    listen: str = DEFAULT_LISTEN
    database: str = field(default_factory=lambda: str(default_state_dir() / "collector.db"))
    tls_cert: str | None = None
    tls_key: str | None = None
    client_ca: str | None = None
    agent_listen: str | None = None   # mTLS listener for host agents (needs client_ca)
    tokens: list[Token] = field(default_factory=list)
    approval_ttl_s: int = 300
    approval_max_ttl_s: int = 86400
    heartbeat_s: int = 15

    @property
    def open_mode(self) -> bool:
        """No tokens: every caller on loopback is admin, so only loopback is served."""
        return not self.tokens

    def validate(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls: give both 'cert' and 'key'")
        if self.agent_listen and not (self.client_ca and self.tls_cert):
            raise ConfigError("agent_listen needs tls 'cert', 'key' and 'client_ca' (it is mTLS only)")
        if self.client_ca and not self.agent_listen:
            raise ConfigError("tls 'client_ca' is used on the host agent listener: set 'agent_listen'")
        if self.open_mode and not is_loopback_target(self.listen):
            raise ConfigError(f"no tokens configured: refusing to listen on {self.listen}; "
                              "without tokens only a loopback address is allowed "
                              "(add [[tokens]] to the config)")
        seen = set()
        for t in self.tokens:
            if t.name in seen:
                raise ConfigError(f"token name '{t.name}' is used twice")
            seen.add(t.name)


def _token(sec: Section) -> Token:
    name = sec.get("name", str)
    role = sec.get("role", str)
    if not name:
        raise ConfigError(f"{sec.where}: 'name' is required")
    if role not in ROLES:
        raise ConfigError(f"{sec.where}: 'role' must be one of {', '.join(ROLES)}")
    secret = sec.get("token", str)
    digest_hex = sec.get("token_sha256", str)
    token_file = sec.path("token_file")
    unix_users = _unix_users(sec, role)
    sec.done()
    given = [x for x in (secret, digest_hex, token_file) if x]
    if len(given) != 1:
        raise ConfigError(f"{sec.where}: give exactly one of 'token', 'token_sha256', 'token_file'")
    if token_file:
        secret = read_secret(sec, token_file)
    if secret:
        if len(secret) < 16:
            raise ConfigError(f"{sec.where}: token is too short (at least 16 characters)")
        return Token(name, role, hashlib.sha256(secret.encode()).digest(), unix_users)
    try:
        digest = bytes.fromhex(digest_hex)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ConfigError(f"{sec.where}: 'token_sha256' must be 64 hex digits")
    return Token(name, role, digest, unix_users)


def _unix_users(sec: Section, role: str) -> tuple[str, ...]:
    links = sec.get("unix_users", list, [])
    if links and role not in DECIDERS:
        raise ConfigError(f"{sec.where}: 'unix_users' is for roles that decide approvals "
                          f"({', '.join(DECIDERS)}), not {role}")
    for link in links:
        user, at, host = str(link).partition("@")
        if (not isinstance(link, str) or not _UNIX_USER.fullmatch(user)
                or (at and not _HOST.fullmatch(host))):
            raise ConfigError(f"{sec.where}: 'unix_users' entries are \"user\" or \"user@host\", "
                              f"not {link!r}")
    return tuple(links)


def load_config(path: str | None) -> CollectorConfig:
    cfg = CollectorConfig()
    if not path:
        return cfg
    root = Section(read_toml(path), str(path), Path(path).parent)
    cfg.listen = root.get("listen", str, cfg.listen)
    cfg.agent_listen = root.get("agent_listen", str, None)
    cfg.database = root.path("database", cfg.database)
    cfg.approval_ttl_s = root.get("approval_ttl_seconds", int, cfg.approval_ttl_s)
    cfg.heartbeat_s = root.get("heartbeat_seconds", int, cfg.heartbeat_s)
    tls = root.table("tls")
    cfg.tls_cert = tls.path("cert")
    cfg.tls_key = tls.path("key")
    cfg.client_ca = tls.path("client_ca")
    tls.done()
    cfg.tokens = [_token(t) for t in root.tables("tokens")]
    root.done()
    if cfg.approval_ttl_s <= 0:
        raise ConfigError(f"{path}: 'approval_ttl_seconds' must be positive")
    return cfg
