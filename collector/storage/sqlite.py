"""SQLite (WAL) storage: the embedded default for a single collector.

One writer connection behind a lock (SQLite has one writer anyway) and one reader
connection per thread, so reads never wait for a commit's fsync. synchronous=FULL:
an ack to a host agent lets it delete its spool, so a commit must survive power loss.
"""
from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
from pathlib import Path
from typing import Sequence


from agentgate.tomlconfig import private_dir
from agentgate.events import COMMAND, SESSION_END, SESSION_START, Event, unpack_payload
from collector.storage import (APPROVED, CANCELLED, DENIED, EXPIRED, PENDING, AgentRow, ApprovalRow,
                               Check, Conflict, Forbidden, NotFound, SessionFilter, SessionRow,
                               StorageError)

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    pk INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    host TEXT NOT NULL DEFAULT '',
    agent TEXT NOT NULL DEFAULT '',
    target TEXT NOT NULL DEFAULT '',
    protocol TEXT NOT NULL DEFAULT '',
    started_ns INTEGER NOT NULL DEFAULT 0,
    ended_ns INTEGER NOT NULL DEFAULT 0,
    end_reason TEXT NOT NULL DEFAULT '',
    committed_seq INTEGER NOT NULL DEFAULT 0,  -- 1..committed_seq all stored
    stored_seq INTEGER NOT NULL DEFAULT 0,     -- highest seq stored (> committed: a gap)
    command_count INTEGER NOT NULL DEFAULT 0,
    start_payload BLOB NOT NULL DEFAULT x'',
    owner TEXT NOT NULL DEFAULT ''             -- the host agent that records it
);
CREATE INDEX IF NOT EXISTS sessions_started ON sessions(started_ns);
CREATE TABLE IF NOT EXISTS events (
    session_pk INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    wall_ns INTEGER NOT NULL,
    mono_ns INTEGER NOT NULL,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    text TEXT,
    PRIMARY KEY (session_pk, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    session_id TEXT NOT NULL DEFAULT '',
    host TEXT NOT NULL DEFAULT '',
    target TEXT NOT NULL DEFAULT '',
    protocol TEXT NOT NULL DEFAULT '',
    command TEXT NOT NULL DEFAULT '',
    requested_by TEXT NOT NULL DEFAULT '',
    rule TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    created_ns INTEGER NOT NULL,
    expires_ns INTEGER NOT NULL,
    decided_ns INTEGER NOT NULL DEFAULT 0,
    decided_by TEXT NOT NULL DEFAULT '',
    decision_reason TEXT NOT NULL DEFAULT '',
    created_by TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS approvals_pending ON approvals(state, expires_ns);
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    version TEXT NOT NULL DEFAULT '',
    capabilities TEXT NOT NULL DEFAULT '[]',
    registered_ns INTEGER NOT NULL,
    last_seen_ns INTEGER NOT NULL,
    spool_bytes INTEGER NOT NULL DEFAULT 0,
    unacked_events INTEGER NOT NULL DEFAULT 0,
    principal TEXT NOT NULL DEFAULT '',
    lost_kernel_events INTEGER NOT NULL DEFAULT 0
);
"""

INSERT_EVENT = "INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?,?,?)"
SESSION_COLS = ("id, host, agent, target, protocol, started_ns, ended_ns, end_reason, "
                "committed_seq, command_count, start_payload")
APPROVAL_COLS = ", ".join(ApprovalRow.__slots__)


def _fields(payload: bytes) -> dict:
    """A payload's fields, or {} if it does not decode: a bad payload is stored as it
    is (verify and export show it), it never blocks a host agent's ingest."""
    try:
        return unpack_payload(payload)
    except Exception:
        return {}


def _command_text(payload: bytes) -> str | None:
    text = _fields(payload).get("text")
    return text if isinstance(text, str) else None


def _agent_summary(start: dict) -> str:
    if isinstance(start.get("agent"), str):
        return start["agent"]
    proc = start.get("process") or {}
    if not isinstance(proc, dict):
        return ""
    parts = [str(proc.get(k)) for k in ("user", "exe") if proc.get(k)]
    if proc.get("pid"):
        parts.append(f"(pid {proc['pid']})")
    return " ".join(parts)


class SqliteStorage:
    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if self.path != ":memory:":
            parent = Path(self.path).parent
            try:
                private_dir(parent)
            except OSError as exc:
                raise StorageError(f"cannot create database directory {parent}: {exc.strerror}") from None
        self._wlock = threading.Lock()
        # session id -> (pk, committed, stored) as committed; the writer is the only one
        self._sessions: dict[str, tuple[int, int, int, str]] = {}
        self._local = threading.local()
        if self.path != ":memory:" and not os.path.exists(self.path):
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))  # the WAL follows
        try:
            self._w = self._connect()
            self._w.executescript(SCHEMA)
            self._w.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open database {self.path}: {exc}") from None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _r(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def close(self) -> None:
        with self._wlock:
            self._w.close()

    # ------------------------------------------------------------------ recordings

    def ingest(self, events: Sequence[Event], owner: str = "") -> tuple[dict[str, int], list[Event]]:
        by_session: dict[str, list[Event]] = {}
        for ev in events:
            by_session.setdefault(ev.session_id, []).append(ev)
        with self._wlock:
            c = self._w
            c.execute("BEGIN IMMEDIATE")
            try:
                acks, fresh, states = self._ingest(c, by_session, owner)
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
            self._sessions.update(states)   # only what committed
            if len(self._sessions) > 100_000:
                self._sessions.clear()
        return acks, fresh

    def _session_state(self, c: sqlite3.Connection, sid: str,
                       owner: str) -> tuple[int, int, int, str]:
        """(pk, committed seq, highest stored seq, owner), from the cache or the database.
        A session belongs to the host agent that sent its first event: no other may add
        to it (or claim sequence numbers ahead of it)."""
        state = self._sessions.get(sid)
        if state is None:
            row = c.execute("SELECT pk, committed_seq, stored_seq, owner FROM sessions "
                            "WHERE id = ?", (sid,)).fetchone()
            state = row or (c.execute("INSERT INTO sessions (id, owner) VALUES (?, ?)",
                                      (sid, owner)).lastrowid, 0, 0, owner)
        if state[3] != owner:
            raise Forbidden(f"session {sid} belongs to {state[3] or 'another host agent'}, "
                            f"not {owner or 'this caller'}")
        return state

    def _ingest(self, c: sqlite3.Connection, by_session: dict[str, list[Event]], owner: str):
        acks: dict[str, int] = {}
        states: dict[str, tuple[int, int, int, str]] = {}
        rows: list[tuple] = []
        fresh_all: list[Event] = []
        gapped: list[tuple[str, int]] = []
        touched: dict[str, list[Event]] = {}
        for sid, evs in by_session.items():
            pk, committed, stored_max, _ = self._session_state(c, sid, owner)
            fresh = list({e.seq: e for e in evs if e.seq > committed}.values())
            if stored_max > committed and fresh:
                # Events past an earlier gap are stored already: count and publish them once.
                stored = {seq for (seq,) in c.execute(
                    "SELECT seq FROM events WHERE session_pk = ? AND seq > ?", (pk, committed))}
                fresh = [e for e in fresh if e.seq not in stored]
            if not fresh:
                acks[sid] = committed
                states[sid] = (pk, committed, stored_max, owner)
                continue
            fresh.sort(key=lambda e: e.seq)
            rows.extend((pk, e.seq, e.wall_time_ns, e.mono_ns, e.kind, e.payload, e.prev_hash,
                         e.hash, _command_text(e.payload) if e.kind == COMMAND else None)
                        for e in fresh)
            mark = committed
            for e in fresh:
                if e.seq != mark + 1:
                    break
                mark = e.seq
            stored_max = max(stored_max, fresh[-1].seq)
            if stored_max > mark:
                gapped.append((sid, pk))
            acks[sid] = mark
            states[sid] = (pk, mark, stored_max, owner)
            touched[sid] = fresh
            if stored_max == mark:
                fresh_all.extend(fresh)
        c.executemany(INSERT_EVENT, rows)
        for sid, pk in gapped:
            # Events stored past a gap (earlier or now) may connect up now. Only events
            # that are contiguous are reported as new: a live follower never sees a hole.
            before = acks[sid]
            mark = before
            for (seq,) in c.execute("SELECT seq FROM events WHERE session_pk = ? AND seq > ? "
                                    "ORDER BY seq", (pk, mark)):
                if seq != mark + 1:
                    break
                mark = seq
            acks[sid] = mark
            states[sid] = (pk, mark, states[sid][2], owner)
            fresh_all.extend(e for e in touched[sid] if e.seq <= before)
            if mark > before:
                fresh_all.extend(self._events_by_pk(c, sid, pk, before, mark))
        updates = []
        for sid, fresh in touched.items():
            pk = states[sid][0]
            commands = 0
            for e in fresh:
                if e.kind == COMMAND:
                    commands += 1
                elif e.kind == SESSION_START:
                    start = _fields(e.payload)
                    c.execute("UPDATE sessions SET host = ?, agent = ?, target = ?, protocol = ?, "
                              "started_ns = ?, start_payload = ? WHERE pk = ?",
                              (str(start.get("host", "")), _agent_summary(start),
                               str(start.get("target", "")), str(start.get("protocol", "")),
                               e.wall_time_ns, e.payload, pk))
                elif e.kind == SESSION_END:
                    end = _fields(e.payload)
                    c.execute("UPDATE sessions SET ended_ns = ?, end_reason = ? WHERE pk = ?",
                              (e.wall_time_ns, str(end.get("reason", "")), pk))
            updates.append((states[sid][1], states[sid][2], commands, pk))
        c.executemany("UPDATE sessions SET committed_seq = ?, stored_seq = ?, "
                      "command_count = command_count + ? WHERE pk = ?", updates)
        return acks, fresh_all, states

    @staticmethod
    def _events_by_pk(c: sqlite3.Connection, sid: str, pk: int, after: int, upto: int) -> list[Event]:
        return [Event(sid, r[0], r[1], r[2], r[3], bytes(r[4]), bytes(r[5]), bytes(r[6]))
                for r in c.execute("SELECT seq, wall_ns, mono_ns, kind, payload, prev_hash, hash "
                                   "FROM events WHERE session_pk = ? AND seq > ? AND seq <= ? "
                                   "ORDER BY seq", (pk, after, upto))]

    @staticmethod
    def _session_row(r) -> SessionRow:
        return SessionRow(id=r[0], host=r[1], agent=r[2], target=r[3], protocol=r[4],
                          started_ns=r[5], ended_ns=r[6], end_reason=r[7], event_count=r[8],
                          command_count=r[9], start_payload=bytes(r[10] or b""))

    def list_sessions(self, flt: SessionFilter) -> list[SessionRow]:
        where, args = [], []
        for col in ("host", "target", "protocol"):
            value = getattr(flt, col)
            if value:
                where.append(f"{col} = ?")
                args.append(value)
        if flt.agent:
            where.append("instr(agent, ?) > 0")
            args.append(flt.agent)
        if flt.since_ns:
            where.append("started_ns >= ?")
            args.append(flt.since_ns)
        if flt.until_ns:
            where.append("started_ns < ?")
            args.append(flt.until_ns)
        if flt.text:
            where.append("EXISTS (SELECT 1 FROM events e WHERE e.session_pk = sessions.pk "
                         "AND e.text IS NOT NULL AND instr(e.text, ?) > 0)")
            args.append(flt.text)
        sql = f"SELECT {SESSION_COLS} FROM sessions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY started_ns DESC, pk DESC LIMIT ?"
        args.append(flt.limit or 100)
        return [self._session_row(r) for r in self._r().execute(sql, args)]

    def get_session(self, session_id: str) -> SessionRow:
        r = self._r().execute(f"SELECT {SESSION_COLS} FROM sessions WHERE id = ?",
                              (session_id,)).fetchone()
        if r is None:
            raise NotFound(f"no session {session_id}")
        return self._session_row(r)

    def events(self, session_id: str, after_seq: int = 0, limit: int = 1000) -> list[Event]:
        rows = self._r().execute(
            "SELECT e.seq, e.wall_ns, e.mono_ns, e.kind, e.payload, e.prev_hash, e.hash "
            "FROM events e JOIN sessions s ON s.pk = e.session_pk "
            "WHERE s.id = ? AND e.seq > ? ORDER BY e.seq LIMIT ?",
            (session_id, after_seq, limit)).fetchall()
        return [Event(session_id, r[0], r[1], r[2], r[3], bytes(r[4]), bytes(r[5]), bytes(r[6]))
                for r in rows]

    # ------------------------------------------------------------------ approvals

    def _approval(self, c: sqlite3.Connection, approval_id: str) -> ApprovalRow:
        r = c.execute(f"SELECT {APPROVAL_COLS} FROM approvals WHERE id = ?",
                      (approval_id,)).fetchone()
        if r is None:
            raise NotFound(f"no approval request {approval_id}")
        return ApprovalRow(*r)

    def create_approval(self, row: ApprovalRow) -> ApprovalRow:
        with self._wlock:
            while True:
                candidate = _replace(row, id=row.id or secrets.token_hex(5))
                try:
                    self._w.execute(
                        f"INSERT INTO approvals ({APPROVAL_COLS}) VALUES "
                        f"({','.join('?' * len(ApprovalRow.__slots__))})",
                        [getattr(candidate, f) for f in ApprovalRow.__slots__])
                    return candidate
                except sqlite3.IntegrityError:
                    if row.id:
                        raise Conflict(f"approval request {row.id} exists") from None

    def get_approval(self, approval_id: str) -> ApprovalRow:
        return self._approval(self._r(), approval_id)

    def list_approvals(self, pending_only: bool, limit: int) -> list[ApprovalRow]:
        sql = f"SELECT {APPROVAL_COLS} FROM approvals"
        if pending_only:
            sql += " WHERE state = 'pending'"
        sql += " ORDER BY created_ns DESC LIMIT ?"
        return [ApprovalRow(*r) for r in self._r().execute(sql, (limit or 100,))]

    def _transition(self, approval_id: str, now_ns: int, check: Check | None, new_state: str,
                    by: str, reason: str) -> ApprovalRow:
        with self._wlock:
            c = self._w
            c.execute("BEGIN IMMEDIATE")
            try:
                cur = self._approval(c, approval_id)
                if cur.state == PENDING and cur.expires_ns <= now_ns:
                    # expire_approvals() marks it and tells the watchers
                    raise Conflict(f"approval request {approval_id} has expired")
                if cur.state != PENDING:
                    raise Conflict(f"approval request {approval_id} is already {cur.state}")
                if check is not None:
                    check(cur)
                c.execute("UPDATE approvals SET state = ?, decided_ns = ?, decided_by = ?, "
                          "decision_reason = ? WHERE id = ?",
                          (new_state, now_ns, by, reason, approval_id))
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
            return _replace(cur, state=new_state, decided_ns=now_ns, decided_by=by,
                            decision_reason=reason)

    def decide_approval(self, approval_id: str, approve: bool, reason: str, decider: str,
                        now_ns: int, check: Check | None = None) -> ApprovalRow:
        return self._transition(approval_id, now_ns, check, APPROVED if approve else DENIED,
                                decider, reason)

    def cancel_approval(self, approval_id: str, by: str, now_ns: int,
                        check: Check | None = None) -> ApprovalRow:
        return self._transition(approval_id, now_ns, check, CANCELLED, by,
                                "cancelled by the requester")

    def expire_approvals(self, now_ns: int) -> list[ApprovalRow]:
        with self._wlock:
            rows = self._w.execute(
                f"UPDATE approvals SET state = ?, decided_ns = expires_ns "
                f"WHERE state = ? AND expires_ns <= ? RETURNING {APPROVAL_COLS}",
                (EXPIRED, PENDING, now_ns)).fetchall()
        return [ApprovalRow(*r) for r in rows]

    def next_expiry_ns(self) -> int | None:
        (value,) = self._r().execute(
            "SELECT min(expires_ns) FROM approvals WHERE state = 'pending'").fetchone()
        return value

    # ------------------------------------------------------------------ host agents

    @staticmethod
    def _agent_row(r) -> AgentRow:
        return AgentRow(agent_id=r[0], host=r[1], version=r[2],
                        capabilities=tuple(json.loads(r[3])), registered_ns=r[4],
                        last_seen_ns=r[5], spool_bytes=r[6], unacked_events=r[7], principal=r[8],
                        lost_kernel_events=r[9])

    def register_agent(self, row: AgentRow) -> AgentRow:
        row = _replace(row, agent_id=row.agent_id or secrets.token_hex(8))
        with self._wlock:
            self._w.execute(
                "INSERT INTO agents (agent_id, host, version, capabilities, registered_ns, "
                "last_seen_ns, principal) VALUES (?,?,?,?,?,?,?) ON CONFLICT(agent_id) DO UPDATE "
                "SET host = excluded.host, version = excluded.version, "
                "capabilities = excluded.capabilities, last_seen_ns = excluded.last_seen_ns, "
                "principal = excluded.principal",
                (row.agent_id, row.host, row.version, json.dumps(list(row.capabilities)),
                 row.registered_ns, row.last_seen_ns, row.principal))
        return row

    def heartbeat_agent(self, agent_id: str, spool_bytes: int, unacked_events: int,
                        now_ns: int, lost_kernel_events: int = 0) -> None:
        with self._wlock:
            n = self._w.execute("UPDATE agents SET last_seen_ns = ?, spool_bytes = ?, "
                                "unacked_events = ?, lost_kernel_events = ? WHERE agent_id = ?",
                                (now_ns, spool_bytes, unacked_events, lost_kernel_events,
                                 agent_id)).rowcount
        if n == 0:
            raise NotFound(f"no host agent {agent_id}: register first")

    def list_agents(self) -> list[AgentRow]:
        return [self._agent_row(r) for r in self._r().execute(
            "SELECT agent_id, host, version, capabilities, registered_ns, last_seen_ns, "
            "spool_bytes, unacked_events, principal, lost_kernel_events FROM agents "
            "ORDER BY host, agent_id")]


def _replace(row, **changes):
    from dataclasses import replace
    return replace(row, **changes)
