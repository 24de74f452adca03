"""Host agent configuration (TOML): how to reach the collector, where to spool."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from agentgate.client import DEFAULT_COLLECTOR, CollectorAddress
from agentgate.tomlconfig import (ConfigError, Section, default_state_dir, private_dir,
                                  read_secret, read_toml)
from hostagent.protocols import registry
from hostagent.protocols.registry import Options


@dataclass
class SpoolConfig:
    dir: str = field(default_factory=lambda: str(default_state_dir() / "spool"))
    max_bytes: int = 1 << 30
    segment_bytes: int = 16 << 20
    fsync_interval_ms: float = 50.0
    strict: bool = False


def system_resolvers() -> list[str]:
    try:
        lines = Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        return []
    return [ln.split()[1] for ln in lines if ln.startswith("nameserver") and len(ln.split()) > 1]


@dataclass
class InterceptConfig:
    enabled: bool = True               # the daemon intercepts (false: spool + ship only)
    mode: str = "deny"                 # TCP to non-targets: deny | record | allow
    proxy_port: int = 641              # privileged (< 1024); `agentgate run` alone picks one
    dns: list[str] = field(default_factory=system_resolvers)   # UDP allowed only to these
    tree: str = "agentgate"            # cgroup tree (under the cgroup2 mount) and bpffs dir
    socket: str = "/run/agentgate/hostagent.sock"   # where `agentgate run` asks the daemon
    socket_group: str = ""             # group allowed to use the socket (default: root only)
    units: list[str] = field(default_factory=list)     # systemd units to enroll
    cgroups: list[str] = field(default_factory=list)   # cgroup paths to enroll
    uids: list[int] = field(default_factory=list)      # processes of these users, on exec
    exes: list[str] = field(default_factory=list)      # processes running these, on exec
    # unix sockets enrolled processes may reach, besides unixguard.DEFAULT_ALLOW: path
    # globs, and abstract names as "@name"
    unix_allow: list[str] = field(default_factory=list)
    abstract_unix: str = "refuse"      # refuse | allow: abstract sockets made outside
    unix_hooks: bool = True            # the BPF unix-socket hooks, where the kernel has them
    # refuse | accept: enrolling units, cgroups, uids or exes where no hook guards their
    # unix sockets (`agentgate run` has its mount namespace and Landlock)
    unix_unguarded: str = "refuse"
    # where drop-ins for `units` go (BPFProgram=): "" = /run/systemd/system, if systemd runs
    unit_dropin_dir: str = ""


@dataclass
class RecordingConfig:
    sample_rows: int = 10                  # rows of each result kept for replay (masked)
    sample_bytes: int = 4096               # bytes of each result's sample
    session_sample_bytes: int = 1 << 20    # all samples of one session; then counts only


@dataclass
class TargetConfig:
    """A target: where it is and which protocol speaks there. Everything else in its
    table is the protocol's own options (hostagent/protocols/<name>), checked here."""
    name: str
    protocol: str
    addresses: list[str]
    listen: str | None = None          # a plain listener (host:port) proxying to this
                                       # target, for processes not redirected by eBPF
    listen_allow: list[tuple[str, str]] | None = None   # who it serves: (kind, value)
                                       # pairs (ALLOW_KINDS); None: root alone
    idle_timeout: float | None = None  # seconds; None: the protocol's default
    # local socket paths of this target (a database's): an enrolled connect to one is
    # proxied like one to its address
    unix: list[str] = field(default_factory=list)
    options: Options = field(default_factory=lambda: Options({}))
    where: str = ""                    # for messages: file and target


@dataclass
class HostAgentConfig:
    collector: CollectorAddress = field(default_factory=CollectorAddress)
    collector_configured: bool = False   # an address was given: spool for it, however long
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    recording: RecordingConfig = field(default_factory=RecordingConfig)
    intercept: InterceptConfig = field(default_factory=InterceptConfig)
    targets: list[TargetConfig] = field(default_factory=list)
    policy_file: str | None = None
    host: str = field(default_factory=socket.gethostname)
    state_dir: str = field(default_factory=lambda: str(default_state_dir()))
    ca_dir: str = ""                   # the local CA enrolled clients trust (state_dir/ca)
    budget_bytes: int = 256 << 20      # bytes all sessions together may hold buffered


