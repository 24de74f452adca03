"""A session channel (exec, shell, subsystem) between the agent and the target.

Nothing of a channel reaches the target before it is judged: the exec command, the
shell, the subsystem; then, as they come, lines typed into a shell (or fed on stdin to
a command that reads its commands from there, `ssh host sh < script`) and SFTP
operations. What the agent sends is handled in order by one task (`_pump`), which may
wait for an approval while the agent's further input waits behind it (its reading
paused past a bound: memory stays bounded). What the target sends is passed on as it
comes. Every byte of exec and shell channels is recorded both ways with its timing,
before it is passed on; SFTP channels are recorded per operation and per file.
"""
from __future__ import annotations

import asyncio
import logging
import re

import asyncssh

from agentgate.events import DATA, OUTPUT, SESSION_END
from hostagent.protocols.api import ProtocolError
from hostagent.protocols.ssh.commands import reads_commands_from_stdin
from hostagent.protocols.ssh.lines import Line, LineTracker
from hostagent.protocols.ssh.sftp import SftpStream
from hostagent.recording.spool import SpoolError

log = logging.getLogger("agentgate.ssh")
QUEUE_HIGH, QUEUE_LOW = 1 << 20, 256 << 10   # agent input waiting: pause, resume reading
MAX_REFUSALS = 100                           # refused lines or operations on one channel
# The pty modes passed on to the target: output processing, character size, speeds,
# UTF-8. The others (special characters such as kill and erase, canonical mode, echo,
# input mapping) would make the remote terminal read keys otherwise than the line
# tracker does: the target's defaults stand for them.
SAFE_MODES = frozenset((42, 70, 71, 72, 73, 74, 75, 90, 91, 92, 93, 128, 129))
TERM_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
STDERR = asyncssh.EXTENDED_DATA_STDERR
EOF = object()


class Refused(Exception):
    """The channel's opening request was refused (already recorded and told)."""


