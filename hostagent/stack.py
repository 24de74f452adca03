"""The interception stack both the daemon and a lone `agentgate run` assemble:
spool -> shipper, BPF programs on a cgroup, the proxy they redirect to, kernel events."""
from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import shutil
import socket
from pathlib import Path

from agentgate.client import CollectorAddress
from hostagent.config import HostAgentConfig
from hostagent.intercept import cgroups, unixhooks
from hostagent.intercept.identity import IdentityCache
from hostagent.intercept.loader import Interceptor, InterceptError, KernelEvent
from hostagent.intercept.unixguard import unix_allowed
from hostagent.approvals import Approver
from hostagent.policy import load_policy
from hostagent.protocols import registry
from hostagent.proxy.driver import Proxy
from hostagent.proxy.net import bind_pair, hostport, parse_hostport
from hostagent.proxy.targets import Targets, build_targets
from hostagent.recording.samples import SampleLimits
from hostagent.recording.shipper import Shipper
from hostagent.recording.spool import Spool
from hostagent.tls import CAError, LocalCA, trust_env, write_file

UNIX_PROXY_DIR = Path("/run/agentgate/unix")
log = logging.getLogger("agentgate.hostagent")


def local_ca(cfg: HostAgentConfig, targets: Targets) -> LocalCA | None:
    """The CA whose certificates the proxy presents to clients asking for TLS; made on
    first use. Only needed when some target offers TLS to its clients."""
    if not targets.need_ca():
        return None
    # what the CA may certify: the names and addresses of the targets it serves, and no
    # other (its issuing certificate's name constraints)
    names = [n for t in targets.targets if t.spec.needs_ca(t.options)
             for n in (*t.names, *(h for h, _ in t.addresses))]
    try:
        ca = LocalCA.load_or_create(cfg.ca_dir or Path(cfg.state_dir) / "ca")
        ca.constrain(names)
        ca.bundle()
        ca.public_dir = publish_trust(ca, cfg.intercept.tree)
    except (CAError, OSError, ValueError) as exc:
        raise InterceptError(f"local CA: {exc}") from None
    if ca.remade:
        log.warning("the local CA was made anew (the old one could not sign a constrained "
                    "issuing certificate): clients must trust the new %s", ca.cert_path)
    return ca


TRUST_DIR = Path("/run/agentgate/trust")


def publish_trust(ca: LocalCA, tree: str) -> Path:
    """The bundle and the root where agents of any user can read them: the state
    directory is root's alone (0700). /run/agentgate/trust/<tree>/{bundle,ca}.pem."""
    out = TRUST_DIR / tree
    for d in (TRUST_DIR.parent, TRUST_DIR, out):
        d.mkdir(mode=0o755, exist_ok=True)
        os.chmod(d, 0o755)
    for name, src in (("bundle.pem", ca.directory / "bundle.pem"), ("ca.pem", ca.cert_path)):
        data = src.read_bytes()
        dst = out / name
        if not dst.exists() or dst.read_bytes() != data:
            write_file(out, name, data, 0o644, replace=True)
    return out


def agent_env(ca: LocalCA | None, services: dict | None = None) -> dict[str, str]:
    """What an agent's environment gets so its TLS clients trust the local CA: every
    common client's CA-bundle variable, pointing at the system's CAs plus ours; and
    what protocols' host-wide state adds (SSH: its known_hosts)."""
    env = {}
    for service in (services or {}).values():
        if hasattr(service, "env"):
            env.update(service.env())
    public = getattr(ca, "public_dir", None)
    if public is not None:
        env.update(trust_env(public / "bundle.pem", public / "ca.pem"))
    return env


def protocol_services(cfg: HostAgentConfig, targets: Targets) -> dict:
    """Each protocol's host-wide state (ProtocolSpec.setup), for its targets."""
    services = {}
    for spec in {t.spec.name: t.spec for t in targets.targets}.values():
        if spec.setup is not None:
            mine = [t for t in targets.targets if t.spec.name == spec.name]
            try:
                services[spec.name] = spec.setup(mine, Path(cfg.state_dir), cfg.intercept.tree)
            except Exception as exc:
                raise InterceptError(f"{spec.name}: {exc}") from None
    return services


