"""Authenticating upstream with injected credentials: SCRAM-SHA-256 (RFC 5802/7677, as
PostgreSQL uses it: no channel binding, user name taken from the startup message), md5
and cleartext. Sans-IO: messages in, messages out."""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from hostagent.protocols import ProtocolError


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


class ScramSha256:
    mechanism = "SCRAM-SHA-256"

    def __init__(self, password: str, nonce: str | None = None):
        self.password = password.encode()
        self.nonce = nonce or _b64(secrets.token_bytes(18))
        self.first_bare = f"n=,r={self.nonce}"
        self._server_signature = b""

    def client_first(self) -> bytes:
        return ("n,," + self.first_bare).encode()

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
        if not 1 <= rounds <= 10_000_000:
            raise ProtocolError(f"SCRAM iteration count {rounds} out of range")
        salted = hashlib.pbkdf2_hmac("sha256", self.password, salt_bytes, rounds)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
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


def md5_password(user: str, password: str, salt: bytes) -> str:
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
