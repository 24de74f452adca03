"""Authentication on both legs of a MySQL/MariaDB session, sans-IO, payloads only (the
layer frames and numbers the packets):

- UpstreamAuth logs in to the real server with the injected password, so that the
  password reaches only that server (principle 9). Challenge-response plugins
  (mysql_native_password, caching_sha2_password's fast path, MariaDB's client_ed25519)
  leak nothing reusable, so they go over any leg. What reveals the password goes only
  where nobody else can read it: in cleartext (mysql_clear_password, and the full path
  of caching_sha2_password / sha256_password over TLS) only over TLS that verified the
  server; RSA-encrypted (those full paths without TLS) only to a key pinned in the
  target's options, since a key the server sends is unauthenticated: a man in the
  middle sends its own and reads the password. `weak_password_auth = "allow"` lifts both.
  No plugin makes the server prove it knows the password (an impostor may answer OK to
  anything): only tls = "verify-full" shows who the server is.
- ClientAuth leads the agent's client through whatever plugin it insists on, to the OK
  the layer sends; its password is ignored (the kernel says who the agent is).
"""
from __future__ import annotations

import hashlib
import secrets

from hostagent.protocols.api import ProtocolError
from hostagent.protocols.mysql import messages as m

NATIVE = "mysql_native_password"
CACHING_SHA2 = "caching_sha2_password"
SHA256 = "sha256_password"
ED25519 = "client_ed25519"
CLEAR = "mysql_clear_password"
SPOKEN = (NATIVE, CACHING_SHA2, SHA256, ED25519, CLEAR)

MORE_DATA = 0x01             # AuthMoreData, the server's packets inside a plugin
FAST_AUTH_OK = 0x03          # caching_sha2_password: the scramble matched the cache
FULL_AUTH = 0x04             # caching_sha2_password: send the password itself
SHA2_KEY_REQUEST = b"\x02"   # caching_sha2_password asks the server for its RSA key
SHA256_KEY_REQUEST = b"\x01"  # sha256_password does the same with another byte
MAX_STEPS = 6                # a real exchange has at most 4 server packets


class AuthRefused(Exception):
    """The login cannot go on: one line, naming why (and the option that would change
    it), shown to the agent and recorded as the session's close reason."""


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def native_scramble(password: bytes, nonce: bytes) -> bytes:
    """SHA1(pw) XOR SHA1(nonce + SHA1(SHA1(pw))); empty for no password."""
    if not password:
        return b""
    stage1 = hashlib.sha1(password).digest()
    stage2 = hashlib.sha1(stage1).digest()
    return _xor(stage1, hashlib.sha1(nonce[:20] + stage2).digest())


def caching_sha2_scramble(password: bytes, nonce: bytes) -> bytes:
    """SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) + nonce); empty for no password."""
    if not password:
        return b""
    p1 = hashlib.sha256(password).digest()
    p2 = hashlib.sha256(p1).digest()
    return _xor(p1, hashlib.sha256(p2 + nonce[:20]).digest())


def ed25519_secret(password: bytes) -> tuple[bytes, bytes]:
    """MariaDB's key derivation: Ed25519's expansion of a seed, applied to the whole
    password (any length) instead of a 32-byte seed. Returns (scalar reduced mod L,
    nonce prefix); reducing changes nothing on the curve and keeps libsodium's scalar
    arithmetic within its documented inputs."""
    from nacl.bindings import crypto_core_ed25519_scalar_reduce
    h = bytearray(hashlib.sha512(password).digest())
    h[0] &= 248
    h[31] = (h[31] & 63) | 64
    return crypto_core_ed25519_scalar_reduce(bytes(h[:32]) + bytes(32)), bytes(h[32:])


def ed25519_public(password: bytes) -> bytes:
    """The public key MariaDB stores (base64) for the account."""
    from nacl.bindings import crypto_scalarmult_ed25519_base_noclamp
    return crypto_scalarmult_ed25519_base_noclamp(ed25519_secret(password)[0])


