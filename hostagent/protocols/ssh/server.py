"""One SSH connection: the agent's side (asyncssh server on the redirected socket), the
target's side (asyncssh client with the injected credentials), and what crosses.

The agent logs in with anything (the "none" method): who it is comes from the kernel,
and the account it acts as is the target's `user` or, without one, the name it gave;
that login is judged, then the proxy logs in to the target, verifying the target's
host key against the target's known_hosts. A refusal or failure at that point is said
to the agent in an SSH banner (OpenSSH prints it) and its login fails.

Channels: session channels are channels.AgentChannel; forwards (-L/-W, -R,
streamlocal) are judged here, refused with an SSH open failure that names the rule,
and once allowed, recorded as sessions of their own (relay.py). X11 and agent
forwarding are refused (asyncssh's options), as is any global request but keepalives.
"""
from __future__ import annotations

import asyncio
import fnmatch
import logging

import asyncssh

from agentgate.events import COMMAND
from hostagent.policy import decide
from hostagent.protocols.ssh.channels import AgentChannel
from hostagent.protocols.ssh.relay import End, Joint
from hostagent.protocols.ssh.requests import Who
from hostagent.recording.spool import SpoolError

log = logging.getLogger("agentgate.ssh")
# asyncssh says every channel request at INFO: our records say what matters
logging.getLogger("asyncssh").setLevel(logging.WARNING)
LOGIN_TIMEOUT = 120.0      # from connect to logged in (an approval of a login included)
MAX_CHANNELS = 64          # session channels open at once on one connection
PROHIBITED = asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
MAX_ENV, MAX_ENV_VALUE = 32, 4096      # variables a channel passes on, bytes each
THREAD_ABOVE = 2048                    # a command line this long is parsed in a thread


# asyncssh internals relied on (checked with 2.24): SSHServerConnection(loop, options,
# wait=), SSHServerConnectionOptions.construct and options.waiter (run_server's own
# steps, to feed early bytes), a server channel's _env and _process_env_request (env
# requests filtered as they come)
class _Primed(asyncssh.SSHServerConnection):
    """asyncssh's server connection, fed first the bytes the driver read before the
    session knew its protocol (the client's version line and KEXINIT may be among
    them: the event loop reads an accepted socket at once), in connection_made, so
    nothing read later can overtake them."""

    def __init__(self, loop, options, early: bytes):
        super().__init__(loop, options, wait="auth")
        self._early = early

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        early, self._early = self._early, b""
        if early:
            self.data_received(early)


async def _run_server(sock, early: bytes, **kw) -> asyncssh.SSHServerConnection:
    """asyncssh.run_server, with `early` fed first (see _Primed)."""
    loop = asyncio.get_running_loop()
    options = await asyncssh.SSHServerConnectionOptions.construct(None, **kw)
    options.waiter = loop.create_future()
    _, conn = await loop.create_connection(lambda: _Primed(loop, options, early), sock=sock)
    try:
        await options.waiter
    except BaseException:
        conn.abort()
        raise
    return conn


async def serve(ctx, wire) -> str:
    conn = Connection(ctx, wire)
    try:
        server = await _run_server(
            wire.sock, wire.early, server_factory=lambda: conn,
            server_host_keys=ctx.service.server_keys(),
            encoding=None, line_editor=False, allow_pty=True, agent_forwarding=False,
            x11_forwarding=False, login_timeout=LOGIN_TIMEOUT, server_version="agentgate",
            config=[], password_auth=False, kbdint_auth=False, public_key_auth=False,
            host_based_auth=False, gss_auth=False, gss_kex=False)
    except (asyncssh.Error, OSError, asyncio.TimeoutError, ConnectionError) as exc:
        conn.close_upstream()
        return conn.reason or f"SSH handshake with the agent failed: {exc or 'timeout'}"
    watchdog = asyncio.ensure_future(conn.watch_idle())
    try:
        await server.wait_closed()
    finally:
        watchdog.cancel()
        conn.close_upstream()
        await conn.drain()
    return conn.reason or "agent closed"


