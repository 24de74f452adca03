"""The name-constrained intermediate: what trusting ca.pem lets its holder sign, checked
with real clients (Python's ssl, openssl verify/s_client, curl), no crypto mocked."""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import hostagent.tls as tls
from tests.hostagent.tls import race
from hostagent.tls import LocalCA, trust_env
from tests.hostagent.tls.test_ca import DNS, TLSServer, _leaf_from, py_connect

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary")


@pytest.fixture
def ca(tmp_path):
    return LocalCA.load_or_create(tmp_path / "ca")


def serial(ca) -> int:
    return x509.load_pem_x509_certificate(ca.issuing_path.read_bytes()).serial_number


def sans(cert) -> list[str]:
    return [str(g.value) for g in
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]


def forge(ca, name: str, tmp_path):
    """A leaf for `name` signed with the intermediate's key as stored on disk: what a thief
    of issuing.key could make. Returns the PEM file holding leaf, intermediate, leaf key."""
    ikey = serialization.load_pem_private_key((ca.directory / "issuing.key").read_bytes(), None)
    issuing = x509.load_pem_x509_certificate(ca.issuing_path.read_bytes())
    try:
        gn = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        gn = x509.DNSName(name)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    leaf = (x509.CertificateBuilder()
            # not host-like, so OpenSSL doesn't also check it against the DNS constraints
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")]))
            .issuer_name(issuing.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([gn]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ikey.public_key()), critical=False)
            .sign(ikey, hashes.SHA256()))
    path = tmp_path / f"forged-{name.replace(':', '_')}.pem"
    path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM)
                     + issuing.public_bytes(serialization.Encoding.PEM)
                     + key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    return path


def openssl_verify(ca, chain_pem):
    # The file holds leaf, intermediate and key: verify reads the first certificate.
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca.cert_path), "-untrusted",
         str(ca.issuing_path), str(chain_pem)], capture_output=True, text=True, timeout=30)


def serve_file(chain_pem) -> TLSServer:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain_pem)
    return TLSServer(ctx)


# --- What trusting ca.pem allows ---------------------------------------------------------------

def test_handshake_sends_intermediate(ca):
    ca.constrain([DNS, "127.0.0.1"])
    s = TLSServer(ca.server_context([DNS, "127.0.0.1"]))
    try:
        # The client trusts only the root: succeeding means the server sent the intermediate.
        for name in (DNS, "127.0.0.1"):
            client = ssl.create_default_context(cafile=str(ca.cert_path))
            with socket.create_connection(("127.0.0.1", s.port), timeout=10) as raw:
                with client.wrap_socket(raw, server_hostname=name) as t:
                    if hasattr(t, "get_verified_chain"):   # Python >= 3.13
                        assert len(t.get_verified_chain()) == 3
                    t.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    assert t.recv(4096).endswith(b"ok")
        if shutil.which("openssl"):
            out = subprocess.run(
                ["openssl", "s_client", "-connect", f"127.0.0.1:{s.port}", "-showcerts",
                 "-verify_return_error", "-CAfile", str(ca.cert_path), "-servername", DNS,
                 "-verify_hostname", DNS], stdin=subprocess.DEVNULL, capture_output=True,
                text=True, timeout=30)
            assert out.returncode == 0, out.stdout + out.stderr
            assert out.stdout.count("-----BEGIN CERTIFICATE-----") == 2   # leaf, intermediate
            assert "depth=2" in out.stderr + out.stdout                    # ... up to the root
            assert "Verify return code: 0 (ok)" in out.stdout
    finally:
        s.close()


