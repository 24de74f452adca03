"""A real PostgreSQL server from Debian's packages, in a temp dir, on 127.0.0.1."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """initdb + pg_ctl as the `postgres` user (PostgreSQL refuses to run as root).
    Roles: `app` with SCRAM, `legacy` with md5, `plain` with cleartext."""

    def __init__(self, tls: bool = False):
        self.tls = tls
        self.ca = None
        self.dir = Path(tempfile.mkdtemp(prefix="agentgate-pg-"))
        os.chown(self.dir, *_ids("postgres"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.host = "127.0.0.1"

    def _pg(self, *args: str, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True,
                           text=True, **kw)
        if p.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {p.stderr.strip()}")
        return p

    def start(self) -> "PgServer":
        try:
            return self._start()
        except BaseException:
            self.stop()   # a half-started server must not outlive the test
            raise

    def _start(self) -> "PgServer":
        self._pg(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                 "--no-sync")
        (self.data / "pg_hba.conf").write_text(
            "local all postgres trust\n"
            "host all legacy 127.0.0.1/32 md5\n"
            "host all plain 127.0.0.1/32 password\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n")
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1,::1 -c fsync=off"
        if self.tls:
            from tests.certs import CA
            self.ca = CA(self.dir / "pki", "pg-test-ca")
            cert, key = self.ca.issue("localhost", server=True)
            for f in (cert, key):
                shutil.copy(f, self.data / f.name)
                os.chown(self.data / f.name, *_ids("postgres"))
                os.chmod(self.data / f.name, 0o600)
            options += f" -c ssl=on -c ssl_cert_file={cert.name} -c ssl_key_file={key.name}"
        self._pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.dir / "log"),
                 "-o", options, "start")
        self.sql("SET password_encryption = 'scram-sha-256'; "
                 "CREATE ROLE app LOGIN PASSWORD 'app-secret-pw';"
                 "CREATE ROLE plain LOGIN PASSWORD 'plain-secret-pw';"
                 "SET password_encryption = 'md5'; "
                 "CREATE ROLE legacy LOGIN PASSWORD 'legacy-secret-pw';")
        self.sql("CREATE DATABASE shop OWNER app")
        return self

    def sql(self, statement: str, db: str = "postgres") -> str:
        return self._pg(str(PG_BIN / "psql"), "-h", str(self.dir), "-p", str(self.port),
                        "-U", "postgres", "-d", db, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                        "-c", statement).stdout

    def stop(self) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D",
                        str(self.data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _ids(user: str) -> tuple[int, int]:
    import pwd
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid
