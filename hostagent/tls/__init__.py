"""The host agent's local CA: mints server certificates for TLS the proxy terminates.

Enrolled clients trust ``ca.pem`` (the root); the proxy presents short-lived leaves
signed by an intermediate, ``issuing.pem``, that the root signs.

Why two levels: trusting a CA system-wide would let whoever holds its key impersonate any
site. The intermediate carries X.509 name constraints limiting it to the configured
targets' names and addresses, and clients (OpenSSL, Go, NSS) enforce constraints found on
intermediates, so even its key can't sign for other names; the running proxy only ever
holds that key. The root's key is read from disk only to mint a new intermediate, and the
root itself never changes when the targets do: trust given once to ``ca.pem`` survives.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
import pathlib
import socket
import ssl
import tempfile
from typing import Iterable, Iterator

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_CA_YEARS = 10
_CA_MIN_LEFT = dt.timedelta(days=30)
_ISSUING_LIFE = dt.timedelta(days=365)
_LEAF_LIFE = dt.timedelta(days=7)
_LEAF_MIN_LEFT = 86400.0
_BACKDATE = dt.timedelta(hours=1)  # tolerate clients whose clocks lag ours
_CACHE_MAX = 1024                  # names can come from client SNI; don't grow without bound
_SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

# RFC 5280: a name type absent from permittedSubtrees is not constrained at all, so each
# type is always present; these permit nothing real (RFC 6761 reserves "invalid").
# iPAddress is one type for both families, but OpenSSL and Go only match an address
# against entries of its own length: each family needs its own entry.
_NO_DNS = x509.DNSName("invalid")
_NO_V4 = x509.IPAddress(ipaddress.ip_network("0.0.0.0/32"))
_NO_V6 = x509.IPAddress(ipaddress.ip_network("::/128"))

_KU_CA = x509.KeyUsage(digital_signature=False, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                       key_cert_sign=True, crl_sign=True, encipher_only=False,
                       decipher_only=False)


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


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


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


def _subtrees(sans: list[x509.GeneralName]) -> list[x509.GeneralName]:
    """The permittedSubtrees naming exactly `sans`, each name type present."""
    dns = [g for g in sans if isinstance(g, x509.DNSName)]
    ips = [g.value for g in sans if isinstance(g, x509.IPAddress)]
    v4 = [x509.IPAddress(ipaddress.ip_network(ip)) for ip in ips if ip.version == 4]
    v6 = [x509.IPAddress(ipaddress.ip_network(ip)) for ip in ips if ip.version == 6]
    return (dns or [_NO_DNS]) + (v4 or [_NO_V4]) + (v6 or [_NO_V6])


def _subtrees_key(subtrees: Iterable[x509.GeneralName]) -> tuple[str, ...]:
    return tuple(sorted(f"{type(g).__name__}:{g.value}" for g in subtrees))


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:  # a root made elsewhere may lack one
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _path_length(cert: x509.Certificate) -> int | None:
    return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length


def write_file(directory: pathlib.Path, name: str, data: bytes, mode: int, *,
               replace: bool = False) -> None:
    """Written aside, then put in place: the final name never shows a partial file.
    replace=False links it (link, unlike rename, refuses to replace a file that somehow
    appeared meanwhile); replace=True renames it over: readers see the old or the new."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
        if replace:
            os.replace(tmp, directory / name)
        else:
            os.link(tmp, directory / name)
    finally:
        os.close(fd)
        if not replace or os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def _locked(d: pathlib.Path) -> Iterator[int]:
    """The CA directory's flock, held while files in it are checked and replaced: two
    files can't change atomically, so without it a racing process could see a half pair."""
    try:
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise CAError(f"cannot use CA directory {d}: {e.strerror}") from None
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)
        yield dfd
    finally:
        os.close(dfd)  # releases the lock


