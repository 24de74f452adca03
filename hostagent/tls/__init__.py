"""The host agent's local CA: mints server certificates for TLS the proxy terminates.

Enrolled clients trust ``ca.pem``; the proxy presents short-lived leaves signed by it.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import os
import pathlib
import socket
import ssl
import tempfile
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_CA_YEARS = 10
_CA_MIN_LEFT = dt.timedelta(days=30)
_LEAF_LIFE = dt.timedelta(days=7)
_LEAF_MIN_LEFT = 86400.0
_BACKDATE = dt.timedelta(hours=1)  # tolerate clients whose clocks lag ours
_CACHE_MAX = 1024                  # names can come from client SNI; don't grow without bound


class CAError(Exception):
    pass


def _now() -> dt.datetime:  # a seam so tests can move time without sleeping
    return dt.datetime.now(dt.timezone.utc)


def _not_after(cert: x509.Certificate) -> dt.datetime:
    # not_valid_after_utc only exists from cryptography 42; install_requires allows 41.
    aware = getattr(cert, "not_valid_after_utc", None)
    return aware if aware is not None else cert.not_valid_after.replace(tzinfo=dt.timezone.utc)


def _spki(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _general_names(names: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for raw in names:
        n = raw.strip()
        if n.startswith("[") and n.endswith("]"):
            n = n[1:-1]
        try:
            ip = ipaddress.ip_address(n)
        except ValueError:
            n = n.rstrip(".").lower()
            if n:
                # cryptography only takes A-labels; the idna codec is a no-op for ASCII.
                out.append(x509.DNSName(n if n.isascii() else n.encode("idna").decode()))
            continue
        if isinstance(ip, ipaddress.IPv6Address):
            ip = ipaddress.IPv6Address(ip.packed)  # drop a zone id: certificates can't hold it
            if ip.ipv4_mapped:
                # Clients may dial either form of the same address.
                out.append(x509.IPAddress(ip.ipv4_mapped))
        out.append(x509.IPAddress(ip))
    return list(dict.fromkeys(out))


def _write_new(directory: pathlib.Path, name: str, data: bytes, mode: int) -> None:
    # Written aside then linked: the final name never shows a partial file, and link
    # (unlike rename) refuses to replace a file that somehow appeared meanwhile.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
        os.link(tmp, directory / name)
    finally:
        os.close(fd)
        os.unlink(tmp)


class LocalCA:
    def __init__(self, directory: pathlib.Path, key: ec.EllipticCurvePrivateKey,
                 cert: x509.Certificate):
        self.directory, self.key, self.cert = directory, key, cert
        self.cert_path = directory / "ca.pem"
        self._leaf_key: ec.EllipticCurvePrivateKey | None = None
        self._cache: dict[tuple | frozenset, tuple[ssl.SSLContext, float]] = {}

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike, *,
                       name: str = "agentgate local CA") -> "LocalCA":
        d = pathlib.Path(directory)
        try:
            d.parent.mkdir(parents=True, exist_ok=True)
            try:
                # readable by all: ca.pem is what clients must trust (ca.key is 0600)
                d.mkdir(mode=0o755)
                os.chmod(d, 0o755)  # mkdir's mode is filtered by the umask
            except FileExistsError:
                pass
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise CAError(f"cannot use CA directory {d}: {e.strerror}") from None
        try:
            # One lock around check-and-create: two files can't appear atomically, so
            # without it a racing process could see ca.key without ca.pem and refuse.
            fcntl.flock(dfd, fcntl.LOCK_EX)
            kp, cp = d / "ca.key", d / "ca.pem"
            if not kp.exists() and not cp.exists():
                key, cert = cls._mint_ca(name)
                _write_new(d, "ca.key", _key_pem(key), 0o600)
                _write_new(d, "ca.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
                os.fsync(dfd)
                return cls(d, key, cert)
            return cls(d, *cls._load(kp, cp))
        finally:
            os.close(dfd)  # releases the lock

    @staticmethod
    def _mint_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(
            NameOID.COMMON_NAME, f"{name} ({socket.gethostname()})"[:64])])
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - _BACKDATE)
                .not_valid_after(now + dt.timedelta(days=365 * _CA_YEARS + 2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        return key, cert

    @staticmethod
    def _load(kp: pathlib.Path, cp: pathlib.Path):
        redo = f"; remove {kp.parent} to generate a new CA (clients must then trust the new ca.pem)"
        for p in (kp, cp):
            if not p.exists():
                raise CAError(f"{p} is missing but its pair exists{redo}")
        try:
            key = serialization.load_pem_private_key(kp.read_bytes(), password=None)
        except (ValueError, TypeError, OSError) as e:
            raise CAError(f"cannot load CA key {kp}: {' '.join(str(e).split())}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"CA key {kp} is not an EC key")
        try:
            cert = x509.load_pem_x509_certificate(cp.read_bytes())
        except (ValueError, OSError) as e:
            raise CAError(f"cannot load CA certificate {cp}: {' '.join(str(e).split())}") from None
        if _spki(cert.public_key()) != _spki(key.public_key()):
            raise CAError(f"CA certificate {cp} does not match the key in {kp}")
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise CAError(f"{cp} is not a CA certificate (BasicConstraints ca=True missing)")
        if _not_after(cert) - _now() < _CA_MIN_LEFT:
            raise CAError(f"CA certificate {cp} expires {_not_after(cert):%Y-%m-%d}{redo}")
        return key, cert

    def server_context(self, names: Iterable[str], alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
        """A context presenting a leaf for `names`, offering `alpn`. Contexts are shared
        by every session asking the same: callers must not change them."""
        # Keyed first by the names exactly as given, so a hit skips canonicalising them.
        raw = (tuple(names), tuple(alpn))
        hit = self._cache.get(raw)
        if hit is None or hit[1] - _now().timestamp() <= _LEAF_MIN_LEFT:
            hit = self._canonical_entry(raw)
        return hit[0]

    def _canonical_entry(self, raw: tuple) -> tuple[ssl.SSLContext, float]:
        names, alpn = raw
        sans = _general_names(names)
        if not sans:
            raise ValueError("server_context needs at least one non-empty name")
        k = (frozenset(sans), alpn)   # the set of names, whatever their order or spelling
        hit = self._cache.get(k)
        if hit is None or hit[1] - _now().timestamp() <= _LEAF_MIN_LEFT:
            hit = self._mint_context(sans, alpn)
        for key in (k, raw):
            self._cache.pop(key, None)
            if len(self._cache) >= _CACHE_MAX:
                del self._cache[next(iter(self._cache))]  # least recently (re)minted
            self._cache[key] = hit
        return hit

    def _mint_context(self, sans: list[x509.GeneralName],
                      alpn: tuple[str, ...] = ()) -> tuple[ssl.SSLContext, float]:
        if self._leaf_key is None:
            self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        first = str(sans[0].value)
        cn = first if len(first) <= 64 else "agentgate leaf"  # CN caps at 64; SAN is what counts
        now = _now()
        end = min(now + _LEAF_LIFE, _not_after(self.cert))
        ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(self.cert.subject).public_key(self._leaf_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _BACKDATE).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.AuthorityKeyIdentifier
                               .from_issuer_subject_key_identifier(ski), critical=False)
                .sign(self.key, hashes.SHA256()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        # load_cert_chain only takes paths: mkstemp makes the file 0600 (the directory
        # is 0755, ca.pem being public), and it is gone right after loading.
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".leaf-", suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(leaf.public_bytes(serialization.Encoding.PEM))
                f.write(_key_pem(self._leaf_key))
            ctx.load_cert_chain(tmp)
        finally:
            os.unlink(tmp)
        return ctx, end.timestamp()
