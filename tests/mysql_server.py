"""A real MariaDB server from Debian's packages (10.11), in a temp dir, on 127.0.0.1.

    db = MariaDbServer(tls=False).start()
    db.host, db.port       # TCP on 127.0.0.1
    db.socket              # the unix socket; root logs in over it (unix_socket auth)
    db.sql("SELECT 1", db="shop")
    db.mtr(MTR_SAMPLE)     # Debian's mariadb-test suite against it (or, with host/port,
                           # against a proxy in front of it): {test: "pass"|"fail"|"skipped"}
    db.stop()

Accounts: `app` (mysql_native_password, 'app-secret-pw') and `edu` (ed25519,
'ed-secret-pw'), both with ALL on `shop`; `app` also has ALL on `test` (mariadb-test's
database) and SELECT on one table of `mysql` (mtr's start-up runs `USE mysql`). No global
privileges: `app` sees only its own threads. Tables are the tests' business.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

MARIADBD = "/usr/sbin/mariadbd"
INSTALL_DB = "/usr/bin/mariadb-install-db"
CLIENT = "/usr/bin/mariadb"
MTR_DIR = Path("/usr/share/mysql/mysql-test")

# Tests of the `main` suite that pass in --extern mode against this server as `app` (no
# SUPER, no FILE, no restarts, no second connection as root), a mix of what a proxy must
# carry: 18 MiB blobs (multi-packet payloads), 300-deep nested statements, 4,000 small
# round trips, SQL prepared statements, stored procedures, SIGNAL/errors, warnings, window
# functions, JSON, utf8mb4 and 8-bit character sets. A few seconds together, in any order.
MTR_SAMPLE = [
    "main.myisam-blob",
    "main.parser_stack",
    "main.order_fill_sortbuf",
    "main.ps_2myisam",
    "main.ps_5merge",
    "main.ps_10nestset",
    "main.sp-fib",
    "main.sp-expr",
    "main.signal_sqlmode",
    "main.type_num",
    "main.func_concat",
    "main.win_rank",
    "main.json_equals",
    "main.ctype_utf8mb4_general_ci_ws",
    "main.ctype_hebrew",
]

_RESULT = re.compile(r"^(\S+?)(?: '[^']*')?\s+(?:w\d+\s+)?\[ (pass|fail|skipped|disabled) \]")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ids(user: str) -> tuple[int, int]:
    import pwd
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


class MariaDbServer:
    """mariadb-install-db + mariadbd, running as the `mysql` user (mariadbd refuses root
    unless told), with fsync-light InnoDB settings; started once per test module."""

    start_timeout = 30.0

    def __init__(self, tls: bool = False):
        self.tls = tls
        self.ca = None
        self.host = "127.0.0.1"
        self.port = 0
        self.version = ""
        self.dir = Path(tempfile.mkdtemp(prefix="agentgate-mysql-"))
        os.chmod(self.dir, 0o755)
        os.chown(self.dir, *_ids("mysql"))
        self.data = self.dir / "data"
        self.tmpdir = self.dir / "tmp"
        self.socket = str(self.dir / "mysqld.sock")
        self.error_log = self.dir / "error.log"
        self.proc: subprocess.Popen | None = None
        self._mtr_runs = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "MariaDbServer":
        try:
            return self._start()
        except BaseException:
            self.stop()   # a half-started server must not outlive the test
            raise

    def _start(self) -> "MariaDbServer":
        # a private tmpdir: in the shared /tmp, another server's start-up can take our
        # bootstrap's temporary tables away
        self.tmpdir.mkdir()
        os.chown(self.tmpdir, *_ids("mysql"))
        p = subprocess.run([INSTALL_DB, "--no-defaults", f"--datadir={self.data}", "--user=mysql",
                            f"--tmpdir={self.tmpdir}", "--auth-root-authentication-method=socket",
                            "--skip-test-db"],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {(p.stderr or p.stdout).strip()}")
        args = []
        if self.tls:
            from tests.certs import CA
            self.ca = CA(self.dir / "pki", "mysql-test-ca")
            cert, key = self.ca.issue("localhost", server=True)
            for f in (self.ca.dir, self.ca.pem, cert, key):
                os.chown(f, *_ids("mysql"))
            os.chmod(key, 0o600)
            args += [f"--ssl-cert={cert}", f"--ssl-key={key}", f"--ssl-ca={self.ca.pem}"]
        for _ in range(5):
            self.port = _free_port()
            if self._launch(args):
                break
            # lost the port to someone else between _free_port and mariadbd's bind
        else:
            raise RuntimeError(f"mariadbd could not bind a port: {self._log_tail()}")
        self.sql("INSTALL SONAME 'auth_ed25519';"
                 "CREATE USER app@'%' IDENTIFIED VIA mysql_native_password "
                 "USING PASSWORD('app-secret-pw');"
                 "CREATE USER edu@'%' IDENTIFIED VIA ed25519 USING PASSWORD('ed-secret-pw');"
                 "CREATE DATABASE shop; CREATE DATABASE test;"
                 "GRANT ALL ON shop.* TO app@'%'; GRANT ALL ON shop.* TO edu@'%';"
                 "GRANT ALL ON test.* TO app@'%';"
                 "GRANT SELECT ON mysql.time_zone_name TO app@'%';")
        self.version = self.sql("SELECT VERSION()").strip()
        return self

    def _launch(self, extra: list[str]) -> bool:
        """Starts mariadbd and waits until it greets on its socket. False if the TCP port
        was taken (the caller retries with another); raises on any other failure."""
        self.error_log.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [MARIADBD, "--no-defaults", f"--datadir={self.data}", f"--socket={self.socket}",
             f"--port={self.port}", "--bind-address=127.0.0.1", "--skip-log-bin",
             "--innodb-buffer-pool-size=32M", "--innodb-flush-log-at-trx-commit=0",
             "--local-infile=1", "--max-allowed-packet=64M", f"--log-error={self.error_log}",
             f"--pid-file={self.dir / 'mariadbd.pid'}", f"--tmpdir={self.tmpdir}", "--user=mysql",
             *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                log = self._log_tail()
                if "Address already in use" in log or "Bind on TCP/IP port" in log:
                    return False
                raise RuntimeError(f"mariadbd exited at start-up: {log}")
            if self._greets():
                return True
            time.sleep(0.02)
        raise RuntimeError(f"mariadbd not ready after {self.start_timeout:.0f}s: "
                           f"{self._log_tail()}")

    def _greets(self) -> bool:
        """A connection on the unix socket gets the server's handshake packet (the socket
        is listening a little before mariadbd accepts)."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1.0)
                s.connect(self.socket)
                return len(s.recv(5)) >= 5
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            lines = self.error_log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no error log)"
        wanted = [ln for ln in lines if "[ERROR]" in ln] or lines[-5:]
        return " | ".join(wanted[-5:])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ use

    def sql(self, statement: str, db: str | None = None) -> str:
        """Runs statement(s) with the mariadb CLI as root over the unix socket; the output
        is tab-separated rows without column names."""
        p = subprocess.run([CLIENT, "--no-defaults", f"--socket={self.socket}", "--user=root",
                            "--batch", "--skip-column-names", "-e", statement,
                            *([db] if db else [])], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"mariadb: {p.stderr.strip()}")
        return p.stdout

    def mtr(self, tests: list[str], host: str | None = None, port: int | None = None,
            user: str = "app", password: str = "app-secret-pw", database: str = "test",
            ps_protocol: bool = False, timeout: float = 600) -> dict[str, str]:
        """Runs mariadb-test tests (e.g. MTR_SAMPLE) in --extern mode against host:port
        (default: this server; give a proxy's address to run them through it), in a
        fresh vardir under this server's dir. {test name: "pass" | "fail" | "skipped"};
        a test mtr did not report (it aborted, timed out) is a "fail". ps_protocol: every
        statement as a binary-protocol prepared statement (COM_STMT_PREPARE/EXECUTE);
        MTR_SAMPLE passes that way too, but main.parser_stack is then "skipped".
        The whole output is kept in self.last_mtr_output."""
        self._mtr_runs += 1
        var = self.dir / f"mtr-{self._mtr_runs}"
        cmd = mtr_command(tests, host or self.host, port or self.port, user, password, database,
                          var, ps_protocol=ps_protocol)
        # its own process group: on a timeout, mysqltest and its helpers go with mtr
        p = subprocess.Popen(cmd, cwd=MTR_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, text=True, errors="replace",
                             env={**os.environ, "MTR_PARALLEL": "1"}, start_new_session=True)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
            out += f"\n(killed after {timeout:.0f} s)\n"
        self.last_mtr_output = out
        got: dict[str, str] = {}
        for line in out.splitlines():
            m = _RESULT.match(line)
            if m:
                result = {"disabled": "skipped"}.get(m.group(2), m.group(2))
                if got.get(m.group(1)) != "fail":   # a combination's failure sticks
                    got[m.group(1)] = result
        return {t: got.get(t, "fail") for t in tests}


def mtr_command(tests: list[str], host: str, port: int, user: str, password: str,
                database: str, vardir: Path, ps_protocol: bool = False) -> list[str]:
    """The mariadb-test-run command line for tests against an already running server (run
    it with cwd=MTR_DIR). No check-testcases (it needs root on the server), one worker (the
    tests share the `test` database), no retries (a failure is a result here)."""
    return [str(MTR_DIR / "mariadb-test-run"),
            f"--extern=host={host}", f"--extern=port={port}", f"--extern=user={user}",
            f"--extern=password={password}", f"--extern=database={database}",
            "--extern=protocol=tcp",
            f"--vardir={vardir}", f"--tmpdir={vardir}/tmp",
            "--force", "--max-test-fail=0", "--retry=0", "--parallel=1",
            "--nocheck-testcases", "--testcase-timeout=2", "--suite-timeout=10",
            *(["--ps-protocol"] if ps_protocol else []), *tests]
