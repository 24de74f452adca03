"""`agentgate run -- CMD`: run CMD as an enrolled agent and return its exit code.

With a host agent daemon answering on its control socket, the daemon enrolls CMD. With
none, the whole stack runs in this process for the duration of CMD: BPF programs on the
run's own cgroup, the proxy, the spool, and a collector (the configured one if it
answers, else one embedded on the default SQLite database).
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import pwd
import signal
import subprocess
from pathlib import Path


from agentgate.client import CollectorAddress, answers, open_channel
from hostagent.config import HostAgentConfig
from hostagent.control import ControlError, DaemonClient
from hostagent.intercept import cgroups, seccomp, unixguard
from hostagent.intercept.loader import InterceptError, attached, pinned_map_ids, uses
from hostagent.recording.runs import RunSession, new_group
from hostagent.stack import Stack, agent_env, open_spool, run_loop

log = logging.getLogger("agentgate.run")

# Capabilities an agent run as root loses: raw/packet sockets, network admin, BPF,
# tracing, modules, ptrace, raw I/O. No new privileges for anyone: a setuid binary or
# sudo must not turn an agent into root (root may leave the tree).
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWCGROUP = 0x02000000
DROPPED_CAPS = (12, 13, 16, 17, 19, 21, 38, 39)  # NET_ADMIN NET_RAW SYS_MODULE SYS_RAWIO
                                                 # SYS_PTRACE SYS_ADMIN PERFMON BPF
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _lookup_user(user: str | None):
    if not user:
        return None
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise InterceptError(f"no such user: {user}") from None


@contextlib.contextmanager
def _no_gc():
    """No garbage collection in a forked child before it execs: a collection there
    may finalize gRPC's objects, whose finalizers join threads the child doesn't have
    (it spins forever). subprocess does the same around its preexec_fn; uvloop's
    spawn doesn't. The child inherits the disabled collector."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _unix_plan(cfg: HostAgentConfig, hooks: bool,
               proxies: tuple[str, ...] = ()) -> unixguard.UnixPlan:
    """`hooks`: the BPF unix-socket hooks are attached (they judge abstract names too);
    `proxies`: the proxy's sockets for targets' unix paths, where the hooks send those
    connects (not covered)."""
    allowed = cfg.intercept.abstract_unix == "allow"
    plan = unixguard.plan(unixguard.unix_allowed(cfg) + tuple(proxies),
                          abstract_allowed=allowed, hooks=hooks)
    if not allowed and not plan.scope_abstract and not hooks:
        # fail closed: a gap is accepted only in so many words
        raise InterceptError("abstract unix sockets can't be guarded on this kernel (neither "
                             "the BPF unix-socket hooks, 6.7+, nor Landlock scoping, 6.12+); "
                             "to run agents anyway, accept that gap with [intercept] "
                             "abstract_unix = \"allow\"")
    return plan


def _die(what: bytes) -> None:
    """In the child before exec: say why CMD won't run (errno's name), and exit 126."""
    err = ctypes.get_errno()
    os.write(2, b"agentgate run: %s (%s): not running the agent unguarded\n"
             % (what, os.strerror(err).encode() if err else b"?"))
    os._exit(126)


def _child_setup(user, cgroup: Path | None = None, gate: int | None = None,
                 unix: unixguard.UnixPlan | None = None):
    """Runs in the child between fork and exec: enter the cgroup (or wait until the daemon
    has moved us), drop capabilities, become the user. Nothing runs unenrolled."""
    libc = ctypes.CDLL(None, use_errno=True)
    # Everything that may take a lock is done here, before fork: the child of a
    # threaded parent (gRPC, the fsync thread) deadlocks on a lock another thread held
    # at fork time, e.g. NSS's in getgrouplist.
    groups = os.getgrouplist(user.pw_name, user.pw_gid) if user is not None else None
    procs = str(cgroup / "cgroup.procs") if cgroup is not None else None
    root_agent = os.geteuid() == 0 and (user is None or user.pw_uid == 0)
    mount = str(cgroups.cgroup2_mount()).encode()
    filt = seccomp.prepare()

    def setup():
        if procs is not None:
            fd = os.open(procs, os.O_WRONLY)
            os.write(fd, b"%d\n" % os.getpid())
            os.close(fd)
        if gate is not None:
            if os.read(gate, 1) != b"1":
                os._exit(126)   # the daemon did not enroll us: never run unmonitored
            os.close(gate)
        own = None
        if root_agent:   # where the daemon put us (or we went), before the namespace hides it
            fd = os.open("/proc/self/cgroup", os.O_RDONLY)
            text = os.read(fd, 4096)
            os.close(fd)
            line = next((x for x in text.split(b"\n") if x.startswith(b"0::")), b"0::/")
            own = mount + line[3:]
        # The run's cgroup becomes the root of a cgroup namespace of its own: no cgroup
        # outside it can be named or moved into, by root either (writing an outside
        # cgroup.procs fails with ENOENT); leaving the namespace, or mounting another
        # cgroup2, needs CAP_SYS_ADMIN, dropped next.
        if libc.unshare(CLONE_NEWCGROUP) != 0:
            _die(b"cannot make a cgroup namespace")
        # unix sockets the policy doesn't allow covered (needs CAP_SYS_ADMIN, dropped next)
        if unix is not None and not unixguard.apply(unix, libc, own):
            _die(b"cannot set up the mount namespace (unix sockets, read-only /sys)")
        if gate is not None:
            # nothing of the caller's reaches CMD but the standard streams: a descriptor
            # opened outside (a cgroup.procs, a socket) is a way out
            os.closerange(3, 1 << 16)
        if os.geteuid() == 0:
            for cap in DROPPED_CAPS:
                if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                    _die(b"cannot drop capabilities")
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            _die(b"cannot set no_new_privs")
        # no user namespace of its own, none entered: where a mount of its own could
        # re-point a path the unix-socket hook judges as written (seccomp.py)
        if filt is None or not seccomp.install(filt, libc):
            _die(b"cannot install the seccomp filter against user namespaces")
        if unix is not None and unix.scope_abstract and not unixguard.restrict_abstract(libc):
            _die(b"cannot scope abstract unix sockets (Landlock)")
        if user is not None:
            os.setgroups(groups)
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
    return setup


