"""Authenticating upstream with injected credentials, sans-IO (messages in, messages out),
so that the injected password goes only to the real server (principle 9):

- SCRAM-SHA-256 (RFC 5802/7677 as PostgreSQL uses it: the user name is taken from the
  startup message). Over TLS, when the server offers it, SCRAM-SHA-256-PLUS with channel
  binding `tls-server-end-point` (RFC 5929): the proof is tied to the certificate this
  leg's TLS ended at, so a man in the middle that terminates TLS and relays the exchange
  to the real server fails the server's check. Over TLS to a server that does not offer
  PLUS the GS2 flag is `y` (a real server that does support it then detects the
  downgrade); over plaintext, `n`.
- The server's final SCRAM message must verify before AuthenticationOk is accepted: a
  server that skips it (or signs wrongly) has not shown it knows the password.
- Cleartext and md5 answers go only over TLS that verified the server (tls =
  "verify-full"), unless the target says `weak_password_auth = "allow"`: a cleartext
  password is the password, and an md5 answer can be replayed to the real server.
- With `tls = "require"` (encrypted, the certificate not verified) the server must prove
  itself through channel binding: SCRAM-SHA-256-PLUS or nothing.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from hostagent.protocols import ProtocolError
from hostagent.protocols.postgres import messages as m

SCRAM = "SCRAM-SHA-256"
SCRAM_PLUS = "SCRAM-SHA-256-PLUS"
TLS_SERVER_END_POINT = "tls-server-end-point"


class AuthRefused(Exception):
    """The injected credentials must not go on: one line, naming why (and the option that
    would change it), for the client's FATAL error and the session's close reason."""


# PBKDF2 runs on the proxy's event loop: a server (or a man in the middle) asking for
# millions of rounds would stall every session. PostgreSQL's default is 4096.
MAX_ITERATIONS = 100_000
_SALTED: dict[tuple[bytes, bytes, int], bytes] = {}


def _salted(password: bytes, salt: bytes, rounds: int) -> bytes:
    """SaltedPassword, remembered: every session (and catalog read) to a server logs in
    with the same password, salt and rounds; PBKDF2 costs milliseconds each time."""
    key = (hashlib.sha256(password).digest(), salt, rounds)
    found = _SALTED.get(key)
    if found is None:
        if len(_SALTED) >= 256:
            _SALTED.clear()
        found = _SALTED[key] = hashlib.pbkdf2_hmac("sha256", password, salt, rounds)
    return found


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _attrs(message: str) -> dict[str, str]:
    out = {}
    for part in message.split(","):
        key, sep, value = part.partition("=")
        if not sep or len(key) != 1:
            raise ProtocolError(f"malformed SCRAM message: {message!r}")
        out[key] = value
    return out


def tls_server_end_point(der: bytes) -> bytes:
    """RFC 5929 channel binding data: the hash of the server's certificate, with the hash
    of its signature algorithm (SHA-256 where that is MD5 or SHA-1), as PostgreSQL
    computes it (be_tls_get_certificate_hash)."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes
    try:
        algorithm = x509.load_der_x509_certificate(der).signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise AuthRefused(f"cannot read the server's certificate for channel binding: "
                          f"{exc}") from None
    if algorithm is None:   # Ed25519/Ed448: RFC 5929 defines no hash for them
        raise AuthRefused("the server's certificate is signed without a hash algorithm "
                          "(e.g. Ed25519): tls-server-end-point channel binding is not "
                          "defined for it")
    if isinstance(algorithm, (hashes.MD5, hashes.SHA1)):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(der)
    return digest.finalize()


