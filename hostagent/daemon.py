"""The host agent daemon: spool + shipper + heartbeat, and (as root, unless disabled)
interception on the agentgate cgroup tree with the proxy and the control socket."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import resource
import signal
import subprocess
from pathlib import Path

from agentgate.cli.output import fmt_bytes
from hostagent import control
from hostagent.config import HostAgentConfig
from hostagent.intercept import cgroups, unixguard
from hostagent.intercept.loader import InterceptError, detach_ours, preflight
from hostagent.recording.recorder import close_orphans
from hostagent.recording.spool import SpoolError
from hostagent.recording.runs import RunSession, Runs, new_group
from hostagent.registration import heartbeat_loop
from hostagent.stack import Stack, agent_env, open_spool

log = logging.getLogger("agentgate.hostagent")
BPFFS = Path("/sys/fs/bpf")


class Daemon:
    """Also the control socket's Handler: control.serve_client checks who asks, the
    daemon enrolls and finishes."""

    refusals = (cgroups.CgroupError, SpoolError)

    def __init__(self, cfg: HostAgentConfig):
        self.cfg = cfg
        self.runs = Runs()
        self.stack: Stack | None = None
        self.root: Path | None = None
        self.control: asyncio.AbstractServer | None = None
        self.matched: Path | None = None
        self.groups: dict[str, tuple[Path, int]] = {}   # run -> (cgroup, id)
        self._lost_logged = 0
        self._enrolled: dict[str, int | None] = {}   # unit/cgroup -> its cgroup id now
        self._watched: list[str] = []

    async def start(self) -> None:
        cfg = self.cfg
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:   # every proxied connection is two fds: don't run out at 1024
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if cfg.intercept.enabled:
            preflight()   # refuse before anything starts: never half up, never unmonitored
        spool = await asyncio.to_thread(open_spool, cfg)
        self.stack = Stack(cfg, spool)
        self.stack.ship_to(cfg.collector)   # first: a full spool must drain whatever else fails
        orphans = close_orphans(spool)
        if orphans:
            log.warning("closed %d session(s) left open by the previous run", len(orphans))
        caps = ["recording"]
        if cfg.intercept.enabled:
            await self._intercept()
            caps.append("intercept")
        if await self.stack.listen_plain():
            caps.append("listeners")
        self.stack._tasks.append(asyncio.create_task(
            heartbeat_loop(cfg.collector, cfg.host, cfg.state_dir, spool, capabilities=caps,
                           lost_events=self._lost_events)))
        # Said once up: a daemon refusing to start says just why.
        log.info("spool %s: %s in %d segment(s) to ship", cfg.spool.dir,
                 fmt_bytes(spool.bytes_used()), spool.segment_count())

    async def _intercept(self) -> None:
        cfg = self.cfg.intercept
        self.root = cgroups.ensure_tree(cfg.tree)
        with _refuse_unbindable(f"proxy port {cfg.proxy_port}", "intercept.proxy_port"):
            await self.stack.intercept(port=cfg.proxy_port, mode=cfg.mode,
                                       pin_dir=BPFFS / cfg.tree, on_event=self._kernel_event)
        icpt = self.stack.icpt
        if (cfg.units or cfg.cgroups or cfg.uids or cfg.exes) and not icpt.unix_progs:
            # `agentgate run` has a mount namespace and Landlock; these have nothing else
            if cfg.unix_unguarded != "accept":
                raise InterceptError(
                    f"the unix sockets of enrolled units, cgroups, uids and exes can't be "
                    f"guarded here ({icpt.unix_error}); to enroll them anyway, accept that "
                    f"gap with [intercept] unix_unguarded = \"accept\"")
            log.warning("the unix sockets of enrolled units, cgroups, uids and exes are not "
                        "guarded (%s): accepted by unix_unguarded", icpt.unix_error)
        if cfg.uids or cfg.exes:
            self.matched = cgroups.tree_root(cfg.tree) / "matched"
            self.matched.mkdir(exist_ok=True)
            ino = cgroups.cgroup_id(self.matched)
            icpt.enroll(ino)
            icpt.watch_all_execs(cfg.uids, cfg.exes)
            # what processes enrolled on exec do is recorded as one run's
            self._enrolled["matched"] = ino
            self._start_enrolled("processes enrolled by uid or executable", self.matched, ino)
        # Attaching replaces programs an earlier run left: never a moment unguarded.
        # Units and cgroups outside the tree need them on the cgroup2 root, which holds
        # the tree too: then there alone (twice, a rewritten unix connect would be
        # judged again as what it was rewritten to).
        mount = cgroups.cgroup2_mount()
        where, other = (mount, self.root) if cfg.units or cfg.cgroups else (self.root, mount)
        icpt.attach(where, enroll=where == self.root)
        icpt.enroll(cgroups.cgroup_id(self.root))
        detach_ours(other, owner=icpt.owner)   # left by an earlier run otherwise set up
        icpt.clear_records()
        if cfg.units:
            self._unit_dropins(icpt.pin_programs(BPFFS / cfg.tree / "progs"))
        if cfg.units or cfg.cgroups:
            self._attach_enrolled()
            self.stack._tasks.append(asyncio.create_task(self._watch_enrolled()))
        for existing in self.root.iterdir():
            if existing.is_dir():   # sessions of a previous run that are still going
                icpt.enroll(cgroups.cgroup_id(existing))
        sock = Path(cfg.socket)
        sock.parent.mkdir(parents=True, exist_ok=True)
        sock.unlink(missing_ok=True)
        umask = os.umask(0o177)   # born root-only: no moment where others may connect
        try:
            self.control = await asyncio.start_unix_server(
                lambda r, w: control.serve_client(r, w, self), path=str(sock))
        finally:
            os.umask(umask)
        os.chmod(sock, 0o660 if cfg.socket_group else 0o600)
        if cfg.socket_group:
            os.chown(sock, 0, grp.getgrnam(cfg.socket_group).gr_gid)
        log.info("intercepting cgroup tree %s (mode %s); proxy on port %d; control socket %s; "
                 "unix sockets: %s", self.root, cfg.mode, icpt.proxy_port, sock,
                 "BPF hooks" if icpt.unix_progs else f"no BPF hooks ({icpt.unix_error})")

    def _unit_dropins(self, pins: dict[str, Path]) -> None:
        """A drop-in per enrolled unit naming the pinned programs (BPFProgram=): systemd
        attaches them to the unit's cgroup when it makes it (besides the kernel's watch
        on its path, which enrolls it)."""
        cfg = self.cfg.intercept
        systemd = Path("/run/systemd/system").is_dir()   # booted with systemd
        where = Path(cfg.unit_dropin_dir) if cfg.unit_dropin_dir else (
            Path("/run/systemd/system") if systemd else None)
        if where is None:
            log.info("systemd is not running: no BPFProgram= drop-ins (the kernel enrolls a "
                     "restarted unit's new cgroup as it is made)")
            return
        # (the proxy's sockets for targets' unix paths are where the hook sends them)
        unix = unixguard.plan(unixguard.unix_allowed(self.cfg) + tuple(self.stack.unix_proxies))
        text = dropin_text(pins, unix.hidden)
        for unit in cfg.units:
            d = where / f"{unit}.d"
            d.mkdir(parents=True, exist_ok=True)
            (d / "50-agentgate.conf").write_text(text)
        if systemd and not cfg.unit_dropin_dir:
            r = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True)
            if r.returncode != 0:
                log.error("systemctl daemon-reload failed: %s", r.stderr.strip())
        log.info("BPFProgram= drop-ins for %s in %s", ", ".join(cfg.units), where)

    def _enrolled_paths(self) -> list[tuple[str, Path]]:
        """Each enrolled unit's or cgroup's path (a unit not loaded yet: where systemd
        puts a system service)."""
        cfg = self.cfg.intercept
        mount = cgroups.cgroup2_mount()
        out: list[tuple[str, Path]] = []
        for unit in cfg.units:
            try:
                out.append((unit, cgroups.unit_cgroup(unit)))
            except cgroups.CgroupError:
                out.append((unit, mount / "system.slice" / unit))
        out += [(c, mount / c.lstrip("/")) for c in cfg.cgroups]
        return out

    def _attach_enrolled(self) -> None:
        """The programs are on the cgroup2 root (_intercept), where they act on enrolled
        processes alone, and the kernel enrolls each watched cgroup whenever it is made
        (a restarted unit or container gets a new one): guarded from its first
        instruction, systemd or not, whatever becomes of the slices above it. Here:
        watch the paths, and say when a cgroup is new."""
        icpt = self.stack.icpt
        paths = self._enrolled_paths()
        mount = cgroups.cgroup2_mount()
        watched = sorted({"/" + str(p.relative_to(mount)) for _, p in paths})
        if watched != self._watched:
            icpt.watch(watched)
            self._watched = watched
        for name, path in paths:
            try:
                ino = cgroups.cgroup_id(path)
            except OSError:
                ino = None
            if ino is None:
                if self._enrolled.get(name, 0) is not None:
                    log.warning("enrolled %s has no cgroup now; it is enrolled when made", name)
                    self._end_enrolled(self._enrolled.get(name), "its cgroup is gone")
                self._enrolled[name] = None
                continue
            if self._enrolled.get(name) == ino:
                continue
            icpt.enroll(ino)    # the kernel did, if it was made while we watched
            old = self._enrolled.get(name)
            if old:
                icpt.unenroll(old)
                self._end_enrolled(old, "its cgroup was made anew (a restart)")
            self._enrolled[name] = ino
            self._start_enrolled(name, path, ino)
            log.info("enrolled %s (cgroup %s)", name, path)

    def _start_enrolled(self, name: str, path: Path, ino: int) -> None:
        """An enrolled unit's or cgroup's own recording, one per cgroup it gets: what it
        exec'd and what the guard refused it, as a run's."""
        icpt = self.stack.icpt
        try:
            run = RunSession(self.stack.spool, host=self.cfg.host, argv=[name], user=None,
                             cgroup=path, group=new_group(), mode=icpt.mode,
                             requested_by="enrolled by the host agent's config")
            run.rec.record("unix_guard", {
                "connect": "judged by the BPF unix-socket hooks (refused: EPERM, recorded)"
                if icpt.unix_progs else f"not guarded: {icpt.unix_error}"})
        except SpoolError as exc:
            log.error("cannot record enrolled %s: %s", name, exc)
            return
        self.runs.add(ino, run)

    def _end_enrolled(self, ino: int | None, reason: str) -> None:
        run = self.runs.pop(ino) if ino else None
        if run is not None:
            try:
                run.end(None, reason=reason, lost=self.stack.icpt.lost_events(),
                        suppressed=self.stack.icpt.suppressed(ino))
            except SpoolError as exc:
                log.error("cannot record the end of an enrolled cgroup's run: %s", exc)

    async def _watch_enrolled(self, period: float = 0.5) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                self._attach_enrolled()
            except Exception as exc:   # keep watching: the next round may succeed
                log.error("re-attaching enrolled cgroups: %s", exc)

    def _lost_events(self) -> int:
        lost = self.stack.icpt.lost_events() if self.stack and self.stack.icpt else 0
        if lost > self._lost_logged:
            log.warning("%d kernel events lost so far (ring buffer full): recordings of the "
                        "affected runs are flagged incomplete", lost)
            self._lost_logged = lost
        return lost

    def _kernel_event(self, ev) -> None:
        if ev.kind != "exec_outside":
            self.runs.on_event(ev)
            return
        cfg = self.cfg.intercept
        if not ev.stopped:
            # Not stopped by the kernel (e.g. a relative path): matched here, after the
            # exec; what it does before it is moved is not intercepted (README).
            try:
                exe = os.path.realpath(f"/proc/{ev.pid}/exe")
            except OSError:
                return
            if ev.uid not in cfg.uids and exe not in cfg.exes:
                return
        try:
            cgroups.move(ev.pid, self.matched)
            log.info("enrolled pid %d (%s, uid %d) on exec", ev.pid, ev.filename, ev.uid)
        except cgroups.CgroupError as exc:
            log.warning("could not enroll pid %d on exec (left stopped): %s", ev.pid, exc)
            return
        if ev.stopped:
            try:
                os.kill(ev.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def hello(self) -> dict:
        icpt = self.stack.icpt
        return {"proxy_port": icpt.proxy_port, "tree": str(self.root), "mode": icpt.mode,
                "unix_hooks": bool(icpt.unix_progs), "unix_proxies": self.stack.unix_proxies,
                "env": agent_env(self.stack.proxy.ca if self.stack.proxy else None,
                                 self.stack.services)}

    async def enroll(self, pid: int, *, argv: list[str], user: str | None,
                     requested_by: str, unix: dict | None = None) -> dict:
        icpt = self.stack.icpt
        group = new_group()
        cg = cgroups.make_cgroup(self.root, f"run-{group}")
        cgid = cgroups.cgroup_id(cg)
        icpt.enroll(cgid)
        try:
            run = RunSession(self.stack.spool, host=self.cfg.host, argv=argv, user=user,
                             cgroup=cg, group=group, mode=icpt.mode, requested_by=requested_by)
            run.rec.record("unix_guard", unix or {"abstract": "unknown", "hidden": [],
                                                  "note": "the caller said nothing"})
            cgroups.move(pid, cg)
        except (cgroups.CgroupError, SpoolError):
            icpt.unenroll(cgid)
            await asyncio.to_thread(cgroups.remove, cg)
            raise
        self.runs.add(cgid, run)
        self.groups[group] = (cg, cgid)
        return {"group": group, "cgroup": str(cg)}

    async def finish(self, group: str, exit_code: int | None, reason: str) -> None:
        if (entry := self.groups.pop(group, None)) is None:
            return   # ended already: a run may be finished and then hung up on
        cg, cgid = entry
        await asyncio.to_thread(cgroups.remove, cg)
        self.stack.icpt.unenroll(cgid)
        run = self.runs.pop(cgid)
        if run:
            await asyncio.sleep(0.1)   # let the ring buffer hand over the last events
            # The proxy serves every run: only a count it can attribute is this run's.
            refused_for = getattr(self.stack.proxy, "refused_for", None)
            try:
                run.end(exit_code, reason=reason, lost=self.stack.icpt.lost_events(),
                        suppressed=self.stack.icpt.suppressed(cgid),
                        refused=refused_for(str(cg)) if refused_for else None)
            except SpoolError as exc:
                log.error("cannot record the end of run %s: %s", group, exc)

    async def stop(self) -> None:
        if self.control:
            self.control.close()
        for ino in list(self._enrolled.values()):
            self._end_enrolled(ino, "the host agent stopped")
        if self.stack and self.stack.shipper:
            await self.stack.shipper.drain(5.0)
        if self.stack:
            # Programs stay attached: with the daemon gone, enrolled connects fail (fail
            # closed) until it is back. `agentgate-hostagent cleanup` removes them.
            await self.stack.close(detach=False)
            self.stack.spool.close()


@contextlib.contextmanager
def _refuse_unbindable(what: str, setting: str):
    """A port we can't have is a one-line refusal naming it. Any other OSError goes on as
    it is, not misread as this one (a file's error names its file, a bind's none)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EACCES) or exc.filename is not None:
            raise
        if exc.errno == errno.EADDRINUSE:
            why = f"is taken ({os.strerror(exc.errno)}): free it or change {setting}"
        else:
            why = f"cannot be bound ({os.strerror(exc.errno)}): change {setting}"
        raise InterceptError(f"{what} {why}") from None


async def serve(cfg: HostAgentConfig) -> None:
    daemon = Daemon(cfg)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await daemon.start()
        await stopping.wait()
        log.info("stopping")
    finally:
        await daemon.stop()


def dropin_text(pins: dict[str, Path], hidden: tuple[str, ...] = ()) -> str:
    """The unit's cgroup gets agentgate's programs when systemd makes it; its processes
    can't move out of it (cgroups read-only) and don't reach the unix sockets bound when
    the host agent started that the policy doesn't allow."""
    lines = ["# Written by agentgate-hostagent: the unit's cgroup gets agentgate's programs",
             "# when systemd makes it (no unguarded moment when the unit restarts).",
             "[Service]"]
    lines += [f"BPFProgram={kind}:{path}" for kind, path in sorted(pins.items())]
    lines.append("ProtectControlGroups=yes")
    # in a user namespace of its own a process could mount over paths the unix-socket
    # hook judges as written (as `agentgate run`'s seccomp filter refuses)
    lines.append("RestrictNamespaces=~user")
    lines += [f"InaccessiblePaths=-{path}" for path in hidden]
    return "\n".join(lines) + "\n"