def ed25519_sign(password: bytes, message: bytes) -> bytes:
    """An RFC 8032 signature (R || S) of `message` under the password-derived key."""
    from nacl import bindings as b
    s, prefix = ed25519_secret(password)
    public = b.crypto_scalarmult_ed25519_base_noclamp(s)
    r = b.crypto_core_ed25519_scalar_reduce(hashlib.sha512(prefix + message).digest())
    big_r = b.crypto_scalarmult_ed25519_base_noclamp(r)
    k = b.crypto_core_ed25519_scalar_reduce(hashlib.sha512(big_r + public + message).digest())
    return big_r + b.crypto_core_ed25519_scalar_add(b.crypto_core_ed25519_scalar_mul(k, s), r)


def load_rsa_key(pem: bytes):
    """An RSA public key from PEM (SubjectPublicKeyInfo or PKCS#1); ValueError else."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    try:
        key = serialization.load_pem_public_key(pem.strip() + b"\n")
    except UnsupportedAlgorithm as exc:   # a server's key is input like any other
        raise ValueError(str(exc)) from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA key")
    return key


def rsa_encrypt(password: bytes, nonce: bytes, key) -> bytes:
    """(password + NUL) XOR the nonce (repeated), RSA-OAEP with SHA-1 as MySQL's
    RSA_PKCS1_OAEP_PADDING; the XOR ties the ciphertext to this login's nonce."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    nonce = nonce[:20]
    plain = bytes(c ^ nonce[i % len(nonce)] for i, c in enumerate(password + b"\0"))
    return key.encrypt(plain, padding.OAEP(mgf=padding.MGF1(hashes.SHA1()),
                                           algorithm=hashes.SHA1(), label=None))