def run_command(argv: list[str], cfg: HostAgentConfig, user: str | None = None,
                mode: str | None = None) -> int:
    pw = _lookup_user(user)
    try:
        client = DaemonClient.connect(cfg.intercept.socket)
    except ControlError as exc:
        raise InterceptError(str(exc)) from None
    if (pw is None or pw.pw_uid == 0) and os.geteuid() == 0 and not cgroups.ensure_nsdelegate():
        # a root agent is kept in its cgroup by a cgroup namespace, which holds only where
        # namespaces are delegation boundaries: without it, root could leave the tree
        raise InterceptError("cannot keep a root agent in its cgroup: the cgroup v2 mount "
                             "lacks nsdelegate and can't be remounted with it; run the agent "
                             "as a user of its own (--user)")
    if client is not None:
        if mode:
            raise InterceptError("--mode is the daemon's to set when a host agent is running")
        hello = client.call("hello")
        plan = _unix_plan(cfg, bool(hello.get("unix_hooks")),
                          tuple(hello.get("unix_proxies") or ()))
        return _run_via_daemon(client, argv, pw, plan, env=hello.get("env") or {})
    if os.geteuid() != 0:
        raise InterceptError("no host agent is running, and running one in-process needs root")
    return run_loop(_run_in_process(argv, cfg, pw, mode))


def _run_via_daemon(client: DaemonClient, argv: list[str], pw,
                    unix: unixguard.UnixPlan, env: dict[str, str]) -> int:
    # Fork by hand: the child must wait, before exec, until the daemon has moved it into
    # its cgroup, and subprocess.Popen returns only after the exec.
    r, w = os.pipe()
    if os.geteuid() != 0:
        # covering sockets takes a mount namespace, which an unprivileged caller can't
        # make: only Landlock's scope of abstract sockets applies
        unix = unixguard.UnixPlan(
            (), (), unix.scope_abstract, hooks=unix.hooks,
            gap="no mount namespace (the run was not started by root): a pathname socket is "
                "judged by the path the agent gives" if unix.hooks else
                "pathname sockets unguarded: the run was not started by root")
    setup = _child_setup(pw, gate=r, unix=unix)   # before fork (see _child_setup)
    gc_enabled = gc.isenabled()
    gc.disable()   # in the child until exec (see _no_gc)
    pid = os.fork()
    if pid != 0 and gc_enabled:
        gc.enable()
    if pid == 0:
        try:
            os.close(w)
            setup()
            os.execvpe(argv[0], argv, {**os.environ, **env})
        except OSError as exc:
            os.write(2, f"agentgate run: cannot run {argv[0]}: {exc.strerror}\n".encode())
            os._exit(127)
        finally:
            os._exit(126)
    os.close(r)
    try:
        reply = client.call("enroll", pid=pid, argv=argv, user=pw.pw_name if pw else None,
                            unix=unix.record())
    except (ControlError, OSError) as exc:
        os.close(w)      # the child exits 126 without running CMD
        os.waitpid(pid, 0)
        raise InterceptError(f"the host agent refused to enroll: {exc}") from None
    os.write(w, b"1")
    os.close(w)
    # Signals meant for the run go to CMD; we wait for it to exit and report that.
    for sig in FORWARDED:
        signal.signal(sig, lambda n, _f: os.kill(pid, n))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    rc = os.waitstatus_to_exitcode(status)
    rc = exit_code(rc)
    try:
        client.call("finish", group=reply["group"], exit_code=rc)
    except (ControlError, OSError) as exc:
        log.warning("could not tell the host agent the run ended: %s", exc)
    finally:
        client.close()
    return rc