def load_config(path: str | None) -> HostAgentConfig:
    cfg = HostAgentConfig()
    if not path:
        cfg.ca_dir = str(Path(cfg.state_dir) / "ca")
        return cfg
    root = Section(read_toml(path), str(path), Path(path).parent)
    cfg.host = root.get("host", str, cfg.host)
    cfg.state_dir = root.path("state_dir", cfg.state_dir)
    cfg.ca_dir = root.path("ca_dir", str(Path(cfg.state_dir) / "ca"))
    c = root.table("collector")
    token = c.get("token", str)
    token_file = c.path("token_file")
    if token and token_file:
        raise ConfigError(f"{c.where}: give 'token' or 'token_file', not both")
    if token_file:
        token = read_secret(c, token_file)
    cfg.collector_configured = "address" in c.data
    cfg.collector = CollectorAddress(
        target=c.get("address", str, DEFAULT_COLLECTOR), token=token or None,
        ca=c.path("ca"), cert=c.path("cert"), key=c.path("key"),
        server_name=c.get("server_name", str))
    c.done()
    if bool(cfg.collector.cert) != bool(cfg.collector.key):
        raise ConfigError(f"{c.where}: give both 'cert' and 'key' for mTLS")
    s = root.table("spool")
    cfg.spool = SpoolConfig(
        dir=s.path("dir", str(Path(cfg.state_dir) / "spool")),
        max_bytes=s.get("max_bytes", int, cfg.spool.max_bytes),
        segment_bytes=s.get("segment_bytes", int, cfg.spool.segment_bytes),
        fsync_interval_ms=s.get("fsync_interval_ms", float, cfg.spool.fsync_interval_ms),
        strict=s.get("strict", bool, cfg.spool.strict))
    s.done()
    r = root.table("recording")
    d0 = RecordingConfig()
    cfg.recording = RecordingConfig(
        sample_rows=r.get("sample_rows", int, d0.sample_rows),
        sample_bytes=r.get("sample_bytes", int, d0.sample_bytes),
        session_sample_bytes=r.get("session_sample_bytes", int, d0.session_sample_bytes))
    r.done()
    if min(vars(cfg.recording).values()) < 0:
        raise ConfigError(f"{r.where}: sample sizes must not be negative")
    cfg.policy_file = root.path("policy")
    i = root.table("intercept")
    d = InterceptConfig()
    cfg.intercept = InterceptConfig(
        enabled=i.get("enabled", bool, d.enabled), mode=i.get("mode", str, d.mode),
        proxy_port=i.get("proxy_port", int, d.proxy_port), dns=list(i.get("dns", list, d.dns)),
        tree=i.get("tree", str, d.tree), socket=i.path("socket", d.socket),
        socket_group=i.get("socket_group", str, d.socket_group),
        units=list(i.get("units", list, [])), cgroups=list(i.get("cgroups", list, [])),
        uids=list(i.get("uids", list, [])), exes=list(i.get("exes", list, [])),
        unix_allow=list(i.get("unix_allow", list, [])),
        abstract_unix=i.get("abstract_unix", str, "refuse"),
        unix_hooks=i.get("unix_hooks", bool, True),
        unix_unguarded=i.get("unix_unguarded", str, "refuse"),
        unit_dropin_dir=i.get("unit_dropin_dir", str, ""))
    i.done()
    if cfg.intercept.abstract_unix not in ("refuse", "allow"):
        raise ConfigError(f"{i.where}: 'abstract_unix' must be refuse or allow")
    if cfg.intercept.unix_unguarded not in ("refuse", "accept"):
        raise ConfigError(f"{i.where}: 'unix_unguarded' must be refuse or accept")
    if not all(isinstance(g, str) and g[:1] in ("/", "@") for g in cfg.intercept.unix_allow):
        raise ConfigError(f"{i.where}: 'unix_allow' must list absolute socket paths (globs) "
                          "or abstract names (\"@name\")")
    if cfg.intercept.mode not in ("deny", "record", "allow"):
        raise ConfigError(f"{i.where}: 'mode' must be deny, record or allow")
    px = root.table("proxy")
    cfg.budget_bytes = px.get("memory_budget_mb", int, cfg.budget_bytes >> 20) << 20
    px.done()
    if cfg.budget_bytes <= 0:
        raise ConfigError(f"{px.where}: 'memory_budget_mb' must be positive")
    names: set[str] = set()
    for t in root.tables("targets"):
        cfg.targets.append(_target(t, names))
    if cfg.policy_file:   # every rule must be able to match something it may apply to
        from hostagent.policy import check_against_targets, load_policy
        check_against_targets(load_policy(cfg.policy_file),
                              {t.name: t.protocol for t in cfg.targets}, cfg.policy_file)
    root.done()
    if cfg.spool.max_bytes < cfg.spool.segment_bytes:
        raise ConfigError(f"{path}: spool max_bytes must be at least segment_bytes")
    if cfg.spool.fsync_interval_ms < 0:
        raise ConfigError(f"{path}: spool fsync_interval_ms must not be negative")
    return cfg


# What a plain listener's `listen_allow` entries name ("kind:value"): any one that
# matches the connecting process admits it. Without the key, root alone is served.
ALLOW_KINDS = {
    "user": "a user name (the socket's owner, as the kernel keeps it)",
    "uid": "a user id",
    "group": "a group name (the process's real or supplementary groups)",
    "gid": "a group id",
    "unit": "a systemd system unit or slice the process runs in (.service, .scope, .slice)",
}
UNIT_SUFFIXES = (".service", ".scope", ".slice")