class AgentChannel(asyncssh.SSHServerSession):
    def __init__(self, conn):
        self.conn = conn                   # server.Connection
        self.chan = None
        self.up = None                     # the target's channel, once open
        self.kind = ""
        self.command = ""
        self.subsystem = ""
        self.term = None                   # (type, (cols, rows, px, py), modes)
        self.recorder = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.queued = 0
        self.paused = False
        self.writable = asyncio.Event()      # the target's side takes more
        self.writable.set()
        self.agent_writable = asyncio.Event()    # the agent reads what we send it
        self.agent_writable.set()
        self.refusals = 0
        self.lines: LineTracker | None = None
        self.sftp: SftpStream | None = None
        self.exit = None                   # ("status", n) | ("signal", name, core, msg)
        self.ended = False
        self.counts = {"bytes_in": 0, "bytes_out": 0}
        self.task: asyncio.Task | None = None    # _run: judging, approvals, the pump

    # ---------------------------------------------------------- the agent's requests

    def connection_made(self, chan) -> None:
        self.chan = chan

    def pty_requested(self, term_type, term_size, term_modes) -> bool:
        # (the type reaches the remote shell as $TERM: a name, not a payload)
        if not TERM_TYPE.fullmatch(term_type or ""):
            return False
        self.term = (term_type, term_size, term_modes)
        return True

    def shell_requested(self) -> bool:
        self.kind = "shell"
        return True

    def exec_requested(self, command: str) -> bool:
        self.kind, self.command = "exec", command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        self.kind, self.subsystem = "subsystem", subsystem
        return True

    def session_started(self) -> None:
        self.task = self.conn.spawn(self._run())

    # ---------------------------------------------------------- the agent's input

    def data_received(self, data: bytes, datatype) -> None:
        self.conn.touch()
        self.queue.put_nowait(bytes(data))
        self.queued += len(data)
        if self.queued > QUEUE_HIGH and not self.paused:
            self.paused = True
            self.chan.pause_reading()

    def eof_received(self) -> bool:
        self.queue.put_nowait(EOF)
        return True      # half-open: the target's answer still comes back

    def terminal_size_changed(self, width, height, pixwidth, pixheight) -> None:
        self.term = (self.term[0] if self.term else "", (width, height, pixwidth, pixheight),
                     self.term[2] if self.term else {})
        if self.recorder is not None:
            self.conn.record(self.recorder, "resize", {"cols": width, "rows": height})
        if self.up is not None:
            self.up.change_terminal_size(width, height, pixwidth, pixheight)

    def signal_received(self, signal: str) -> None:
        if self.recorder is not None:
            self.conn.record(self.recorder, "signal", {"signal": signal})
        if self.up is not None:
            self.up.send_signal(signal)

    def break_received(self, msec: int) -> bool:
        if self.up is not None:
            self.up.send_break(msec)
        return True

    def pause_writing(self) -> None:        # the agent reads slowly: so does the target,
        self.agent_writable.clear()         # and so do we (refusals are answers too)
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        self.agent_writable.set()
        if self.up is not None:
            self.up.resume_reading()

    def connection_lost(self, exc) -> None:
        if self.up is not None:
            self.up.close()
        self.queue.put_nowait(EOF)
        self._end("agent closed the channel")
        if self.task is not None and not self.task.done():
            self.task.cancel()      # (an approval it awaits is withdrawn)

    # ---------------------------------------------------------- opening

    async def _run(self) -> None:
        try:
            await self._open()
            await self._pump()
        except Refused:
            pass
        except SpoolError:
            pass      # (conn.record closed the connection: fail closed)
        except ProtocolError as exc:
            self._broken(exc)
        except (asyncssh.Error, OSError) as exc:
            self._tell(f"agentgate: the target: {exc}")
            self.chan.exit(255)
            self._end(f"target error: {exc}")

    def _start_fields(self) -> dict:
        f = {"channel": self.kind, "remote_user": self.conn.who.remote_user}
        if self.command:
            f["command"] = self.command
        if self.subsystem:
            f["subsystem"] = self.subsystem
        return f

    async def _open(self) -> None:
        conn = self.conn
        self.recorder = conn.open_recording(self._start_fields())
        if self.term is not None:    # the terminal's size from the start (asciicast's)
            conn.record(self.recorder, "resize", {"cols": self.term[1][0],
                                                  "rows": self.term[1][1]})
        who = conn.who
        # a shell reading its commands from stdin (`ssh host sh < script`, `ssh -t host
        # bash`): its lines are judged as typed ones
        stdin_lines = self.kind == "exec" and reads_commands_from_stdin(self.command)
        if self.kind == "exec":
            req, fields = await conn.command("exec", self.command, lines_judged=stdin_lines)
        elif self.kind == "shell":
            req, fields = who.shell(self.term is not None)
        else:
            req, fields = who.subsystem(self.subsystem)
        if self.term is not None:
            fields = {**fields, "term": self.term[0], "cols": self.term[1][0],
                      "rows": self.term[1][1],
                      "modes": {str(k): v for k, v in (self.term[2] or {}).items()}}
        ok, why = await conn.judge(self.recorder, req, fields, self._tell)
        if not ok:
            self._tell(f"agentgate: refused: {why}")
            self.chan.exit(1)
            self._end(f"refused: {why}")
            raise Refused()
        env = self.chan.get_environment()      # (filtered as it came: server._env_request)
        term_type, term_size, modes = self.term if self.term else (None, None, None)
        if modes is not None:
            modes = {k: v for k, v in modes.items() if k in SAFE_MODES}
        up_session = TargetChannel(self)
        self.up, _ = await conn.upstream.create_session(
            lambda: up_session, command=self.command or None,
            subsystem=self.subsystem or None, env=env, term_type=term_type,
            term_size=term_size, term_modes=modes, encoding=None)
        if self.ended:       # the agent went away meanwhile (an approval, the open)
            self.up.close()
            raise Refused()
        if self.kind == "shell" or stdin_lines:
            self.lines = LineTracker(pty=self.term is not None)
        elif self.kind == "subsystem" and self.subsystem == "sftp":
            self.sftp = SftpStream()

    # ---------------------------------------------------------- the agent's input, in order

    async def _pump(self) -> None:
        while True:
            await self.agent_writable.wait()
            item = await self.queue.get()
            if self.ended:
                return
            if item is EOF:
                await self._eof()
                return
            self.queued -= len(item)
            if self.paused and self.queued < QUEUE_LOW:
                self.paused = False
                self.chan.resume_reading()
            if self.sftp is not None:
                await self._sftp_in(item)
            elif self.lines is not None:
                await self._lines_in(self.lines.feed(item))
            else:
                await self._send(item)

    async def _eof(self) -> None:
        if self.lines is not None:
            await self._lines_in(self.lines.eof())
        if self.up is not None and not self.ended:
            self.up.write_eof()

    async def _send(self, data: bytes, record: bool = True) -> None:
        """To the target, recorded first (record before execute)."""
        if not data or self.ended:
            return
        await self.writable.wait()
        if record:
            self.counts["bytes_in"] += len(data)
            self.conn.record(self.recorder, DATA, {"dir": "in", "data": data,
                                                   "stream": "stdin"})
        self.up.write(data)

    async def _lines_in(self, items) -> None:
        for item in items:
            if not isinstance(item, Line):
                await self._send(item.data)
                continue
            if not item.text.strip() and item.clean:      # (Enter alone runs nothing)
                await self._send(item.data if not self.lines.pty else item.terminator)
                continue
            via = "terminal" if self.lines.pty else "stdin"
            req, fields = await self.conn.command("line", item.text, via=via)
            if not item.clean:
                # (edited with keys we can't follow: what the shell got is not known)
                req = self.conn.who.request("line", item.text, parsed=False)
                fields = {**fields, "edited": True}
            ok, why = await self.conn.judge(self.recorder, req, fields, self._tell)
            if ok:
                await self._send(item.data if not self.lines.pty else item.terminator)
            elif self.lines.pty:
                await self._send(self.lines.refusal())
                self._tell(f"agentgate: refused: {why}")
                self._refused()
            else:
                self._tell(f"agentgate: refused line {item.text[:200]!r}: {why}")
                self._refused()

    async def _sftp_in(self, data: bytes) -> None:
        for req in self.sftp.receive_client(data):
            op = req.op
            if op.name == "init" or not op.judge:
                await self._send(req.raw, record=False)
                continue
            preq, fields = self.conn.who.sftp(op)
            ok, why = await self.conn.judge(self.recorder, preq, fields, None)
            if ok:
                await self._send(req.raw, record=False)
            else:
                self.chan.write(self.sftp.refuse(op, f"agentgate: refused: {why}"))
                self._refused()

    # ---------------------------------------------------------- the target's side

    def from_target(self, data: bytes, datatype) -> None:
        self.conn.touch()
        try:
            self._from_target(data, datatype)
        except SpoolError:
            pass      # (conn.record closed the connection: fail closed)
        except ProtocolError as exc:
            self._broken(exc)

    def _file_done(self, d) -> None:
        """A file's SFTP activity, once its handle is closed (or the channel ends)."""
        self.conn.record(self.recorder, OUTPUT, {
            "kind": "file", "path": d.path, "mode": d.mode, "bytes_read": d.bytes_read,
            "bytes_written": d.bytes_written, "status": d.status})

    def _refused(self) -> None:
        """A channel that goes on and on being refused is an agent trying its way
        through (or filling the recording's disk): past MAX_REFUSALS it is closed."""
        self.refusals += 1
        if self.refusals > MAX_REFUSALS:
            raise ProtocolError(f"more than {MAX_REFUSALS} refusals on one channel")

    def _broken(self, exc: Exception) -> None:
        """Malformed SFTP from either side: this channel ends, the connection goes on."""
        log.warning("ssh channel %s: %s: channel closed",
                    self.recorder.session_id if self.recorder else "?", exc)
        try:
            if self.recorder is not None and not self.recorder.ended:
                self.conn.record(self.recorder, OUTPUT, {"error": f"protocol error: {exc}"})
        except SpoolError:
            return
        if self.up is not None:
            self.up.close()
        self.chan.close()
        self._end(f"protocol error: {exc}")

    def _from_target(self, data: bytes, datatype) -> None:
        if self.ended:
            return
        if self.sftp is not None:
            for reply in self.sftp.receive_server(data):
                if reply.done is not None:
                    self._file_done(reply.done)
                elif reply.error:
                    self.conn.record(self.recorder, OUTPUT, {"kind": "sftp",
                                                             "error": reply.error})
                self.chan.write(reply.raw)
            return
        self.counts["bytes_out"] += len(data)
        stream = "stderr" if datatype == STDERR else "stdout"
        self.conn.record(self.recorder, DATA, {"dir": "out", "data": bytes(data),
                                               "stream": stream})
        if datatype == STDERR:
            self.chan.write_stderr(data)
        else:
            self.chan.write(data)

    def target_closed(self, exc) -> None:
        try:
            self._target_closed(exc)
        except SpoolError:
            pass

    def _target_closed(self, exc) -> None:
        if self.ended:
            return
        if self.sftp is not None:
            for d in self.sftp.finish():
                self._file_done(d)
        out = {}
        if self.exit and self.exit[0] == "status":
            out["exit_status"] = self.exit[1]
        elif self.exit:
            out["exit_signal"] = self.exit[1]
        self.conn.record(self.recorder, OUTPUT, {**out, **self.counts})
        self.chan.write_eof()
        if self.exit and self.exit[0] == "status":
            self.chan.exit(self.exit[1])
        elif self.exit:
            _, sig, core, msg = self.exit
            self.chan.exit_with_signal(sig, core, msg)
        else:
            self.chan.close()
        self._end("target closed" + (f": {exc}" if exc else ""))

    # ---------------------------------------------------------- helpers

    def _tell(self, message: str) -> None:
        """A line for the agent's eyes (stderr; in a terminal, on its own line),
        recorded as what the agent saw (`stream` agentgate) so a replay is exact."""
        if self.chan is None or self.ended:
            return
        text = message.replace("\n", " ")
        data = ("\r\n" + text + "\r\n" if self.term is not None else text + "\n").encode()
        if self.recorder is not None and not self.recorder.ended:
            self.conn.record(self.recorder, DATA, {"dir": "out", "data": data,
                                                   "stream": "agentgate"})
        if self.term is not None:
            self.chan.write(data)
        else:
            self.chan.write_stderr(data)

    def _end(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.conn.channels -= 1
        if self.recorder is not None and not self.recorder.ended:
            try:
                self.recorder.record(SESSION_END, {"reason": reason, **self.counts})
            except SpoolError as exc:
                log.error("cannot record the end of channel session %s: %s",
                          self.recorder.session_id, exc)


class TargetChannel(asyncssh.SSHClientSession):
    """The target's end of a session channel: everything goes to the agent's end."""

    def __init__(self, agent: AgentChannel):
        self.agent = agent

    def data_received(self, data: bytes, datatype) -> None:
        self.agent.from_target(data, datatype)

    def eof_received(self) -> bool:
        # the agent gets it with the close: sshd goes on sending stderr after its EOF
        # (stdout closed, the command still running), which a channel past its EOF
        # can't carry
        return True

    def exit_status_received(self, status: int) -> None:
        self.agent.exit = ("status", status)

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str,
                             lang: str) -> None:
        self.agent.exit = ("signal", signal, core_dumped, msg)

    def pause_writing(self) -> None:     # the target reads slowly: the agent waits
        self.agent.writable.clear()

    def resume_writing(self) -> None:
        self.agent.writable.set()

    def connection_lost(self, exc) -> None:
        self.agent.target_closed(exc)
