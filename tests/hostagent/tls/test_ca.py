"""The local CA against real TLS clients: Python's ssl, openssl s_client and curl."""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import hostagent.tls as tls
from tests.hostagent.tls import race
from hostagent.tls import CAError, LocalCA

DNS = "db.example.internal"


class TLSServer:
    """Accepts connections on 127.0.0.1:0, handshakes with ctx, answers one HTTP/1.0 response."""

    def __init__(self, ctx: ssl.SSLContext, host: str = "127.0.0.1"):
        self.ctx = ctx
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                try:
                    with self.ctx.wrap_socket(conn, server_side=True) as tconn:
                        if tconn.recv(4096):
                            tconn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                except (ssl.SSLError, OSError):
                    pass  # the client refused our certificate or hung up

    def close(self):
        # close() alone doesn't wake a thread blocked in accept() on Linux; shutdown does.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


@pytest.fixture
def ca(tmp_path):
    return LocalCA.load_or_create(tmp_path / "ca")


@pytest.fixture
def server(ca):
    started = []

    def start(names, host="127.0.0.1"):
        s = TLSServer(ca.server_context(names), host)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def py_connect(ca, port, server_hostname, host="127.0.0.1"):
    client = ssl.create_default_context(cafile=str(ca.cert_path))
    assert client.check_hostname
    with socket.create_connection((host, port), timeout=10) as raw:
        with client.wrap_socket(raw, server_hostname=server_hostname) as t:
            t.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return t.recv(4096), t.version()


def fingerprint(path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).fingerprint(hashes.SHA256())


# --- Real clients -----------------------------------------------------------------------------

def test_python_client_dns_name(ca, server):
    s = server(["127.0.0.1", DNS.upper(), "", "other.example"])
    body, version = py_connect(ca, s.port, DNS)
    assert body.endswith(b"ok")
    assert version in ("TLSv1.2", "TLSv1.3")


def test_python_client_ip_name(ca, server):
    s = server([DNS, "127.0.0.1"])
    assert py_connect(ca, s.port, "127.0.0.1")[0].endswith(b"ok")


def test_python_client_rejects_unlisted_name(ca, server):
    s = server([DNS, "127.0.0.1"])
    with pytest.raises(ssl.SSLCertVerificationError, match="[Hh]ostname mismatch"):
        py_connect(ca, s.port, "evil.example.internal")
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        py_connect(ca, s.port, "127.0.0.2")


def test_python_client_rejects_other_ca(ca, server, tmp_path):
    other = LocalCA.load_or_create(tmp_path / "other")
    s = server([DNS])
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        py_connect(other, s.port, DNS)


def test_v4_mapped_ipv6_name_also_covers_ipv4(ca, server):
    s = server(["::ffff:127.0.0.1"])
    assert py_connect(ca, s.port, "127.0.0.1")[0].endswith(b"ok")


def test_ipv6_name(ca, server):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        s = server(["::1"], host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    assert py_connect(ca, s.port, "::1", host="::1")[0].endswith(b"ok")


def _s_client(ca, port, *verify):
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-verify_return_error",
         "-CAfile", str(ca.cert_path), *verify],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary")
def test_openssl_s_client(ca, server):
    s = server([DNS, "127.0.0.1"])
    ok = _s_client(ca, s.port, "-servername", DNS, "-verify_hostname", DNS)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Verify return code: 0 (ok)" in ok.stdout
    ok_ip = _s_client(ca, s.port, "-verify_ip", "127.0.0.1")
    assert ok_ip.returncode == 0, ok_ip.stdout + ok_ip.stderr
    bad = _s_client(ca, s.port, "-verify_hostname", "evil.example.internal")
    assert bad.returncode != 0
    assert "hostname mismatch" in bad.stdout + bad.stderr


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl binary")
def test_curl(ca, server):
    s = server([DNS])

    def curl(name):
        return subprocess.run(
            ["curl", "-sS", "--noproxy", "*", "--cacert", str(ca.cert_path),
             "--resolve", f"{name}:{s.port}:127.0.0.1", f"https://{name}:{s.port}/"],
            capture_output=True, text=True, timeout=30)

    ok = curl(DNS)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "ok"
    bad = curl("evil.example.internal")
    assert bad.returncode == 60, bad.stderr  # CURLE_PEER_FAILED_VERIFICATION


# --- Certificates -----------------------------------------------------------------------------

def _leaf_from(ca, names):
    """The certificate a context presents, fetched over a real handshake."""
    s = TLSServer(ca.server_context(names))
    try:
        client = ssl.create_default_context(cafile=str(ca.cert_path))
        client.check_hostname = False
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as raw:
            with client.wrap_socket(raw) as t:
                der = t.getpeercert(binary_form=True)
    finally:
        s.close()
    return x509.load_der_x509_certificate(der)


def test_leaf_and_ca_contents(ca):
    leaf = _leaf_from(ca, [" Db.Example.Internal. ", "::ffff:10.0.0.1", "[2001:DB8::1]", ""])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [DNS]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("::ffff:10.0.0.1"),
        ipaddress.ip_address("2001:db8::1")]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DNS
    assert leaf.issuer == ca.issuing.subject != ca.cert.subject  # signed by the intermediate
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(days=7, hours=1)
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest

    cn = ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == f"agentgate local CA ({socket.gethostname()})"[:64]
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1  # room for the intermediate
    ku = ca.cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    life = ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc
    assert dt.timedelta(days=3650) < life < dt.timedelta(days=3660)