def test_intermediate_contents(ca):
    ca.constrain([DNS, "127.0.0.1", "::ffff:10.0.0.1"])
    i = ca.issuing
    assert i == x509.load_pem_x509_certificate(ca.issuing_path.read_bytes())
    assert i.issuer == ca.cert.subject != i.subject
    i.verify_directly_issued_by(ca.cert)
    bc = i.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = i.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    eku = i.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = i.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    i.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    nc = i.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical and nc.value.excluded_subtrees is None
    assert sorted(map(str, (g.value for g in nc.value.permitted_subtrees))) == sorted([
        DNS, "127.0.0.1/32", "10.0.0.1/32", "::ffff:a00:1/128"])
    life = i.not_valid_after_utc - i.not_valid_before_utc
    assert life == dt.timedelta(days=365, hours=1)


@pytest.mark.parametrize("given, placeholders", [
    ([DNS], {"0.0.0.0/32", "::/128"}),
    (["127.0.0.1"], {"invalid", "::/128"}),
    (["::1"], {"invalid", "0.0.0.0/32"}),
])
def test_every_name_type_is_constrained(ca, given, placeholders):
    # RFC 5280: a type left out of permittedSubtrees would be permitted without limit.
    ca.constrain(given)
    nc = ca.issuing.extensions.get_extension_for_class(x509.NameConstraints).value
    got = {str(g.value) for g in nc.permitted_subtrees}
    assert placeholders <= got and len(got) == len(placeholders) + 1


@needs_openssl
@pytest.mark.parametrize("given, forged", [
    ([DNS, "127.0.0.1"], "evil.example.com"),
    ([DNS, "127.0.0.1"], "x" + DNS),                # a suffix, not a subdomain
    ([DNS, "127.0.0.1"], "10.9.9.9"),
    ([DNS, "127.0.0.1"], "::1"),                    # the other address family
    ([DNS], "10.9.9.9"),                            # addresses when only names were given
    ([DNS], "::1"),
    (["127.0.0.1"], "evil.example.com"),            # names when only addresses were given
])
def test_forged_leaf_outside_constraints_fails(ca, tmp_path, given, forged):
    ca.constrain(given)
    chain = forge(ca, forged, tmp_path)
    out = openssl_verify(ca, chain)
    assert out.returncode != 0, out.stdout
    assert "permitted subtree violation" in out.stdout + out.stderr

    s = serve_file(chain)
    try:
        with pytest.raises(ssl.SSLCertVerificationError, match="permitted subtree violation"):
            py_connect(ca, s.port, forged)
        if shutil.which("curl") and ":" not in forged:
            r = subprocess.run(
                ["curl", "-sS", "--noproxy", "*", "--cacert", str(ca.cert_path),
                 "--connect-to", f"{forged}:{s.port}:127.0.0.1:{s.port}",
                 f"https://{forged}:{s.port}/"], capture_output=True, text=True, timeout=30)
            assert r.returncode == 60, r.stderr   # CURLE_PEER_FAILED_VERIFICATION
    finally:
        s.close()


@needs_openssl
@pytest.mark.parametrize("forged", ["sub." + DNS, DNS, "127.0.0.1"])
def test_forged_leaf_inside_constraints_verifies(ca, tmp_path, forged):
    # The control for the test above: the same forgery within the constraints passes.
    ca.constrain([DNS, "127.0.0.1"])
    chain = forge(ca, forged, tmp_path)
    out = openssl_verify(ca, chain)
    assert out.returncode == 0, out.stdout + out.stderr
    s = serve_file(chain)
    try:
        assert py_connect(ca, s.port, forged)[0].endswith(b"ok")
    finally:
        s.close()


# --- server_context within the constraints ------------------------------------------------------

def test_server_context_drops_names_outside(ca):
    ca.constrain([DNS, "127.0.0.1"])
    leaf = _leaf_from(ca, ["other.example", "x" + DNS, "SUB." + DNS, "10.1.1.1", DNS,
                           "::ffff:127.0.0.1", "127.0.0.1"])
    # ::ffff:127.0.0.1 also names 127.0.0.1 (permitted), but its own form is not
    assert sans(leaf) == ["sub." + DNS, DNS, "127.0.0.1"]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "sub." + DNS
    with pytest.raises(ValueError,
                       match="no name of other.example, 10.1.1.1 within the local CA's"):
        ca.server_context(["other.example", "10.1.1.1"])