class UpstreamAuth:
    """The proxy's side of the server's authentication: `first()` answers the greeting,
    `step()` each later packet that is not OK/ERR; either raises AuthRefused when
    answering would hand the password to someone who might not be the server."""

    def __init__(self, user: str, password: str, *, target: str, tls: bool, verified: bool,
                 weak_password_auth: str = "refuse", server_key: bytes | None = None):
        self.user = user
        self.password = password.encode()
        self.target = target
        self.tls = tls
        self.verified = tls and verified
        self.weak = weak_password_auth == "allow"
        self.key = None
        if server_key:
            try:
                self.key = load_rsa_key(server_key)
            except ValueError as exc:
                raise AuthRefused(f"{self._where()}server_key is not an RSA public key in "
                                  f"PEM ({exc})") from None
        self.plugin = ""
        self.nonce = b""
        self.state = ""          # where the current plugin's exchange is
        self.switched = False
        self.path = ""           # how the password went: scramble, fast, tls, rsa...
        self.key_source = ""     # pinned / requested, when RSA was used
        self.steps = 0

    def _where(self) -> str:
        return f'target "{self.target}": ' if self.target else ""

    def summary(self) -> dict:
        out = {"method": self.plugin or "none", "path": self.path, "switched": self.switched}
        if self.key_source:
            out["server_key"] = self.key_source
        return out

    # ------------------------------------------------------------------ the exchange

    def first(self, greeting: m.Greeting) -> tuple[str, bytes]:
        # Answer the announced plugin only when that answer is a challenge-response;
        # otherwise (sha256_password, a MariaDB plugin, one we do not speak) answer
        # mysql_native_password as clients do: the server switches to the account's.
        plugin = greeting.plugin if greeting.plugin in (NATIVE, CACHING_SHA2) else NATIVE
        return plugin, self._begin(plugin, greeting.nonce)

    def step(self, payload: bytes) -> bytes | None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise AuthRefused(f"{self._where()}the server's authentication exchange goes on "
                              f"past {MAX_STEPS} packets")
        try:
            if payload[:1] == b"\xfe":
                return self._switch(*m.parse_auth_switch(payload))
            if payload[:1] == bytes((MORE_DATA,)):
                return self._more(payload[1:])
        except ProtocolError as exc:
            raise AuthRefused(f"{self._where()}malformed authentication packet from the "
                              f"server: {exc}") from None
        head = f"0x{payload[0]:02x}" if payload else "empty"
        raise AuthRefused(f"{self._where()}unexpected packet ({head}) from the server "
                          f"during authentication")

    def _switch(self, plugin: str, data: bytes) -> bytes:
        if self.switched:
            raise AuthRefused(f"{self._where()}the server switched the authentication "
                              f"plugin a second time (to {plugin}, after {self.plugin})")
        self.switched = True
        return self._begin(plugin, data)

    def _begin(self, plugin: str, data: bytes) -> bytes:
        if plugin not in SPOKEN:
            raise AuthRefused(
                f"{self._where()}the server asks for authentication plugin {plugin}, which "
                f"the proxy does not speak ({', '.join(SPOKEN)}); give the account one of "
                f"those on the server")
        if plugin == ED25519:
            if len(data) != 32:   # MariaDB sends exactly the 32-byte nonce
                raise AuthRefused(f"{self._where()}client_ed25519 nonce of {len(data)} "
                                  f"bytes (32 expected)")
        elif plugin != CLEAR and len(data) < 20:   # 20 bytes, a NUL after them in a switch
            raise AuthRefused(f"{self._where()}{plugin} nonce of {len(data)} bytes "
                              f"(20 expected)")
        self.plugin, self.nonce = plugin, data[:32 if plugin == ED25519 else 20]
        self.path = "scramble"
        if plugin in (NATIVE, ED25519):
            self.state = "sent"
            sign = native_scramble if plugin == NATIVE else ed25519_sign
            return sign(self.password, self.nonce)
        if plugin == CACHING_SHA2:
            self.state = "scramble"
            return caching_sha2_scramble(self.password, self.nonce)
        if plugin == CLEAR:
            return self._cleartext(plugin, b"\0")   # a C string, as clients send it
        # sha256_password: no challenge-response, the password goes in its first packet
        if not self.password:
            self.state = "sent"
            return b""
        return self._password_itself()

    def _more(self, data: bytes) -> bytes | None:
        if self.state == "scramble" and data == bytes((FAST_AUTH_OK,)):
            self.state, self.path = "sent", "fast"   # the OK follows
            return None
        if self.state == "scramble" and data == bytes((FULL_AUTH,)):
            if not self.password:   # the server wants a password the target has not
                raise AuthRefused(f"{self._where()}the server asks for a password and "
                                  f"the target's is empty")
            return self._password_itself()
        if self.state == "key":
            self.key_source = "requested"
            try:
                key = load_rsa_key(data)
            except ValueError as exc:
                raise AuthRefused(f"{self._where()}the server's RSA public key does not "
                                  f"parse ({exc})") from None
            return self._encrypted(key)
        raise AuthRefused(f"{self._where()}unexpected data ({data[:1].hex() or 'empty'}) "
                          f"from the server in {self.plugin}")

    def _password_itself(self) -> bytes:
        """The full path of caching_sha2_password and sha256_password: the password
        itself, over TLS in cleartext, else encrypted to the server's RSA key."""
        if self.tls:
            return self._cleartext(f"{self.plugin} (full authentication)", b"\0")
        if self.key is not None:
            self.key_source = "pinned"
            return self._encrypted(self.key)
        if not self.weak:
            raise AuthRefused(
                f"{self._where()}{self.plugin} full authentication without TLS encrypts the "
                f"password to the server's RSA key, and none is pinned: one sent by the "
                f"server could be a man in the middle's; pin it with server_key on the "
                f'target, use tls = "verify-full", or weak_password_auth = "allow"')
        self.state = "key"
        return SHA2_KEY_REQUEST if self.plugin == CACHING_SHA2 else SHA256_KEY_REQUEST

    def _encrypted(self, key) -> bytes:
        self.state, self.path = "sent", "rsa"
        try:
            return rsa_encrypt(self.password, self.nonce, key)
        except ValueError:   # OAEP fits key size - 42 bytes
            raise AuthRefused(f"{self._where()}the password is too long for the server's "
                              f"{key.key_size}-bit RSA key") from None

    def _cleartext(self, what: str, end: bytes) -> bytes:
        if not self.verified and not self.weak:
            over = ("TLS that did not verify the server" if self.tls
                    else "a connection without TLS")
            raise AuthRefused(
                f"{self._where()}the server asks for the password in cleartext ({what}) "
                f"over {over}; the injected password goes in cleartext only to a server "
                f'verified with tls = "verify-full", or with weak_password_auth = "allow" '
                f"on the target")
        self.state, self.path = "sent", "cleartext"
        return self.password + end