def parse_listen_allow(entries, where: str) -> list[tuple[str, str]]:
    """`listen_allow = ["user:alice", "uid:1001", "group:ci", "gid:998",
    "unit:ci-runner.service"]` -> [(kind, value)]. Names are looked up when the daemon
    starts (hostagent.proxy.targets), not here."""
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: 'listen_allow' must be a list of entries like "
                          f'"user:alice", not {type(entries).__name__}')
    if not entries:
        raise ConfigError(f"{where}: 'listen_allow' is empty, so nobody could connect "
                          f"(leave it out to serve root alone, or remove 'listen')")
    kinds = ", ".join(f"{k}:" for k in ALLOW_KINDS)
    out = []
    for entry in entries:
        if not isinstance(entry, str):
            raise ConfigError(f"{where}: 'listen_allow' entries are strings like "
                              f'"user:alice", not {entry!r}')
        kind, sep, value = entry.partition(":")
        kind, value = kind.strip(), value.strip()
        if not sep or kind not in ALLOW_KINDS:
            raise ConfigError(f"{where}: listen_allow entry {entry!r}: start it with what "
                              f"it names: {kinds}")
        if not value:
            raise ConfigError(f"{where}: listen_allow entry {entry!r}: nothing after "
                              f"'{kind}:' ({ALLOW_KINDS[kind]})")
        if kind in ("uid", "gid") and not (value.isascii() and value.isdigit()):
            raise ConfigError(f"{where}: listen_allow entry {entry!r}: a {kind} is a "
                              f"number (for a name, say {'user' if kind == 'uid' else 'group'}:)")
        if kind == "unit" and ("/" in value or not value.endswith(UNIT_SUFFIXES)):
            raise ConfigError(f"{where}: listen_allow entry {entry!r}: a unit's full name, "
                              f"ending in .service, .scope or .slice")
        out.append((kind, value))
    return out


def _target(t: Section, names: set[str]) -> TargetConfig:
    name = t.get("name", str, "")
    where = f"{t.where} target '{name}'" if name else t.where
    if not name:
        raise ConfigError(f"{where}: a target needs 'name'")
    if name in names:
        raise ConfigError(f"{where}: the name is used twice")
    names.add(name)
    # always named, and one we know: a typo or an omission is never relayed unjudged
    protocol = t.get("protocol", str, None)
    if protocol is None:
        raise ConfigError(f"{where}: a target needs 'protocol' (one of "
                          f"{', '.join(registry.names())}; tcp relays raw bytes, unjudged)")
    spec = _protocol(protocol, where)
    addrs = t.get("address", (str, list))
    target = TargetConfig(name=name, protocol=spec.name,
                          addresses=[addrs] if isinstance(addrs, str) else list(addrs or []),
                          listen=t.get("listen", str, None),
                          idle_timeout=t.get("idle_timeout", float, None), where=where)
    unix = t.get("unix", (str, list), [])
    target.unix = [unix] if isinstance(unix, str) else list(unix)
    for path in target.unix:
        if not isinstance(path, str) or not path.startswith("/") or len(path.encode()) > 107:
            raise ConfigError(f"{where}: 'unix' lists absolute socket paths (107 bytes at "
                              f"most), got {path!r}")
    t._seen.add("listen_allow")   # type checked below: the message names the target
    allow = t.data.get("listen_allow")
    if allow is not None:
        if not target.listen:
            raise ConfigError(f"{where}: 'listen_allow' is for a plain listener: "
                              f"give 'listen' too")
        target.listen_allow = parse_listen_allow(allow, where)
    if not target.addresses or not all(isinstance(a, str) and a for a in target.addresses):
        raise ConfigError(f"{where}: a target needs 'address' (host:port, or a list of them)")
    if target.idle_timeout is not None and target.idle_timeout <= 0:
        raise ConfigError(f"{where}: 'idle_timeout' must be positive (seconds)")
    target.options = registry.parse_options(spec, t, where)
    unknown = sorted(set(t.data) - t._seen)
    if unknown:
        mine = ", ".join(o.name for o in spec.options) or "none"
        raise ConfigError(f"{where}: unknown option '{unknown[0]}' for protocol "
                          f"{spec.name} (its options: {mine})")
    return target


def _protocol(name: str, where: str):
    try:
        return registry.get(name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def read_agent_id(state_dir: str) -> str:
    try:
        return (Path(state_dir) / "agent-id").read_text().strip()
    except OSError:
        return ""


def write_agent_id(state_dir: str, agent_id: str) -> None:
    p = Path(state_dir) / "agent-id"
    private_dir(p.parent)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(agent_id + "\n")
    os.replace(tmp, p)