def test_ip_only_leaf_has_no_hostlike_cn(ca, tmp_path):
    # OpenSSL checks a host-like CN against the DNS constraints when there is no DNS SAN.
    ca.constrain(["127.0.0.1"])
    leaf = _leaf_from(ca, ["127.0.0.1"])
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "agentgate leaf"
    if shutil.which("openssl"):
        p = tmp_path / "leaf.pem"
        p.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        out = openssl_verify(ca, p)
        assert out.returncode == 0, out.stdout + out.stderr


def test_first_server_context_constrains(ca):
    assert ca.issuing is None and not ca.issuing_path.exists()
    ca.server_context(["a.example", "127.0.0.1"])
    nc = ca.issuing.extensions.get_extension_for_class(x509.NameConstraints).value
    assert {str(g.value) for g in nc.permitted_subtrees} == {
        "a.example", "127.0.0.1/32", "::/128"}
    ca.server_context(["b.a.example"])
    with pytest.raises(ValueError, match="within the local CA's constraints"):
        ca.server_context(["b.example"])


def test_changed_constraints_clear_the_cache(ca):
    ca.constrain(["a.example", "b.example"])
    a = ca.server_context(["a.example"])
    ca.constrain(["b.example", "a.example."])           # the same set: nothing changes
    assert ca.server_context(["a.example"]) is a
    ca.constrain(["a.example", "c.example"])
    assert ca.server_context(["a.example"]) is not a    # signed by the new intermediate
    with pytest.raises(ValueError):
        ca.server_context(["b.example"])


# --- Keeping and replacing the intermediate ------------------------------------------------------

def test_same_set_reuses_intermediate_changed_set_keeps_root(ca, tmp_path):
    root = ca.cert_path.read_bytes()
    ca.constrain([DNS, "127.0.0.1"])
    first = serial(ca)
    ca.constrain(["127.0.0.1", DNS.upper() + "."])
    assert serial(ca) == first == ca.issuing.serial_number
    again = LocalCA.load_or_create(tmp_path / "ca")       # another process, later
    again.constrain([DNS, "127.0.0.1"])
    assert again.issuing.serial_number == first

    again.constrain([DNS, "127.0.0.2"])
    assert serial(again) != first == ca.issuing.serial_number
    assert again.cert_path.read_bytes() == root
    # the old intermediate's leaves still chain to the root, the new one's too
    for c in (ca, again):
        s = TLSServer(c.server_context([DNS]))
        try:
            assert py_connect(c, s.port, DNS)[0].endswith(b"ok")
        finally:
            s.close()
    assert not [p for p in ca.directory.iterdir() if p.name.startswith(".")]


def test_expiring_intermediate_is_replaced(ca, monkeypatch):
    ca.constrain([DNS])
    first = ca.issuing
    end = first.not_valid_after_utc
    monkeypatch.setattr(tls, "_now", lambda: end - dt.timedelta(days=31))
    ca.constrain([DNS])
    assert ca.issuing.serial_number == first.serial_number
    monkeypatch.setattr(tls, "_now", lambda: end - dt.timedelta(days=29))
    ca.constrain([DNS])
    assert ca.issuing.serial_number != first.serial_number


def test_long_running_server_context_renews_intermediate(ca, monkeypatch):
    ca.server_context([DNS])
    first = ca.issuing
    soon = first.not_valid_after_utc - dt.timedelta(days=3)
    monkeypatch.setattr(tls, "_now", lambda: soon)
    ctx = ca.server_context([DNS])
    assert ca.issuing.serial_number != first.serial_number
    assert ca._cache[(frozenset([x509.DNSName(DNS)]), ())] == (
        ctx, (soon + dt.timedelta(days=7)).timestamp())