# ---------------------------------------------------------------- the agent's side

_PROXY_PEM = b""


def proxy_public_pem() -> bytes:
    """The public half of the proxy's RSA key, for clients that encrypt their (ignored)
    password: one per process, made when a client first asks (2048 bits: ~100 ms).
    Nothing is decrypted with it, so only the PEM is kept."""
    global _PROXY_PEM
    if not _PROXY_PEM:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _PROXY_PEM = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _PROXY_PEM


def new_nonce() -> bytes:
    # printable 7-bit bytes without NUL, as MySQL makes them: clients treat the nonce
    # as a C string in places
    return bytes(secrets.randbelow(126) + 1 for _ in range(20))


class ClientAuth:
    """The agent's side: its password is ignored, but its client must be led through
    whatever plugin it insists on, to the OK the layer sends once the server said OK."""

    plugin = NATIVE
    MAX_STEPS = 4

    def __init__(self, *, tls: bool):
        self.tls = tls
        self.nonce = new_nonce()
        self.client_plugin = ""
        self.state = "start"
        self.steps = 0

    def response(self, plugin: str, data: bytes) -> tuple[list[bytes], bool]:
        self.steps += 1
        if self.steps > self.MAX_STEPS:
            raise AuthRefused(f"the client's authentication exchange goes on past "
                              f"{self.MAX_STEPS} packets")
        state, self.state = self.state, "done"
        if state == "start":
            self.client_plugin = plugin = plugin or NATIVE
            # b"\0" is libmysqlclient's empty password; b"" is also the dummy packet
            # of a client whose plugin is not the greeting's (libmysqlclient, MariaDB
            # Connector/C): it waits for that plugin's data, so it gets a switch
            if plugin == NATIVE or data == b"\0":
                return [], True
            if plugin in (CACHING_SHA2, SHA256) and not data:
                self.state = plugin
                return [m.auth_switch(plugin, self.nonce + b"\0")], False
            if plugin == CACHING_SHA2:
                return self._scrambled()
            if plugin == SHA256:
                return self._password(data)
            # another plugin may want any number of rounds (dialog asks questions,
            # ed25519 a 32-byte nonce): native ends in one
            self.state = "switched"
            return [m.auth_switch(NATIVE, self.nonce + b"\0")], False
        if state == CACHING_SHA2:   # its answer to our switch
            return ([], True) if data in (b"", b"\0") else self._scrambled()
        if state == SHA256:
            return ([], True) if data in (b"", b"\0") else self._password(data)
        if state in ("switched", "rsa"):
            return [], True
        raise AuthRefused("the client sent more authentication data after it was done")

    def _scrambled(self):
        """caching_sha2_password: "fast authentication succeeded", which every client
        handles on any leg. Asking for the full path instead makes libmysqlclient (the C
        extension, the mysql CLI) fail on plain TCP unless told to fetch the server's
        key (Connector/J: allowPublicKeyRetrieval), and mysql.connector's pure Python
        client send the password in cleartext: all for a password that is ignored."""
        return [bytes((MORE_DATA, FAST_AUTH_OK))], True

    def _password(self, data: bytes):
        """sha256_password's first packet is the password itself: cleartext over TLS,
        or encrypted to our key, which the client asks for (0x01) unless it has one;
        either way it is ignored."""
        if data == SHA256_KEY_REQUEST:
            self.state = "rsa"
            return [bytes((MORE_DATA,)) + proxy_public_pem()], False
        return [], True
