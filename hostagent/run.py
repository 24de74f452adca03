"""`agentgate run -- CMD` with no host agent daemon: the whole stack in this process for
the duration of CMD (BPF programs on the run's own cgroup, proxy, spool, and a collector:
the configured one if it answers, else one embedded on the default SQLite database)."""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import pwd
import shlex
import signal
import socket
import uuid
from pathlib import Path

import grpc

from agentgate.client import CollectorAddress, open_channel
from agentgate.events import SESSION_END, SESSION_START
from hostagent.config import HostAgentConfig
from hostagent.intercept import cgroups
from hostagent.intercept.identity import identify
from hostagent.intercept.loader import Interceptor, InterceptError, KernelEvent, attached
from hostagent.proxy.driver import Proxy, Target, Targets, bind_pair, parse_hostport, resolve
from hostagent.recording.recorder import SessionRecorder
from hostagent.recording.shipper import Shipper
from hostagent.recording.spool import Spool

log = logging.getLogger("agentgate.run")

# Capabilities a root agent loses: raw/packet sockets, network admin, BPF and tracing.
PR_CAPBSET_DROP = 24
DROPPED_CAPS = (12, 13, 21, 38, 39)   # NET_ADMIN, NET_RAW, SYS_ADMIN, PERFMON, BPF


def build_targets(cfg: HostAgentConfig) -> Targets:
    out = []
    for t in cfg.targets:
        addrs: list[tuple[str, int]] = []
        for a in t.addresses:
            host, port = parse_hostport(a)
            try:
                addrs += resolve(host, port)
            except socket.gaierror as exc:
                raise InterceptError(f"target {t.name}: cannot resolve {host}: {exc.strerror}") from None
        out.append(Target(t.name, t.protocol, tuple(addrs)))
    return Targets(out)


def resolvers(cfg: HostAgentConfig) -> list[tuple[str, int]]:
    return [parse_hostport(d, 53) if ":" in d and not d.count(":") > 1 else (d, 53)
            for d in cfg.intercept.dns]


def collector_reachable(addr: CollectorAddress, timeout: float = 0.5) -> bool:
    chan = open_channel(addr)
    try:
        grpc.channel_ready_future(chan).result(timeout=timeout)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        chan.close()


def _child_setup(cgroup: Path, user: pwd.struct_passwd | None):
    libc = ctypes.CDLL(None, use_errno=True)

    def setup():
        (cgroup / "cgroup.procs").write_text(f"{os.getpid()}\n")
        for cap in DROPPED_CAPS:
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
        if user is not None:
            os.setgroups(os.getgrouplist(user.pw_name, user.pw_gid))
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
    return setup


async def run_enrolled(argv: list[str], cfg: HostAgentConfig, user: str | None = None,
                       mode: str | None = None) -> int:
    pw = None
    if user:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise InterceptError(f"no such user: {user}") from None
    root = cgroups.ensure_tree()
    if any(p.get("name", "").startswith("ag_") for p in attached(root)):
        raise InterceptError(f"the host agent's programs are attached to {root} but no host agent "
                             "answers: start agentgate-hostagent (or run `agentgate-hostagent "
                             "cleanup` to remove them)")
    targets = build_targets(cfg)
    group = uuid.uuid4().hex[:12]
    socks = bind_pair(0)
    port = socks[0].getsockname()[1]
    icpt = await asyncio.to_thread(Interceptor, port, mode=mode or cfg.intercept.mode)
    cg = cgroups.make_cgroup(root, f"run-{group}")
    mount = cgroups.cgroup2_mount()
    spool = embedded = shipper_task = proxy = None
    try:
        icpt.attach(cg)
        icpt.enroll(cgroups.cgroup_id(cg))
        icpt.set_targets(targets.addresses())
        icpt.set_resolvers(resolvers(cfg))
        spool = Spool(cfg.spool.dir, max_bytes=cfg.spool.max_bytes,
                      segment_bytes=cfg.spool.segment_bytes,
                      fsync_interval=cfg.spool.fsync_interval_ms / 1000, strict=cfg.spool.strict)
        address = cfg.collector
        if not await asyncio.to_thread(collector_reachable, address):
            embedded = await _embedded_collector()
            address = CollectorAddress(embedded.addresses[0])
        shipper = Shipper(spool, address)
        shipper_task = asyncio.create_task(shipper.run())
        loop = asyncio.get_running_loop()
        run_rec = SessionRecorder(spool)
        run_rec.record(SESSION_START, {
            "host": cfg.host, "target": argv[0], "protocol": "run", "session_group": group,
            "agent": f"{user or pwd.getpwuid(os.getuid()).pw_name} {shlex.join(argv)}",
            "process": {"argv": argv, "user": user, "cgroup": str(cg), "mode": icpt.mode}})

        def kernel_event(ev: KernelEvent) -> None:
            loop.call_soon_threadsafe(run_rec.record, ev.kind, {
                "pid": ev.pid, "uid": ev.uid, "comm": ev.comm, "filename": ev.filename,
                "address": ev.addr})
        icpt.start_events(kernel_event)
        proxy = Proxy(lookup=icpt.take_peer, identify=lambda r: identify(r, mount), spool=spool,
                      host=cfg.host, targets=targets, session_group=group)
        await proxy.listen(socks)
        try:
            proc = await asyncio.create_subprocess_exec(*argv, preexec_fn=_child_setup(cg, pw))
        except OSError as exc:
            run_rec.record(SESSION_END, {"reason": f"could not start: {exc.strerror}"})
            raise InterceptError(f"cannot run {argv[0]}: {exc.strerror}") from None
        rc = await proc.wait()
        rc = 128 - rc if rc < 0 else rc
        await asyncio.to_thread(cgroups.remove, cg)   # descendants left behind end with CMD
        await proxy.close()
        await asyncio.sleep(0.2)   # events the ring buffer still holds
        lost = icpt.lost_events()
        end = {"reason": "exited", "exit_code": rc, "refused_connections": proxy.refused}
        if lost:
            log.warning("%d kernel events were lost: the recording is incomplete", lost)
            end.update(incomplete=True, lost_events=lost)
        run_rec.record(SESSION_END, end)
        if not await shipper.drain(10):
            log.warning("the collector has not taken everything yet; it stays in the spool %s",
                        cfg.spool.dir)
        return rc
    finally:
        if shipper_task:
            shipper_task.cancel()
        if proxy:
            await proxy.close(0)
        icpt.close(detach=True)
        if cg.exists():
            await asyncio.to_thread(cgroups.remove, cg)
        if spool:
            spool.close()
        if embedded:
            await embedded.stop(0.5)


async def _embedded_collector():
    from collector.config import CollectorConfig
    from collector.server import Collector
    from collector.storage import open_storage
    cfg = CollectorConfig(listen="127.0.0.1:0")
    store = await asyncio.to_thread(open_storage, cfg.database)
    c = Collector(cfg, store)
    await c.start()
    log.info("no collector answered: recording to %s", cfg.database)
    return c