def _collector_answers(addr: CollectorAddress, timeout: float = 0.5) -> bool:
    chan = open_channel(addr)
    try:
        return answers(chan, timeout)
    finally:
        chan.close()


async def _run_in_process(argv: list[str], cfg: HostAgentConfig, pw, mode: str | None) -> int:
    root = cgroups.ensure_tree(cfg.intercept.tree)
    # (a daemon enrolling units or cgroups has them on the cgroup2 root, using its maps)
    owner = pinned_map_ids(Path("/sys/fs/bpf") / cfg.intercept.tree)
    if any(p.get("name", "").startswith("ag_") for p in attached(root)) or (owner and any(
            p.get("name", "").startswith("ag_") and uses(p["id"], owner)
            for p in attached(cgroups.cgroup2_mount()))):
        raise InterceptError(f"the host agent's programs are attached to {root} but no host agent "
                             "answers: start agentgate-hostagent (or remove them with "
                             "`agentgate-hostagent cleanup`)")
    group = new_group()
    spool = await asyncio.to_thread(open_spool, cfg)
    stack = Stack(cfg, spool)
    cg = None
    embedded = None
    try:
        address = cfg.collector
        # With no collector configured and none answering at the default address, record
        # into the local store. A configured collector is waited for: the spool keeps
        # everything until it (or the host agent, later) ships it.
        if not cfg.collector_configured and not await asyncio.to_thread(_collector_answers,
                                                                         address):
            embedded = await _embedded_collector(Path(cfg.state_dir))
            address = CollectorAddress(embedded.addresses[0])
        shipper = stack.ship_to(address)
        mode = mode or cfg.intercept.mode
        run = None
        await stack.intercept(port=0, mode=mode,
                              pin_dir=Path("/sys/fs/bpf") / f"{cfg.intercept.tree}-run-{group}",
                              session_group=group, on_event=lambda ev: run and run.event(ev))
        # refused before anything starts
        unix = await asyncio.to_thread(_unix_plan, cfg, bool(stack.icpt.unix_progs),
                                       tuple(stack.unix_proxies))
        cg = cgroups.make_cgroup(root, f"run-{group}")
        stack.icpt.attach(cg)
        cgid = cgroups.cgroup_id(cg)
        run = RunSession(spool, host=cfg.host, argv=argv, user=pw.pw_name if pw else None,
                         cgroup=cg, group=group, mode=mode)
        run.rec.record("unix_guard", unix.record())
        try:
            with _no_gc():
                proc = await asyncio.create_subprocess_exec(
                    *argv, preexec_fn=_child_setup(pw, cg, unix=unix),
                    env={**os.environ, **agent_env(stack.proxy.ca, stack.services)})
        except (OSError, subprocess.SubprocessError) as exc:
            why = getattr(exc, "strerror", None) or str(exc)
            run.end(None, reason=f"could not start: {why}")
            raise InterceptError(f"cannot run {argv[0]}: {why}") from None
        loop = asyncio.get_running_loop()
        for sig in FORWARDED:   # for CMD; we wait for it to exit and report that
            loop.add_signal_handler(sig, proc.send_signal, sig)
        rc = exit_code(await proc.wait())
        await asyncio.to_thread(cgroups.remove, cg)   # what CMD left behind ends with it
        await stack.proxy.close()
        await asyncio.sleep(0.1)                      # the last events in the ring buffer
        # This proxy served this run alone: every refusal it counted is the run's.
        run.end(rc, lost=stack.icpt.lost_events(), refused=stack.proxy.refused,
                suppressed=stack.icpt.suppressed(cgid))
        if not await shipper.drain(10):
            log.warning("the collector %s has not taken everything; it stays in the spool %s "
                        "for the host agent (or the next run) to ship", address.target,
                        cfg.spool.dir)
        return rc
    finally:
        # Whatever happened: nothing of CMD may outlive the programs watching it.
        stuck = False
        if cg is not None and cg.exists():
            try:
                await asyncio.to_thread(cgroups.remove, cg)
            except cgroups.CgroupError as exc:
                log.error("%s: leaving the programs attached (fail closed)", exc)
                stuck = True
        await stack.close(detach=not stuck, unpin=not stuck, grace=0)
        spool.close()
        if embedded:
            await embedded.stop(0.5)


async def _embedded_collector(state_dir: Path):
    """On a unix socket in a 0700 directory: in open mode every caller is admin, so no
    other local user (the agent included) may reach it."""
    from agentgate.tomlconfig import private_dir
    from collector.config import CollectorConfig
    from collector.server import start_collector
    sock = private_dir(state_dir / "run") / f"collector-{os.getpid()}.sock"
    sock.unlink(missing_ok=True)
    c = await start_collector(CollectorConfig(listen=f"unix:{sock}"))
    log.info("no collector answered: recording to %s", c.cfg.database)
    return c
