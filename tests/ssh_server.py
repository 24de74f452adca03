"""A real OpenSSH server (Debian's sshd) on loopback for the SSH proxy's tests, started
once per test session in a temp dir with its own host key, config and authorized key.

    s = SshServer(tmp).start()
    s.port, s.known_hosts      # a known_hosts file with its host key ([127.0.0.1]:port)
    s.client_key               # the key it accepts for root (root's file, 0600)
    s.cert_key, s.cert         # a key it accepts for root only with its certificate
    s.user, s.password_file    # a local account that logs in with a password (made for
                               # the tests, removed by stop())
    s.stop()

It logs to its own file (s.log); its sftp subsystem is OpenSSH's sftp-server, so what a
client does over SFTP really happens on this host.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SshServer:
    def __init__(self, tmp: Path):
        self.dir = Path(tmp)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self.proc = None
        self.port = 0
        self.user = f"agtest{secrets.token_hex(3)}"
        self.password = secrets.token_urlsafe(12)

    def _keygen(self, name: str) -> Path:
        path = self.dir / name
        if not path.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                            str(path)], check=True, timeout=30)
        return path

    def start(self) -> "SshServer":
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)    # privilege separation
        self.host_key = self._keygen("host_key")
        self.client_key = self._keygen("client_key")
        self.other_host_key = self._keygen("other_host_key")    # for "wrong key" tests
        # a key sshd accepts only with its certificate (signed by a user CA it trusts)
        user_ca = self._keygen("user_ca")
        self.cert_key = self._keygen("cert_key")
        self.cert = self.dir / "cert_key-cert.pub"
        if not self.cert.exists():
            subprocess.run(["ssh-keygen", "-q", "-s", str(user_ca), "-I", "agentgate-test",
                            "-n", "root", "-V", "-5m:+1d", str(self.cert_key) + ".pub"],
                           check=True, timeout=30)
        (self.dir / "authorized_keys").write_text(
            (self.dir / "client_key.pub").read_text())
        (self.dir / "authorized_keys").chmod(0o644)
        self.password_file = self.dir / "password"
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)
        subprocess.run(["useradd", "-M", "-d", "/tmp", "-s", "/bin/sh", self.user],
                       check=True, timeout=30)
        subprocess.run(["chpasswd"], input=f"{self.user}:{self.password}\n", text=True,
                       check=True, timeout=30)
        self.log = self.dir / "sshd.log"
        for _ in range(5):
            self.port = _free_port()
            config = self.dir / "sshd_config"
            config.write_text(f"""
ListenAddress 127.0.0.1:{self.port}
HostKey {self.host_key}
PidFile {self.dir}/sshd.pid
AuthorizedKeysFile {self.dir}/authorized_keys
TrustedUserCAKeys {self.dir}/user_ca.pub
PermitRootLogin prohibit-password
PasswordAuthentication yes
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
GatewayPorts no
X11Forwarding no
PrintMotd no
PrintLastLog no
AcceptEnv LANG LC_* AGENTGATE_TEST_*
Subsystem sftp {SFTP_SERVER}
LogLevel VERBOSE
""")
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                                         stdout=subprocess.DEVNULL,
                                         stderr=open(self.log, "ab"))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.proc.poll() is None:
                if "Server listening" in self.log.read_text(errors="replace"):
                    break
                time.sleep(0.02)
            if self.proc.poll() is None:
                break
        else:
            raise RuntimeError(f"sshd did not start: {self.log.read_text()}")
        key = (self.dir / "host_key.pub").read_text().split()
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {key[0]} {key[1]}\n")
        other = (self.dir / "other_host_key.pub").read_text().split()
        self.wrong_known_hosts = self.dir / "wrong_known_hosts"
        self.wrong_known_hosts.write_text(f"[127.0.0.1]:{self.port} {other[0]} {other[1]}\n")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        subprocess.run(["userdel", self.user], capture_output=True, timeout=30)


def ssh_available() -> bool:
    return all(os.path.exists(p) for p in (SSHD, SFTP_SERVER)) and bool(shutil.which("ssh"))