class ScramSha256:
    """One SCRAM-SHA-256(-PLUS) exchange, client side. `binding` is (type, data) for
    SCRAM-SHA-256-PLUS; without it, `client_supports_binding` chooses GS2 flag y over n."""

    def __init__(self, password: str, nonce: str | None = None, *,
                 binding: tuple[str, bytes] | None = None,
                 client_supports_binding: bool = False):
        self.password = password.encode()
        self.nonce = nonce or _b64(secrets.token_bytes(18))
        if binding is not None:
            self.mechanism = SCRAM_PLUS
            self.gs2_header = f"p={binding[0]},,"
            self.binding_data = binding[1]
        else:
            self.mechanism = SCRAM
            self.gs2_header = "y,," if client_supports_binding else "n,,"
            self.binding_data = b""
        self.first_bare = f"n=,r={self.nonce}"
        self._server_signature = b""
        self.verified = False          # the server's final message proved it

    @property
    def final_sent(self) -> bool:
        return bool(self._server_signature)

    def client_first(self) -> bytes:
        return (self.gs2_header + self.first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        text = server_first.decode(errors="replace")
        attrs = _attrs(text)
        nonce, salt, iterations = attrs.get("r", ""), attrs.get("s", ""), attrs.get("i", "")
        if not nonce.startswith(self.nonce) or len(nonce) <= len(self.nonce):
            raise ProtocolError("the server's SCRAM nonce does not extend ours")
        try:
            salt_bytes = base64.b64decode(salt, validate=True)
            rounds = int(iterations)
        except (ValueError, TypeError):
            raise ProtocolError("malformed SCRAM salt or iteration count") from None
        if not 1 <= rounds <= MAX_ITERATIONS:
            raise ProtocolError(f"SCRAM iteration count {rounds} out of range "
                                f"(at most {MAX_ITERATIONS})")
        salted = _salted(self.password, salt_bytes, rounds)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        cbind = _b64(self.gs2_header.encode() + self.binding_data)
        without_proof = f"c={cbind},r={nonce}"
        auth_message = f"{self.first_bare},{text},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self._server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{without_proof},p={_b64(proof)}".encode()

    def verify_server_final(self, server_final: bytes) -> None:
        attrs = _attrs(server_final.decode(errors="replace"))
        if "e" in attrs:
            raise ProtocolError(f"SCRAM authentication failed: {attrs['e']}")
        try:
            got = base64.b64decode(attrs.get("v", ""), validate=True)
        except ValueError:
            got = b""
        if not self._server_signature or not hmac.compare_digest(got, self._server_signature):
            raise ProtocolError("the server's SCRAM signature is wrong: not the real server")
        self.verified = True


def md5_password(user: str, password: str, salt: bytes) -> str:
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()


class UpstreamAuth:
    """The proxy's side of the server's authentication, with the injected password: fed
    the server's Authentication requests, it returns what to send back, or raises
    AuthRefused when answering would hand the credential to a server that has not shown
    it is the real one. Used by every connection that carries injected credentials.

    `tls` is the target's mode; `tls_up()` says what the leg's TLS turned out to be."""

    def __init__(self, password: str, *, target: str = "", tls: str = "disable",
                 weak_password_auth: str = "refuse"):
        self.password = password
        self.target = target
        self.tls = tls
        self.weak = weak_password_auth
        self.encrypted = False
        self.verified = False              # TLS that verified the server (verify-full)
        self.peer_cert: bytes | None = None
        self.scram: ScramSha256 | None = None
        self.method = ""                   # what the proxy answered with ("" = nothing asked)
        self.ok = False                    # AuthenticationOk accepted

    def tls_up(self, peer_cert: bytes | None, verified: bool) -> None:
        self.encrypted = True
        self.peer_cert = peer_cert
        self.verified = verified

    @property
    def channel_binding(self) -> str:
        return TLS_SERVER_END_POINT if self.scram and self.scram.mechanism == SCRAM_PLUS else ""

    def summary(self) -> dict:
        """What the login used, for the session's records."""
        return {"method": self.method or "none", "channel_binding": self.channel_binding,
                "server_verified": self._proved_by()}

    def _proved_by(self) -> str:
        parts = []
        if self.verified:
            parts.append("certificate")
        if self.scram is not None and self.scram.verified:
            parts.append("scram+channel binding" if self.channel_binding else "scram")
        return ", ".join(parts) or "nothing"

    def _where(self) -> str:
        return f'target "{self.target}": ' if self.target else ""

    # ------------------------------------------------------------------ the exchange

    def answer(self, code: int, data: bytes, user: str) -> bytes | None:
        """The message for the server's Authentication request `code`, or None."""
        if self.ok:
            raise AuthRefused(f"{self._where()}the server asked for authentication again "
                              "after AuthenticationOk")
        try:
            if code == m.AUTH_SASL:
                return self._sasl(m.sasl_mechanisms(data))
            if code == m.AUTH_SASL_CONTINUE:
                if self.scram is None or self.scram.final_sent:
                    raise AuthRefused(f"{self._where()}unexpected SASLContinue from the server")
                return m.sasl_response(self.scram.client_final(data))
            if code == m.AUTH_SASL_FINAL:
                if self.scram is None or not self.scram.final_sent or self.scram.verified:
                    raise AuthRefused(f"{self._where()}unexpected SASLFinal from the server")
                self.scram.verify_server_final(data)
                return None
        except ProtocolError as exc:
            raise AuthRefused(f"{self._where()}{exc}") from None
        if code in (m.AUTH_MD5, m.AUTH_CLEARTEXT):
            return self._weak(code, data, user)
        raise AuthRefused(f"{self._where()}unsupported upstream authentication method {code}")

    def _sasl(self, offered: list[str]) -> bytes:
        if self.method:
            raise AuthRefused(f"{self._where()}the server started a second authentication "
                              f"exchange (after {self.method})")
        plus = SCRAM_PLUS in offered
        if self.encrypted and plus:
            if not self.peer_cert:
                raise AuthRefused(f"{self._where()}no server certificate to bind the SCRAM "
                                  "exchange to")
            self.scram = ScramSha256(self.password, binding=(
                TLS_SERVER_END_POINT, tls_server_end_point(self.peer_cert)))
        elif self.encrypted and self.tls == "require":
            raise AuthRefused(
                f'{self._where()}tls = "require" does not verify the server\'s certificate, '
                f"so the injected credentials go only through {SCRAM_PLUS} (channel "
                f"binding), and the server offers {', '.join(offered) or 'nothing'}; verify "
                f'the server instead with tls = "verify-full" (and ca = "..." for a '
                f"private CA)")
        elif SCRAM in offered:
            # y: we could bind, we think the server can't; a real server that can (over
            # its TLS) refuses: someone stripped PLUS from its list
            self.scram = ScramSha256(self.password, client_supports_binding=self.encrypted)
        else:
            raise AuthRefused(f"{self._where()}the server offers no supported SASL mechanism "
                              f"({', '.join(offered) or 'none'})")
        self.method = self.scram.mechanism
        return m.sasl_initial_response(self.scram.mechanism, self.scram.client_first())

    def _weak(self, code: int, data: bytes, user: str) -> bytes:
        kind = "md5" if code == m.AUTH_MD5 else "cleartext"
        if self.method:
            raise AuthRefused(f"{self._where()}the server asked for a {kind} password after "
                              f"{self.method}")
        if not self.verified and self.weak != "allow":
            over = (f'TLS that does not verify the server (tls = "{self.tls}")'
                    if self.encrypted else f'a connection without TLS (tls = "{self.tls}")')
            raise AuthRefused(
                f"{self._where()}the server asked for a {kind} password over {over}; the "
                f"injected password is answered that way only to a server verified with "
                f'tls = "verify-full", or with weak_password_auth = "allow" on the target')
        self.method = kind
        if kind == "cleartext":
            return m.password_message(self.password)
        if len(data) != 4:
            raise AuthRefused(f"{self._where()}malformed md5 salt from the server")
        return m.password_message(md5_password(user, self.password, data))

    def authenticated(self) -> None:
        """AuthenticationOk came: accepted only from a server that has shown it is the
        real one as far as this connection can tell."""
        if self.ok:
            raise AuthRefused(f"{self._where()}a second AuthenticationOk from the server")
        if self.scram is not None and not self.scram.verified:
            why = ("its final SCRAM message never came" if self.scram.final_sent
                   else "the SCRAM exchange never finished")
            raise AuthRefused(f"{self._where()}the server accepted the login without proving "
                              f"it knows the password ({why}): not the real server")
        if self.tls == "require" and self.scram is None and not self.method:
            raise AuthRefused(
                f'{self._where()}tls = "require" does not verify the server\'s certificate, '
                f"and the server asked for no password, so nothing showed it is the real "
                f'server; verify it with tls = "verify-full" (and ca = "..." for a private '
                f"CA)")
        self.ok = True
