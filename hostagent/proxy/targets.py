"""Targets as the proxy uses them: resolved addresses, the names a client-side
certificate must carry, the protocol's declaration and its prepared options."""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from agentgate.tomlconfig import ConfigError
from hostagent.intercept.identity import canonical_ip as canonical
from hostagent.intercept.loader import InterceptError
from hostagent.protocols import registry
from hostagent.protocols.registry import Options, ProtocolSpec
from hostagent.proxy.net import parse_hostport, resolve


@dataclass(frozen=True)
class Target:
    name: str
    protocol: str
    addresses: tuple[tuple[str, int], ...]
    spec: ProtocolSpec = field(default=None, repr=False, compare=False)
    options: Options = field(default_factory=lambda: Options({}))
    names: tuple[str, ...] = ()      # as configured (host names too): the client-side
                                     # certificate names them
    listen: tuple[str, int] | None = None   # a plain listener (no eBPF) for this target
    idle_timeout: float = 3600.0

    def __post_init__(self):
        if self.spec is None:
            object.__setattr__(self, "spec", registry.get(self.protocol))


class Targets:
    def __init__(self, targets: list[Target]):
        self.targets = targets
        self._by_addr = {(canonical(h), p): t for t in targets for h, p in t.addresses}

    def match(self, host: str, port: int) -> Target | None:
        host = canonical(host)
        return self._by_addr.get((host, port)) or self._by_addr.get((host, 0))

    def addresses(self) -> list[tuple[str, int]]:
        return list(self._by_addr)

    def need_ca(self) -> bool:
        return any(t.spec.needs_ca(t.options) for t in self.targets)


def build_targets(cfg) -> Targets:
    """From the host agent config (hostagent.config): names resolved, listeners checked,
    each protocol's options prepared (secrets read). One-line errors."""
    out = []
    for t in cfg.targets:
        spec = registry.get(t.protocol)
        addrs: list[tuple[str, int]] = []
        for a in t.addresses:
            host, port = parse_hostport(a)
            try:
                addrs += resolve(host, port)
            except socket.gaierror as exc:
                raise InterceptError(f"target {t.name}: cannot resolve {host}: "
                                     f"{exc.strerror}") from None
        listen = _listen(t) if t.listen else None
        names = tuple(dict.fromkeys([parse_hostport(a)[0] for a in t.addresses]
                                    + [t.options.get("server_name") or "",
                                       listen[0] if listen else ""]
                                    + [h for h, _ in addrs]))
        try:
            options = spec.prepare(t.options, t.where or f"target {t.name}") \
                if spec.prepare else t.options
        except ConfigError as exc:
            raise InterceptError(str(exc)) from None
        out.append(Target(t.name, spec.name, tuple(addrs), spec=spec, options=options,
                          names=tuple(n for n in names if n), listen=listen,
                          idle_timeout=t.idle_timeout or spec.idle_timeout))
    return Targets(out)


def _listen(t) -> tuple[str, int]:
    listen = parse_hostport(t.listen)
    if not t.listen.rpartition(":")[2].isdigit():   # ":0" is fine: any free port
        raise InterceptError(f"target {t.name}: 'listen' needs a port: {t.listen!r}")
    try:
        loopback = ipaddress.ip_address(canonical(listen[0])).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise InterceptError(f"target {t.name}: 'listen' must be a loopback address "
                             f"(its clients are identified from this host's /proc; "
                             f"got {listen[0]!r})")
    return listen