def resolvers(cfg: HostAgentConfig) -> list[tuple[str, int]]:
    out = []
    for d in cfg.intercept.dns:
        host, port = parse_hostport(d, 53)
        out.append((host, port or 53))
    return out


def open_spool(cfg: HostAgentConfig) -> Spool:
    return Spool(cfg.spool.dir, max_bytes=cfg.spool.max_bytes,
                 segment_bytes=cfg.spool.segment_bytes,
                 fsync_interval=cfg.spool.fsync_interval_ms / 1000, strict=cfg.spool.strict)


class Stack:
    def __init__(self, cfg: HostAgentConfig, spool: Spool):
        self.cfg = cfg
        self.spool = spool
        self.shipper: Shipper | None = None
        self.icpt: Interceptor | None = None
        self.proxy: Proxy | None = None
        self.pin_dir: Path | None = None
        self.unix_dir: Path | None = None
        self.unix_proxies: list[str] = []     # the proxy's sockets for targets' unix paths
        self.services: dict = {}
        self._tasks: list[asyncio.Task] = []

    def ship_to(self, address: CollectorAddress) -> Shipper:
        self.shipper = Shipper(self.spool, address)
        self._tasks.append(asyncio.create_task(self.shipper.run()))
        return self.shipper

    async def intercept(self, *, port: int, mode: str, pin_dir: Path, session_group: str = "",
                        on_event=None) -> None:
        """Bind the proxy, load the programs (they redirect to its port), start serving.
        Attaching to cgroups is the caller's next step."""
        cfg = self.cfg
        targets = build_targets(cfg)
        ca = local_ca(cfg, targets)
        socks = bind_pair(port)
        if len(socks) == 1:
            log.warning("no IPv6 loopback on this host: the proxy listens on 127.0.0.1 "
                        "alone; enrolled IPv6 connects fail")
        port = socks[0].getsockname()[1]
        self.pin_dir = pin_dir
        # (run_in_executor starts the compiler now; to_thread would wait for the loop)
        compiling = asyncio.get_running_loop().run_in_executor(None, functools.partial(
            Interceptor, port, mode=mode, pin_dir=pin_dir, unix_hooks=cfg.intercept.unix_hooks))
        try:
            targets.warm()   # meanwhile (the compiler holds no GIL)
        finally:
            self.icpt = await compiling
        globs = unix_allowed(cfg)
        self.icpt.set_unix_allow(globs, cfg.intercept.abstract_unix == "allow")
        if self.icpt.unix_progs and unixhooks.needs_refresh(globs):
            self._tasks.append(asyncio.create_task(self._refresh_unix()))
        self.icpt.set_targets(targets.addresses())
        self.icpt.set_resolvers(resolvers(cfg))
        if on_event:
            loop = asyncio.get_running_loop()
            self.icpt.start_events(lambda ev: loop.call_soon_threadsafe(on_event, ev))
        self.proxy = self._proxy(targets, ca, lookup=self.icpt.take_peer,
                                 unix_lookup=self.icpt.take_unix_peer,
                                 identify=IdentityCache(cgroups.cgroup2_mount(), cfg.intercept.tree),
                                 session_group=session_group)
        await self.proxy.listen(socks)
        await self._listen_unix(targets, pin_dir)
        # What start-up made (modules, parsers, compiled programs' tables) lives as long as
        # the process: out of the collector's way, so its full passes stay short
        gc.collect()
        gc.freeze()

    async def _listen_unix(self, targets: Targets, pin_dir: Path) -> None:
        """A proxy socket for each target's local socket paths, and the kernel told to
        send enrolled connects to those paths there."""
        wanted = [t for t in targets.targets if t.unix]
        if not wanted:
            return
        if not self.icpt.unix_progs:
            log.warning("the unix sockets of %s can't be proxied without the BPF unix-socket "
                        "hooks (%s): enrolled connects to them are refused",
                        ", ".join(t.name for t in wanted), self.icpt.unix_error)
            return
        base = UNIX_PROXY_DIR / pin_dir.name
        base.mkdir(parents=True, exist_ok=True)
        for d in (UNIX_PROXY_DIR, base):   # agents of any user reach the sockets (each
            os.chmod(d, 0o755)             # is served only with the kernel's record)
        self.unix_dir = base
        redirects = {}
        for i, t in enumerate(wanted):
            path = base / f"{i}.sock"
            path.unlink(missing_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(path))
            os.chmod(path, 0o666)
            sock.listen(1024)
            await self.proxy.listen_unix(t, sock)
            self.unix_proxies.append(str(path))
            redirects.update({given: str(path) for p in t.unix
                              for given in unixhooks.spellings(p)})
        self.icpt.set_unix_redirects(redirects)
        log.info("proxying the unix sockets %s", ", ".join(sorted(redirects)))

    async def _refresh_unix(self, period: float = 1.0) -> None:
        """Globs that name more than one socket follow the sockets bound on the host."""
        while True:
            await asyncio.sleep(period)
            try:
                await asyncio.to_thread(self.icpt.refresh_unix)
            except Exception as exc:   # the next round may succeed; the old entries hold
                log.error("refreshing the unix-socket allowlist: %s", exc)

    def _proxy(self, targets: Targets, ca: LocalCA | None, **kw) -> Proxy:
        cfg = self.cfg
        policy = load_policy(cfg.policy_file) if cfg.policy_file else None
        approver = Approver(self.shipper.address, policy.review_ttl_s if policy else 0) \
            if self.shipper else None
        rec = cfg.recording
        samples = SampleLimits(rows=rec.sample_rows, bytes=rec.sample_bytes,
                               session_bytes=rec.session_sample_bytes)
        self.services = protocol_services(cfg, targets)
        return Proxy(policy=policy, approver=approver, spool=self.spool, host=cfg.host,
                     targets=targets, ca=ca, samples=samples, raw=registry.get("tcp"),
                     budget_bytes=cfg.budget_bytes, services=self.services, **kw)

    async def listen_plain(self) -> list[tuple[str, str, int]]:
        """The targets' plain listeners (`listen = "host:port"`), on the interception
        proxy if there is one. Returns (target, host, port) as bound."""
        targets = self.proxy.targets if self.proxy else build_targets(self.cfg)
        planned = [t for t in targets.targets if t.listen]
        if not planned:
            return []
        if self.proxy is None:
            self.proxy = self._proxy(targets, local_ca(self.cfg, targets),
                                     lookup=lambda host, port: None, identify=lambda rec: {})
        out = []
        for t in planned:
            host, port = t.listen
            sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host
                                        else socket.AF_INET, reuse_port=False, backlog=1024)
            sock.setblocking(False)
            await self.proxy.listen_plain(t, sock)
            bound = sock.getsockname()
            out.append((t.name, bound[0], bound[1]))
            log.info("target %s: plain listener on %s", t.name, hostport(bound[0], bound[1]))
        return out

    async def close(self, *, detach: bool, unpin: bool = False, grace: float = 5.0) -> None:
        if self.proxy:
            await self.proxy.close(grace)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.icpt:
            self.icpt.close(detach=detach)
        if unpin and self.pin_dir:
            shutil.rmtree(self.pin_dir, ignore_errors=True)
        if self.unix_dir:
            shutil.rmtree(self.unix_dir, ignore_errors=True)
        for name, service in self.services.items():
            if hasattr(service, "unpublish"):
                try:
                    service.unpublish()
                except OSError as exc:
                    log.warning("%s: cannot remove what it published: %s", name, exc)


def run_loop(coro):
    """asyncio.run, on uvloop when it is installed (the proxy's hot path is the loop)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


__all__ = ["Stack", "run_loop", "KernelEvent", "build_targets", "resolvers", "open_spool"]
