"""The proxy's SSH identity towards agents, and where OpenSSH finds it.

The proxy is the SSH server an agent talks to, so it needs a host key the agent's
client accepts without trust on first use and without turning checking off. An
agentgate SSH CA (made once, root's, in the state directory) certifies the proxy's host
key for the SSH targets' names and addresses; a known_hosts `@cert-authority` line for
exactly those names is published where agents of any user can read it
(/run/agentgate/trust/<tree>/ssh_known_hosts, with an ssh_config naming it), and merged
into one file OpenSSH reads for every user through /etc/ssh/ssh_config.d/: a plain
`ssh -o BatchMode=yes HOST CMD` verifies the proxy with no extra flags. A host key
certificate names only the targets, so the CA can't vouch for the proxy elsewhere.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

import asyncssh

from hostagent.tls import write_file

log = logging.getLogger("agentgate.ssh")
TRUST_DIR = Path("/run/agentgate/trust")
MERGED = Path("/run/agentgate/ssh_known_hosts")
SSH_CONFIG_D = Path("/etc/ssh/ssh_config.d")
CONF_NAME = "50-agentgate.conf"
# OpenSSH's own defaults come first: our file adds to them, it replaces nothing
GLOBAL_FILES = "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2"


class SshKeyError(Exception):
    pass


def _key(directory: Path, name: str) -> asyncssh.SSHKey:
    path = directory / name
    if path.exists():
        try:
            return asyncssh.read_private_key(str(path))
        except (OSError, asyncssh.KeyImportError) as exc:
            raise SshKeyError(f"cannot read {path}: {exc}") from None
    key = asyncssh.generate_private_key("ssh-ed25519", comment=f"agentgate {name}")
    write_file(directory, name, key.export_private_key(), 0o600)
    write_file(directory, name + ".pub", key.export_public_key(), 0o644)
    return key


def host_patterns(addresses, names) -> list[str]:
    """known_hosts patterns for a target: `host` on port 22, `[host]:port` elsewhere."""
    hosts = {h for h, _ in addresses} | set(names)
    ports = {p for _, p in addresses}
    out = []
    for host in sorted(hosts):
        for port in sorted(ports):
            out.append(host if port == 22 else f"[{host}]:{port}")
    return out


class SshIdentity:
    """The CA, the proxy's host key and its certificate, and the published trust."""

    def __init__(self, directory: Path, tree: str, targets: list):
        self.directory = directory
        self.tree = tree
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(directory):
            self.ca = _key(directory, "ca")
            self.host_key = _key(directory, "host_key")
        principals = sorted({n for t in targets for n in (*t.names, *(h for h, _ in t.addresses))})
        # remade at each start for the targets of the day: a name dropped from the config
        # is no longer vouched for
        self.cert = self.ca.generate_host_certificate(
            self.host_key, f"agentgate proxy ({tree})", principals=principals,
            valid_after="-5m")
        self.patterns = sorted({p for t in targets for p in host_patterns(t.addresses, t.names)})
        self.public_dir = TRUST_DIR / tree
        self.known_hosts = self.public_dir / "ssh_known_hosts"
        self.ssh_config = self.public_dir / "ssh_config"

    def known_hosts_line(self) -> bytes:
        ca = self.ca.export_public_key().decode().split()
        return f"@cert-authority {','.join(self.patterns)} {ca[0]} {ca[1]} agentgate-{self.tree}\n" \
            .encode()

    def publish(self) -> None:
        """The tree's known_hosts and ssh_config, then the merged file every user's
        OpenSSH reads. The merge is redone under a lock by each host agent that starts
        or stops, from the trees' files present, so several trees coexist."""
        for d in (TRUST_DIR.parent, TRUST_DIR, self.public_dir):
            d.mkdir(mode=0o755, exist_ok=True)
            os.chmod(d, 0o755)
        write_file(self.public_dir, "ssh_known_hosts", self.known_hosts_line(), 0o644,
                   replace=True)
        write_file(self.public_dir, "ssh_config",
                   f"# for ssh -F: the agentgate proxy's host CA, then your own known hosts\n"
                   f"GlobalKnownHostsFile {self.known_hosts} {GLOBAL_FILES}\n"
                   f"UserKnownHostsFile ~/.ssh/known_hosts\n".encode(), 0o644, replace=True)
        _merge()

    def unpublish(self) -> None:
        unpublish_tree(self.tree)

    def env(self) -> dict[str, str]:
        """For clients that don't read OpenSSH's system files (asyncssh, paramiko)."""
        return {"AGENTGATE_SSH_KNOWN_HOSTS": str(self.known_hosts),
                "AGENTGATE_SSH_CONFIG": str(self.ssh_config)}

    def server_keys(self) -> list:
        return [(self.host_key, self.cert)]


def unpublish_tree(tree: str) -> None:
    """What a tree's host agent published, even if it died without removing it."""
    for name in ("ssh_known_hosts", "ssh_config"):
        with contextlib.suppress(FileNotFoundError):
            (TRUST_DIR / tree / name).unlink()
    with contextlib.suppress(OSError):      # (the folder, once nothing else is in it)
        (TRUST_DIR / tree).rmdir()
    if MERGED.exists() or (SSH_CONFIG_D / CONF_NAME).exists():
        _merge()


def _merge() -> None:
    """/run/agentgate/ssh_known_hosts from every tree's file, and the ssh_config.d
    snippet naming it; both removed when no tree has SSH targets any more."""
    MERGED.parent.mkdir(mode=0o755, exist_ok=True)
    with _locked(MERGED.parent):
        lines = []
        if TRUST_DIR.is_dir():
            for f in sorted(TRUST_DIR.glob("*/ssh_known_hosts")):
                with contextlib.suppress(OSError):
                    lines.append(f.read_bytes())
        conf = SSH_CONFIG_D / CONF_NAME
        if not lines:
            for f in (MERGED, conf):
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
            return
        write_file(MERGED.parent, MERGED.name, b"".join(lines), 0o644, replace=True)
        if SSH_CONFIG_D.is_dir():
            text = (f"# Written by the agentgate host agent; removed when it stops. The proxy's\n"
                    f"# SSH host CA for its SSH targets, after OpenSSH's own global files.\n"
                    f"GlobalKnownHostsFile {GLOBAL_FILES} {MERGED}\n").encode()
            if not conf.exists() or conf.read_bytes() != text:
                write_file(SSH_CONFIG_D, CONF_NAME, text, 0o644, replace=True)
        else:
            log.warning("%s does not exist: OpenSSH clients must be given %s themselves",
                        SSH_CONFIG_D, MERGED)


@contextlib.contextmanager
def _locked(directory: Path):
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