class Connection(asyncssh.SSHServer):
    def __init__(self, ctx, wire):
        self.ctx = ctx
        self.wire = wire
        self.opts = ctx.options
        self.conn = None
        self.upstream: asyncssh.SSHClientConnection | None = None
        self.who: Who | None = None
        self.reason = ""
        self.tasks: set[asyncio.Task] = set()
        self.last = asyncio.get_running_loop().time()   # the last byte either way
        self.holding = 0                                 # approvals awaited
        self.channels = 0                                # session channels open

    def touch(self) -> None:
        self.last = asyncio.get_running_loop().time()

    async def watch_idle(self) -> None:
        """The target's idle_timeout: no byte either way on any channel, and no
        approval awaited, for that long ends the connection."""
        timeout = self.ctx.target.idle_timeout
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(30.0, timeout / 4))
            if not self.holding and loop.time() - self.last > timeout:
                self.reason = f"idle for {timeout:g} s: session closed"
                if self.conn is not None:
                    self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, self.reason)
                return

    # ---------------------------------------------------------- services for channels

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("SSH channel task failed: %s", exc, exc_info=exc)
            self.fail(f"internal error: {exc}")

    async def drain(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    def open_recording(self, fields: dict):
        try:
            return self.wire.open_recording(fields)
        except SpoolError as exc:
            self.fail(f"recording failed: {exc}")
            raise

    def record(self, recorder, kind: str, fields: dict) -> None:
        """Record, or end the whole connection (fail closed) and raise SpoolError."""
        try:
            recorder.record(kind, fields)
        except SpoolError as exc:
            self.fail(f"recording failed: {exc}")
            raise

    def fail(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason
            log.error("ssh session %s: %s: closing it", self.wire.recorder.session_id, reason)
        if self.conn is not None:
            self.conn.abort()
        self.close_upstream()

    def close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.abort()

    async def judge(self, recorder, req, fields: dict, tell) -> tuple[bool, str]:
        """Decide, record the command with its decision, hold for approval if asked:
        (allowed, why not)."""
        d = decide(self.ctx.policy, req)
        self.record(recorder, COMMAND, {**fields, "decision": d.as_dict()})
        why = f"rule '{d.rule}': {d.reason}" if d.reason else f"rule '{d.rule}'"
        if d.action == "allow":
            return True, ""
        if d.action == "deny":
            return False, why

        def pending(ap):
            if tell is not None:
                from hostagent.approvals import when
                tell(f"agentgate: held for approval {ap.id} ({why}); expires "
                     f"{when(ap.expires_ns)}")
        self.holding += 1
        try:
            ok, why2 = await self.wire.approve(recorder, req.text, d.rule, d.reason, pending)
        except SpoolError as exc:
            self.fail(f"recording failed: {exc}")
            raise
        finally:
            self.holding -= 1
            self.touch()
        return ok, why2

    async def command(self, action: str, text: str, **kw):
        """who.command, off the event loop for a long text: parsing 64 KiB of shell
        takes bashlex most of a second, which every other session would wait for."""
        if len(text) > THREAD_ABOVE:
            return await asyncio.to_thread(self.who.command, action, text, **kw)
        return self.who.command(action, text, **kw)

    # ---------------------------------------------------------- login

    def connection_made(self, conn) -> None:
        self.conn = conn

    def connection_lost(self, exc) -> None:
        if exc and not self.reason:
            self.reason = f"agent connection lost: {exc}"
        self.close_upstream()

    async def begin_auth(self, username: str) -> bool:
        """False (no authentication needed) once the target accepted the proxy's login
        for this account; else a banner saying why, and every method fails."""
        if self.who is not None:
            return self.upstream is None
        remote = self.opts.user or username
        self.who = Who(self.ctx.target.name, dict(self.ctx.identity), remote)
        rec = self.wire.recorder
        ok, why = await self.judge(rec, self.who.login(),
                                   {"text": f"login as {remote}", "kind": "login",
                                    "remote_user": remote, "asked_user": username}, None)
        if not ok:
            return self._refuse(f"login as {remote} refused: {why}")
        try:
            sock = await self.wire.connect()
        except (OSError, asyncio.TimeoutError) as exc:
            return self._refuse(f"the target is unreachable: {exc or 'timeout'}")
        opts = self.opts
        try:
            self.upstream = await asyncssh.connect(
                sock=sock, host=self.ctx.target.names[0] if self.ctx.target.names
                else sock.getpeername()[0], port=sock.getpeername()[1], username=remote, known_hosts=opts._known_hosts,
                client_keys=[opts._client_key] if opts._client_key else [],
                password=opts._password, agent_path=None, config=[], gss_auth=False,
                gss_kex=False, kbdint_auth=False, host_based_auth=False,
                preferred_auth="publickey,password", encoding=None, connect_timeout=30)
        except asyncssh.HostKeyNotVerifiable as exc:
            sock.close()
            return self._refuse(f"the target's host key is not the one in its known_hosts "
                                f"({exc.reason}): refusing to log in to it", "host key")
        except asyncssh.PermissionDenied as exc:
            sock.close()
            return self._refuse(f"the target refused the proxy's credentials for {remote} "
                                f"({exc.reason})", "credentials")
        except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
            sock.close()
            return self._refuse(f"cannot log in to the target: {exc or 'timeout'}")
        key = self.upstream.get_server_host_key()
        self.record(rec, "auth", {"remote_user": remote, "asked_user": username,
                                  "method": "publickey" if opts._client_key else "password",
                                  "server_verified": "known_hosts",
                                  "server_key": key.get_fingerprint() if key else ""})
        return False

    def _refuse(self, message: str, what: str = "") -> bool:
        self.reason = message
        try:
            self.record(self.wire.recorder, "auth", {"refused": message})
        except SpoolError:
            pass
        log.warning("ssh session %s: %s", self.wire.recorder.session_id, message)
        if self.conn is not None:
            self.conn.send_auth_banner(f"agentgate: {message}\r\n")
        return True

    # ---------------------------------------------------------- channels

    def session_requested(self):
        if self.upstream is None:
            return False
        if self.channels >= MAX_CHANNELS:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_RESOURCE_SHORTAGE, f"agentgate: more than {MAX_CHANNELS} "
                                                 f"channels open on one connection")
        chan = self.conn.create_server_channel(encoding=None)
        chan._process_env_request = self._env_request(chan)
        self.channels += 1
        return chan, AgentChannel(self)

    def _env_request(self, chan):
        """`env` requests filtered as they come (asyncssh would keep every one, however
        many): what env_allow names, a bounded number of bounded values; the rest
        refused."""
        allow, kept = self.opts.env_allow, chan._env

        def handle(packet) -> bool:
            key, value = packet.get_string(), packet.get_string()
            packet.check_end()
            name = key.decode(errors="replace")
            if (len(kept) < MAX_ENV and len(value) <= MAX_ENV_VALUE
                    and any(fnmatch.fnmatchcase(name, p) for p in allow)):
                kept[key] = value
                return True
            return False
        return handle

    def _forward(self, kind: str, where: str, open_target):
        """Judge a forward; allowed: a coroutine opening it (its own recording)."""
        req, fields = self.who.forward(kind, where)
        d = decide(self.ctx.policy, req)
        try:
            self.record(self.wire.recorder, COMMAND, {**fields, "decision": d.as_dict()})
        except SpoolError:
            raise asyncssh.ChannelOpenError(PROHIBITED, "agentgate: recording failed") from None
        if d.action == "deny":
            raise asyncssh.ChannelOpenError(
                PROHIBITED, f"agentgate: {kind} to {where} refused by rule '{d.rule}': "
                            f"{d.reason}")

        async def opened():
            if d.action == "review":
                ok, why = await self.wire.approve(self.wire.recorder, req.text, d.rule, d.reason)
                if not ok:
                    raise asyncssh.ChannelOpenError(PROHIBITED, f"agentgate: {why}")
            joint, mine, theirs = self._joint({"forward": kind, "destination": where})
            try:
                await open_target(lambda: theirs)
            except asyncssh.ChannelOpenError as exc:
                joint.finish(f"the target refused: {exc.reason}")
                raise
            mine.join(theirs)
            return mine
        return opened()

    def _joint(self, fields: dict):
        """A forward's recording and its two ends: (joint, the agent's, the target's)."""
        recorder = self.open_recording({"channel": "forward", **fields,
                                        "remote_user": self.who.remote_user})
        joint = Joint(recorder, lambda exc: self.fail(f"recording failed: {exc}"), self.touch)
        return joint, End(joint, "in"), End(joint, "out")

    def connection_requested(self, dest_host, dest_port, orig_host, orig_port):
        if self.upstream is None:
            return False
        return self._forward("direct-tcpip", f"{dest_host}:{dest_port}",
                             lambda f: self.upstream.create_connection(
                                 f, dest_host, dest_port, orig_host, orig_port))

    def unix_connection_requested(self, dest_path):
        if self.upstream is None:
            return False
        return self._forward("direct-streamlocal", dest_path,
                             lambda f: self.upstream.create_unix_connection(f, dest_path))

    def _listener_allowed(self, kind: str, where: str) -> bool:
        """A listener on the target (-R): judged and recorded; it can't wait for a
        human, so only an allow opens it."""
        if self.upstream is None:
            return False
        req, fields = self.who.forward(kind, where)
        d = decide(self.ctx.policy, req)
        try:
            self.record(self.wire.recorder, COMMAND, {**fields, "decision": d.as_dict()})
        except SpoolError:
            return False
        return d.action == "allow"

    def _back(self, fields: dict, open_back):
        """A connection to a listener on the target: a forward of its own, opened back
        to the agent. Returns the target's end (asyncssh's session for it)."""
        joint, mine, theirs = self._joint(fields)

        async def back():
            try:
                await open_back(lambda: mine)
            except (asyncssh.Error, OSError) as exc:
                joint.finish(f"the agent refused: {exc}")
                return
            mine.join(theirs)
        self.spawn(back())
        return theirs

    def server_requested(self, listen_host, listen_port):
        """-R: a listener on the target; each connection to it is a forward of its own,
        opened back to the agent."""
        if not self._listener_allowed("tcpip-forward", f"{listen_host}:{listen_port}"):
            return False

        async def listen():
            listener = None

            def accepted(orig_host, orig_port):
                port = listener.get_port()
                return self._back(
                    {"forward": "forwarded-tcpip", "destination": f"{listen_host}:{port}",
                     "origin": f"{orig_host}:{orig_port}"},
                    lambda f: self.conn.create_connection(f, listen_host, port, orig_host,
                                                          orig_port))
            listener = await self.upstream.create_server(accepted, listen_host, listen_port)
            return listener
        return listen()

    def unix_server_requested(self, listen_path):
        if not self._listener_allowed("streamlocal-forward", listen_path):
            return False

        async def listen():
            def accepted():
                return self._back(
                    {"forward": "forwarded-streamlocal", "destination": listen_path},
                    lambda f: self.conn.create_unix_connection(f, listen_path))
            return await self.upstream.create_unix_server(accepted, listen_path)
        return listen()