def _read_key(kp: pathlib.Path, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(kp.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as e:
        raise CAError(f"cannot load {what} key {kp}: {_one_line(e)}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError(f"{what} key {kp} is not an EC key")
    return key


def trust_env(bundle: pathlib.Path, ca_pem: pathlib.Path) -> dict[str, str]:
    """Environment variables common clients read for the CAs to trust, pointing at
    `bundle` (the system's CAs plus ours: most of these replace the system list)."""
    b = str(bundle)
    return {
        # OpenSSL itself, hence Python's ssl, Ruby, PHP, most C programs
        "SSL_CERT_FILE": b,
        # Python requests/pip/httplib2, curl, git and the AWS SDKs/CLI, which ignore the above
        "REQUESTS_CA_BUNDLE": b, "CURL_CA_BUNDLE": b, "GIT_SSL_CAINFO": b,
        "AWS_CA_BUNDLE": b, "PIP_CERT": b, "HTTPLIB2_CA_CERTS": b,
        # gRPC's C core, cargo, nix, deno and libpq (sslmode=verify-*), each its own name
        "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": b, "CARGO_HTTP_CAINFO": b,
        "NIX_SSL_CERT_FILE": b, "DENO_CERT": b, "PGSSLROOTCERT": b,
        # Node adds this file to its built-in roots rather than replacing them
        "NODE_EXTRA_CA_CERTS": str(ca_pem),
    }


class LocalCA:
    def __init__(self, directory: pathlib.Path, cert: x509.Certificate, remade: bool = False):
        # The root's key is deliberately not kept: it is read from ca.key only to mint an
        # intermediate, so a leak of this process's memory can't sign for any name.
        self.directory, self.cert, self.remade = directory, cert, remade
        self.cert_path = directory / "ca.pem"
        self.issuing_path = directory / "issuing.pem"
        self.issuing: x509.Certificate | None = None
        self._issuing_key: ec.EllipticCurvePrivateKey | None = None
        self._constraints: tuple[str, ...] | None = None   # _subtrees_key of the wanted set
        self._names: list[x509.GeneralName] = []           # the names constrain() was given
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
        except OSError as e:
            raise CAError(f"cannot use CA directory {d}: {e.strerror}") from None
        with _locked(d) as dfd:
            kp, cp = d / "ca.key", d / "ca.pem"
            if not kp.exists() and not cp.exists():
                return cls(d, cls._create(d, dfd, name))
            cert = cls._load(kp, cp)
            if _path_length(cert) == 0:
                # Made by a version that signed leaves with the root itself: it can't sign
                # an intermediate. Kept aside, not deleted, in case it is wanted back.
                os.replace(cp, d / "ca.pem.old")
                os.replace(kp, d / "ca.key.old")
                return cls(d, cls._create(d, dfd, name), remade=True)
            return cls(d, cert)

    @classmethod
    def _create(cls, d: pathlib.Path, dfd: int, name: str) -> x509.Certificate:
        key, cert = cls._mint_ca(name)
        write_file(d, "ca.key", _key_pem(key), 0o600)
        write_file(d, "ca.pem", _cert_pem(cert), 0o644)
        os.fsync(dfd)
        return cert

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
                # 1: room for the intermediate under it, none for a CA under that
                .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
                .add_extension(_KU_CA, critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        return key, cert

    @staticmethod
    def _load(kp: pathlib.Path, cp: pathlib.Path) -> x509.Certificate:
        redo = f"; remove {kp.parent} to generate a new CA (clients must then trust the new ca.pem)"
        for p in (kp, cp):
            if not p.exists():
                raise CAError(f"{p} is missing but its pair exists{redo}")
        key = _read_key(kp, "CA")
        try:
            cert = x509.load_pem_x509_certificate(cp.read_bytes())
        except (ValueError, OSError) as e:
            raise CAError(f"cannot load CA certificate {cp}: {_one_line(e)}") from None
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
        return cert

    # ------------------------------------------------------------------ the intermediate

    def constrain(self, names: Iterable[str]) -> None:
        """Sign leaves from now on with an intermediate limited to `names` (DNS names, with
        their subdomains, and IP addresses): the one in issuing.pem if it is exactly that,
        else a new one, which replaces it. ca.pem never changes."""
        sans = _general_names(names)
        if not sans:
            raise ValueError("constrain needs at least one non-empty name")
        want = _subtrees(sans)
        key = _subtrees_key(want)
        with _locked(self.directory) as dfd:
            found = self._load_issuing(key)
            if found is None:
                found = self._mint_issuing(want)
                write_file(self.directory, "issuing.key", _key_pem(found[0]), 0o600, replace=True)
                write_file(self.directory, "issuing.pem", _cert_pem(found[1]), 0o644, replace=True)
                os.fsync(dfd)
        if key != self._constraints:
            self._cache.clear()   # leaves made for other constraints may name what's now out
        self._issuing_key, self.issuing = found
        self._constraints, self._names = key, sans

    def _load_issuing(self, want: tuple[str, ...]):
        """(key, cert) from issuing.key/pem if usable for `want` as they are, else None:
        they are only ever replaced, so anything amiss just means minting anew."""
        kp, cp = self.directory / "issuing.key", self.issuing_path
        try:
            if os.stat(kp).st_mode & 0o077:
                return None   # someone loosened it: that key may have leaked
            key = serialization.load_pem_private_key(kp.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cp.read_bytes())
            nc = cert.extensions.get_extension_for_class(x509.NameConstraints)
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, OSError, x509.ExtensionNotFound, InvalidSignature):
            return None
        if (not isinstance(key, ec.EllipticCurvePrivateKey)
                or _spki(key.public_key()) != _spki(cert.public_key())
                or not nc.critical or nc.value.excluded_subtrees
                or _subtrees_key(nc.value.permitted_subtrees or ()) != want
                or not self._lasts(cert)):
            return None
        return key, cert

    def _lasts(self, issuing: x509.Certificate) -> bool:
        # Enough time left, or as much as the root allows: a new one couldn't do better.
        end = _not_after(issuing)
        return end > _now() and (end - _now() > _CA_MIN_LEFT or end >= _not_after(self.cert))

    def _mint_issuing(self, subtrees: list[x509.GeneralName]):
        root_key = _read_key(self.directory / "ca.key", "CA")
        if _spki(root_key.public_key()) != _spki(self.cert.public_key()):
            raise CAError(f"CA certificate {self.cert_path} does not match the key in "
                          f"{self.directory / 'ca.key'}")
        key = ec.generate_private_key(ec.SECP256R1())
        root_cn = self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = (root_cn[0].value if root_cn else "agentgate local CA")
        # A subject of its own: one equal to the root's would read as self-issued, which
        # path building treats differently.
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{cn[:54]} - issuing")])
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - _BACKDATE)
                .not_valid_after(min(now + _ISSUING_LIFE, _not_after(self.cert)))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(_KU_CA, critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .add_extension(_aki(self.cert), critical=False)
                .add_extension(x509.NameConstraints(permitted_subtrees=subtrees,
                                                    excluded_subtrees=None), critical=True)
                .sign(root_key, hashes.SHA256()))
        return key, cert

    def _permits(self, g: x509.GeneralName) -> bool:
        """Whether clients enforcing the constraints accept `g` (as RFC 5280 matches them:
        a DNS name also covers its subdomains). Only the names given count, not the
        placeholders standing for "none of this type"."""
        for p in self._names:
            if type(p) is not type(g):
                continue
            if isinstance(g, x509.DNSName):
                if g.value == p.value or g.value.endswith("." + p.value):
                    return True
            elif g.value == p.value:
                return True
        return False

    # ------------------------------------------------------------------ leaves

    def server_context(self, names: Iterable[str], alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
        """A context presenting a leaf for `names` (those within the constraints), and
        the intermediate, offering `alpn`. Contexts are shared by every session asking the
        same: callers must not change them."""
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
        if self._constraints is None:
            self.constrain(names)   # a caller that never said: what it asks for first
        elif not self._lasts(self.issuing):
            self.constrain(str(g.value) for g in self._names)   # running for a year
        sans = [g for g in sans if self._permits(g)]
        if not sans:
            raise ValueError(f"no name of {', '.join(names)} within the local CA's constraints")
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
        issuing = self.issuing
        # CN caps at 64, and SAN is what counts. Not an address: OpenSSL checks a CN that
        # looks like a host name against the DNS constraints when there's no DNS SAN.
        dns = [g.value for g in sans if isinstance(g, x509.DNSName)]
        cn = dns[0] if dns and len(dns[0]) <= 64 else "agentgate leaf"
        now = _now()
        end = min(now + _LEAF_LIFE, _not_after(issuing))
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(issuing.subject).public_key(self._leaf_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _BACKDATE).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(_aki(issuing), critical=False)
                .sign(self._issuing_key, hashes.SHA256()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        # load_cert_chain only takes paths: mkstemp makes the file 0600 (the directory
        # is 0755, ca.pem being public), and it is gone right after loading. The
        # certificates before the key: the ones after the leaf are sent as its chain.
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".leaf-", suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_cert_pem(leaf) + _cert_pem(issuing))
                f.write(_key_pem(self._leaf_key))
            ctx.load_cert_chain(tmp)
        finally:
            os.unlink(tmp)
        return ctx, end.timestamp()

    # ------------------------------------------------------------------ for clients

    def bundle(self, system: str | None = None) -> pathlib.Path:
        """bundle.pem: the system's CAs followed by ours, for clients that take one file
        replacing their trust list (see trust_env). Rewritten only when it changes."""
        out = self.directory / "bundle.pem"
        sys_pem = self._system_pem(system, out)
        if sys_pem and not sys_pem.endswith(b"\n"):
            sys_pem += b"\n"
        data = sys_pem + self.cert_path.read_bytes()
        try:
            if out.read_bytes() == data:
                return out
        except FileNotFoundError:
            pass
        write_file(self.directory, "bundle.pem", data, 0o644, replace=True)
        return out

    @staticmethod
    def _system_pem(system: str | None, out: pathlib.Path) -> bytes:
        if system is not None:
            candidates = [system]
        else:
            paths = ssl.get_default_verify_paths()
            candidates = [p for p in (paths.cafile, paths.openssl_cafile, _SYSTEM_BUNDLE) if p]
        for p in candidates:
            # SSL_CERT_FILE (which cafile follows) may be our own bundle: don't nest it.
            if os.path.realpath(p) == os.path.realpath(out):
                continue
            try:
                return pathlib.Path(p).read_bytes()
            except FileNotFoundError:
                continue
            except OSError as e:
                raise CAError(f"cannot read system CA bundle {p}: {e.strerror}") from None
        return b""