def test_intermediate_never_outlives_root(ca, monkeypatch):
    soon = ca.cert.not_valid_after_utc - dt.timedelta(days=100)
    monkeypatch.setattr(tls, "_now", lambda: soon)
    ca.constrain([DNS])
    assert ca.issuing.not_valid_after_utc == ca.cert.not_valid_after_utc
    # within 30 days of the end it can't do better: kept, not minted at every call
    monkeypatch.setattr(tls, "_now", lambda: soon + dt.timedelta(days=80))
    first = ca.issuing.serial_number
    ca.constrain([DNS])
    ca.server_context([DNS])
    assert ca.issuing.serial_number == first


@pytest.mark.parametrize("spoil", ["other root", "garbage", "mismatched key", "loose key"])
def test_unusable_intermediate_is_replaced(ca, tmp_path, spoil):
    ca.constrain([DNS])
    first = ca.issuing.serial_number
    d = ca.directory
    if spoil == "other root":
        other = LocalCA.load_or_create(tmp_path / "other")
        other.constrain([DNS])   # the same constraints, another root
        for f in ("issuing.pem", "issuing.key"):
            shutil.copy(other.directory / f, d / f)
    elif spoil == "garbage":
        (d / "issuing.pem").write_text("not a certificate\n")
    elif spoil == "mismatched key":
        (d / "issuing.key").write_bytes(tls._key_pem(ec.generate_private_key(ec.SECP256R1())))
    else:
        os.chmod(d / "issuing.key", 0o644)
    again = LocalCA.load_or_create(d)
    again.constrain([DNS])
    assert again.issuing.serial_number != first
    again.issuing.verify_directly_issued_by(again.cert)
    assert stat.S_IMODE((d / "issuing.key").stat().st_mode) == 0o600
    s = TLSServer(again.server_context([DNS]))
    try:
        assert py_connect(again, s.port, DNS)[0].endswith(b"ok")
    finally:
        s.close()


def _issuing_serial(directory):
    ca = LocalCA.load_or_create(directory)
    ca.constrain([DNS, "127.0.0.1"])
    return ca.issuing.serial_number


def test_racing_processes_share_one_intermediate(tmp_path):
    d = tmp_path / "race" / "ca"
    got = race(_issuing_serial, d)
    assert all(isinstance(g, int) for g in got), got
    assert len(set(got)) == 1
    assert sorted(p.name for p in d.iterdir()) == ["ca.key", "ca.pem", "issuing.key", "issuing.pem"]


# --- The root -----------------------------------------------------------------------------------

