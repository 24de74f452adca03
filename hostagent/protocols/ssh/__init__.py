"""SSH: the proxy is a real SSH server towards the agent (asyncssh, with a host key the
agentgate SSH CA certifies for the target's names) and a real SSH client towards the
target (the target's key or password, root's, injected; the target's host key verified).
Between them every channel is judged before it reaches the target and recorded as its
own session: exec commands, shell lines, SFTP operations, port forwards.

asyncssh owns the wire (the registry's `serve` shape); this folder owns policy and
recording. Modules: keys (the SSH CA, the proxy's host certificate, known_hosts for
OpenSSH), commands (what a shell command line runs), lines (lines typed into a shell),
sftp (SFTP packets, sans-IO), requests (policy requests), relay (channels' I/O), server
(the connection: agent's login, upstream login, channel dispatch)."""
from __future__ import annotations

import warnings
from pathlib import Path

from agentgate.tomlconfig import ConfigError
from hostagent.protocols.registry import Option, Options, ProtocolSpec

OPTIONS = (
    Option("user", help="the remote account the proxy logs in as (default: the name the "
                        "agent logs in with; policy's `remote_users` sees the account used)"),
    Option("identity_file", path=True, help="private key the proxy logs in with (root's; "
                                            "the agent never sees it)"),
    Option("certificate_file", path=True, help="an OpenSSH certificate for that key"),
    Option("password_file", path=True, help="file holding the password the proxy logs in "
                                            "with, when there is no key"),
    Option("known_hosts", path=True, help="the target's host key, or an @cert-authority "
                                          "line, in known_hosts format (required: the target "
                                          "is verified, never trusted on first use)"),
    Option("env_allow", type=list, default=["LANG", "LC_*"],
           help="environment variables an agent may pass on (globs); others are dropped"),
)
# asyncssh (and pyOpenSSL, which it imports) name DSA types at import: a deprecation
# notice for their authors, not for agentgate's users (DSA keys are not used here)
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"(asyncssh|OpenSSL)\b")

POLICY_FIELDS = ("commands", "remote_users", "subsystems", "forwards", "paths", "operations",
                 "flags")


def _check(opts: Options, where: str) -> None:
    if not opts.known_hosts:
        raise ConfigError(f"{where}: 'known_hosts' is required: a file with the target's "
                          f"host key (ssh-keyscan -p PORT HOST) or an @cert-authority line")
    if opts.identity_file and opts.password_file:
        raise ConfigError(f"{where}: give 'identity_file' or 'password_file', not both")
    if not opts.identity_file and not opts.password_file:
        raise ConfigError(f"{where}: give 'identity_file' or 'password_file': the proxy "
                          f"logs in to the target with it")
    if opts.certificate_file and not opts.identity_file:
        raise ConfigError(f"{where}: 'certificate_file' needs 'identity_file'")
    if not all(isinstance(v, str) for v in opts.env_allow):
        raise ConfigError(f"{where}: 'env_allow' must be a list of strings")


def _prepare(opts: Options, where: str) -> Options:
    """Credentials and the target's host keys, read at start: root's files."""
    import asyncssh

    def read(what: str, path: str, fn):
        try:
            return fn(path)
        except (OSError, ValueError, asyncssh.KeyImportError) as exc:
            raise ConfigError(f"{where}: cannot read {what} {path}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None

    known = read("known_hosts", opts.known_hosts, asyncssh.read_known_hosts)
    key = password = None
    if opts.identity_file:
        key = read("identity_file", opts.identity_file, asyncssh.read_private_key)
        if opts.certificate_file:
            cert = read("certificate_file", opts.certificate_file, asyncssh.read_certificate)
            key = asyncssh.load_keypairs([(key, cert)])[0]
    else:
        password = read("password_file", opts.password_file,
                        lambda p: Path(p).read_text().rstrip("\r\n"))
    return opts.replace(_known_hosts=known, _client_key=key, _password=password)


def _serve(ctx, wire):
    from hostagent.protocols.ssh.server import serve
    return serve(ctx, wire)


def _setup(targets: list, state_dir: Path, tree: str):
    from hostagent.protocols.ssh.keys import SshIdentity
    identity = SshIdentity(state_dir / "ssh", tree, targets)
    identity.publish()
    return identity


def _warm() -> None:
    import hostagent.protocols.ssh.server  # noqa: F401


PROTOCOL = ProtocolSpec(
    name="ssh",
    summary="SSH: exec, shells, SFTP and forwards judged and recorded per channel; the "
            "target's key or password injected",
    options=OPTIONS,
    serve=_serve,
    setup=_setup,
    policy_fields=POLICY_FIELDS,
    idle_timeout=3600.0,
    check=_check,
    prepare=_prepare,
    warm=_warm,
)