def test_no_names_is_an_error(ca):
    with pytest.raises(ValueError):
        ca.server_context(["", "  "])


def test_context_cache(ca, monkeypatch):
    a = ca.server_context(["b.example", "127.0.0.1", "a.example"])
    assert ca.server_context(["A.example", "127.0.0.1", "b.example."]) is a
    assert ca.server_context(["a.example"]) is not a
    assert not [p for p in ca.cert_path.parent.iterdir() if p.name.startswith(".")]

    real_now = tls._now()
    monkeypatch.setattr(tls, "_now", lambda: real_now + dt.timedelta(days=5))
    assert ca.server_context(["a.example", "b.example", "127.0.0.1"]) is a
    monkeypatch.setattr(tls, "_now", lambda: real_now + dt.timedelta(days=6, hours=12))
    b = ca.server_context(["a.example", "b.example", "127.0.0.1"])
    assert b is not a
    assert ca.server_context(["127.0.0.1", "a.example", "b.example"]) is b
    assert ca.server_context(["b.example", "127.0.0.1", "a.example"]) is b  # the first spelling
    assert ca.server_context(iter(["a.example."])) is not b


def test_cache_is_bounded(ca, monkeypatch):
    monkeypatch.setattr(tls, "_CACHE_MAX", 4)
    ca.constrain(f"n{i}.example" for i in range(10))
    first = ca.server_context(["n0.example"])
    for i in range(1, 10):
        ca.server_context([f"n{i}.example"])
    assert len(ca._cache) <= 4
    assert ca.server_context(["n0.example"]) is not first


# --- Storage ----------------------------------------------------------------------------------

def test_reload_gives_same_ca_and_modes(tmp_path):
    d = tmp_path / "nested" / "ca"
    old = os.umask(0o022)
    try:
        ca = LocalCA.load_or_create(d)
    finally:
        os.umask(old)
    assert ca.cert_path == d / "ca.pem"
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    assert stat.S_IMODE((d / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "ca.pem").stat().st_mode) == 0o644
    assert d.stat().st_uid == os.getuid()
    assert sorted(p.name for p in d.iterdir()) == ["ca.key", "ca.pem"]
    assert (d / "ca.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")

    again = LocalCA.load_or_create(d)
    assert fingerprint(again.cert_path) == fingerprint(ca.cert_path)
    assert again.cert == ca.cert


def test_mismatched_key_and_cert(tmp_path):
    LocalCA.load_or_create(tmp_path / "a")
    LocalCA.load_or_create(tmp_path / "b")
    shutil.copy(tmp_path / "a" / "ca.pem", tmp_path / "b" / "ca.pem")
    with pytest.raises(CAError, match=f"{tmp_path / 'b' / 'ca.pem'} does not match") as e:
        LocalCA.load_or_create(tmp_path / "b")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("missing", ["ca.key", "ca.pem"])
def test_only_one_file_present(tmp_path, missing):
    d = tmp_path / "ca"
    LocalCA.load_or_create(d)
    (d / missing).unlink()
    with pytest.raises(CAError, match=f"{d / missing} is missing.*remove {d}"):
        LocalCA.load_or_create(d)
    assert not (d / missing).exists()  # never silently regenerated


def test_garbage_files(tmp_path):
    d = tmp_path / "ca"
    LocalCA.load_or_create(d)
    (d / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(CAError, match=f"{d / 'ca.pem'}"):
        LocalCA.load_or_create(d)
    (d / "ca.key").write_text("not a key\n")
    with pytest.raises(CAError, match=f"{d / 'ca.key'}"):
        LocalCA.load_or_create(d)


def test_cert_that_is_not_a_ca(tmp_path):
    d = tmp_path / "ca"
    LocalCA.load_or_create(d)
    key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a ca")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CAError, match=f"{d / 'ca.pem'} is not a CA"):
        LocalCA.load_or_create(d)


def test_expiring_ca_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "ca"
    ca = LocalCA.load_or_create(d)
    before = fingerprint(ca.cert_path)
    soon = ca.cert.not_valid_after_utc - dt.timedelta(days=29)
    monkeypatch.setattr(tls, "_now", lambda: soon)
    with pytest.raises(CAError, match=f"{d / 'ca.pem'} expires .*remove {d}"):
        LocalCA.load_or_create(d)
    assert fingerprint(ca.cert_path) == before


def test_leaf_never_outlives_ca(tmp_path, monkeypatch):
    ca = LocalCA.load_or_create(tmp_path / "ca")
    monkeypatch.setattr(tls, "_now", lambda: ca.cert.not_valid_after_utc - dt.timedelta(days=3))
    ctx = ca.server_context([DNS])
    assert ca._cache[(frozenset([x509.DNSName(DNS)]), ())] == (
        ctx, ca.cert.not_valid_after_utc.timestamp())


def _fingerprint_of_loaded(directory):
    return LocalCA.load_or_create(directory).cert.fingerprint(hashes.SHA256())


def test_racing_processes_agree(tmp_path):
    d = tmp_path / "race" / "ca"
    got = race(_fingerprint_of_loaded, d)
    assert all(isinstance(g, bytes) for g in got), got
    assert len(set(got)) == 1
    assert fingerprint(d / "ca.pem") == got[0]