def _old_root(d):
    """A root as earlier versions made it: path_length=0, so it can't sign an intermediate."""
    d.mkdir(parents=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old agentgate CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (d / "ca.key").write_bytes(tls._key_pem(key))
    os.chmod(d / "ca.key", 0o600)
    (d / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return (d / "ca.key").read_bytes(), (d / "ca.pem").read_bytes()


def test_old_root_is_remade(tmp_path):
    d = tmp_path / "ca"
    old_key, old_pem = _old_root(d)
    ca = LocalCA.load_or_create(d)
    assert ca.remade
    assert (d / "ca.pem.old").read_bytes() == old_pem
    assert (d / "ca.key.old").read_bytes() == old_key
    assert stat.S_IMODE((d / "ca.key.old").stat().st_mode) == 0o600
    assert ca.cert_path.read_bytes() != old_pem
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 1
    s = TLSServer(ca.server_context([DNS]))
    try:
        assert py_connect(ca, s.port, DNS)[0].endswith(b"ok")
    finally:
        s.close()
    again = LocalCA.load_or_create(d)
    assert not again.remade and again.cert == ca.cert


def test_fresh_root_not_remade(ca):
    assert not ca.remade
    assert not LocalCA.load_or_create(ca.directory).remade


def test_root_key_not_kept_in_memory(ca):
    root = tls._spki(ca.cert.public_key())
    ca.constrain([DNS])
    ca.server_context([DNS])

    def private_keys(obj):
        return [v for v in vars(obj).values() if isinstance(v, ec.EllipticCurvePrivateKey)]

    held = private_keys(ca)
    assert held   # the intermediate's and the leaves'
    assert all(tls._spki(k.public_key()) != root for k in held)


def test_key_modes(ca):
    ca.constrain([DNS])
    d = ca.directory
    assert stat.S_IMODE((d / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "issuing.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "issuing.pem").stat().st_mode) == 0o644
    assert (d / "issuing.key").stat().st_uid == os.getuid()


# --- The bundle and the environment --------------------------------------------------------------

def certs(path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def test_bundle_with_given_system_bundle(ca, tmp_path):
    system = tmp_path / "system.pem"
    others = [LocalCA.load_or_create(tmp_path / f"o{i}").cert_path.read_bytes() for i in (1, 2)]
    system.write_bytes(others[0] + others[1].rstrip(b"\n"))   # no final newline
    b = ca.bundle(str(system))
    assert b == ca.directory / "bundle.pem"
    assert stat.S_IMODE(b.stat().st_mode) == 0o644
    got = certs(b)
    assert got[:2] == certs(system) and got[2:] == [ca.cert]
    before = b.stat().st_ino
    assert ca.bundle(str(system)) == b
    assert b.stat().st_ino == before               # unchanged: not rewritten
    system.write_bytes(others[0])
    ca.bundle(str(system))
    assert certs(b) == [certs(system)[0], ca.cert]
    assert not [p for p in ca.directory.iterdir() if p.name.startswith(".")]


def test_bundle_without_system_bundle(ca, tmp_path):
    b = ca.bundle(str(tmp_path / "missing.pem"))
    assert b.read_bytes() == ca.cert_path.read_bytes()


def test_bundle_default_is_the_system_one(ca, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    system = ssl.get_default_verify_paths().cafile or tls._SYSTEM_BUNDLE
    if not os.path.exists(system):
        pytest.skip("no system CA bundle")
    # Compared as text: system bundles may hold certificates cryptography frowns upon.
    sys_pem = open(system, "rb").read()
    got = ca.bundle().read_bytes()
    assert got.startswith(sys_pem) and got.endswith(ca.cert_path.read_bytes())
    count = got.count(b"-----BEGIN CERTIFICATE-----")
    assert count == sys_pem.count(b"-----BEGIN CERTIFICATE-----") + 1 > 1
    # SSL_CERT_FILE pointing at our own bundle (as trust_env sets it) must not nest it
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.directory / "bundle.pem"))
    assert ca.bundle().read_bytes() == got


def test_trust_env_and_real_clients(ca, tmp_path):
    b = ca.bundle(str(tmp_path / "missing.pem"))
    env = trust_env(b, ca.cert_path)
    assert env.pop("NODE_EXTRA_CA_CERTS") == str(ca.cert_path)
    assert set(env) == {
        "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO",
        "AWS_CA_BUNDLE", "PIP_CERT", "HTTPLIB2_CA_CERTS", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
        "CARGO_HTTP_CAINFO", "NIX_SSL_CERT_FILE", "DENO_CERT", "PGSSLROOTCERT"}
    assert set(env.values()) == {str(b)}

    s = TLSServer(ca.server_context([DNS, "127.0.0.1"]))
    try:
        client = ssl.create_default_context(cafile=env["SSL_CERT_FILE"])
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as raw:
            with client.wrap_socket(raw, server_hostname=DNS):
                pass
        if shutil.which("curl"):
            r = subprocess.run(
                ["curl", "-sS", "--noproxy", "*", f"https://127.0.0.1:{s.port}/"],
                capture_output=True, text=True, timeout=30,
                env={"PATH": os.environ["PATH"], **trust_env(b, ca.cert_path)})
            assert r.returncode == 0 and r.stdout == "ok", r.stderr
    finally:
        s.close()
