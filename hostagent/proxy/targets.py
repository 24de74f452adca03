"""Targets as the proxy uses them: resolved addresses, the names a client-side
certificate must carry, the protocol's declaration and its prepared options."""
from __future__ import annotations

import grp
import ipaddress
import pwd
import socket
from dataclasses import dataclass, field

from agentgate.tomlconfig import ConfigError
from hostagent.intercept.identity import canonical_ip as canonical
from hostagent.intercept.loader import InterceptError
from hostagent.protocols import registry
from hostagent.protocols.registry import Options, ProtocolSpec
from hostagent.proxy.net import parse_hostport, resolve


@dataclass(frozen=True)
class ListenAllow:
    """Who a plain listener serves (`listen_allow`): any entry that matches admits.
    Users and groups are resolved to ids when the daemon starts. Without the key: root."""
    entries: tuple[str, ...] = ("uid:0",)          # as written, for messages
    uids: tuple[tuple[int, str], ...] = ((0, "uid:0"),)      # (id, the entry naming it)
    gids: tuple[tuple[int, str], ...] = ()
    units: tuple[tuple[str, str], ...] = ()

    def admits(self, ident: dict) -> str | None:
        """The entry that admits this peer (peer_identity's dict), or None. The uid is the
        socket's owner from the kernel's table; groups and units need the process that
        holds the socket, so without one only user/uid entries can match."""
        uid = ident.get("uid")
        for value, entry in self.uids:
            if uid == value:
                return entry
        if "pid" not in ident:
            return None
        gids = set(ident.get("gids") or ())
        for value, entry in self.gids:
            if value in gids:
                return entry
        units = owning_units(ident.get("cgroup") or "")
        for value, entry in self.units:
            if value in units:
                return entry
        return None

    def refusal(self, ident: dict) -> str:
        """Why a peer is refused, in one line."""
        uid = ident.get("uid")
        who = f"user {ident.get('user', uid)} (uid {uid}"
        if "pid" in ident:
            who += f", pid {ident['pid']}, {ident.get('exe') or ident.get('comm') or '?'}"
            if self.gids:
                who += f", gids {','.join(map(str, ident.get('gids') or ())) or 'none'}"
            if self.units:
                who += f", cgroup {ident.get('cgroup') or '?'}"
        elif self.gids or self.units:
            who += f", no process found holding the socket ({ident.get('mismatch') or 'gone'})" \
                   f": groups and units can't match"
        return f"{who}) is not in listen_allow ({', '.join(self.entries)})"


ROOT_ONLY = ListenAllow()


def owning_units(cgroup: str) -> set[str]:
    """The systemd units a cgroup path proves a process runs in: its leading slices and
    the first part below them (the system unit: a .service or .scope). Deeper parts are
    not trusted: a unit with delegation, e.g. a user's own manager user@UID.service,
    lets its user make cgroups of any name below it (app.slice/ci-runner.service)."""
    units = set()
    for part in cgroup.strip("/").split("/"):
        if part.endswith(".slice"):
            units.add(part)
            continue
        if part.endswith((".service", ".scope")):
            units.add(part)
        break
    return units


def resolve_allow(t) -> ListenAllow:
    """A target config's `listen_allow` (kind, value) pairs, names looked up now."""
    if t.listen_allow is None:
        return ROOT_ONLY
    uids, gids, units, entries = [], [], [], []
    for kind, value in t.listen_allow:
        entry = f"{kind}:{value}"
        entries.append(entry)
        if kind == "user":
            try:
                uids.append((pwd.getpwnam(value).pw_uid, entry))
            except KeyError:
                raise InterceptError(f"target {t.name}: listen_allow entry {entry!r}: "
                                     f"no such user on this host") from None
        elif kind == "group":
            try:
                gids.append((grp.getgrnam(value).gr_gid, entry))
            except KeyError:
                raise InterceptError(f"target {t.name}: listen_allow entry {entry!r}: "
                                     f"no such group on this host") from None
        elif kind == "uid":
            uids.append((int(value), entry))
        elif kind == "gid":
            gids.append((int(value), entry))
        else:
            units.append((value, entry))
    return ListenAllow(tuple(entries), tuple(uids), tuple(gids), tuple(units))


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
    listen_allow: ListenAllow = ROOT_ONLY   # whom that listener serves
    unix: tuple[str, ...] = ()              # local socket paths proxied to this target
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

    def warm(self) -> None:
        """Every target's protocol made ready to serve (imports, parsers)."""
        for spec in {id(t.spec): t.spec for t in self.targets}.values():
            if spec.warm is not None:
                spec.warm()

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
        allow = resolve_allow(t)
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
                          listen_allow=allow, unix=tuple(t.unix),
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
