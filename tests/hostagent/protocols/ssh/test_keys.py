"""The proxy's SSH identity: its CA, its host certificate for the targets' names, and
the known_hosts OpenSSH reads (published per tree, merged, removed at stop)."""
from __future__ import annotations

import subprocess
from types import SimpleNamespace

import asyncssh
import pytest

from hostagent.protocols.ssh import keys


@pytest.fixture
def published(tmp_path, monkeypatch):
    monkeypatch.setattr(keys, "TRUST_DIR", tmp_path / "run" / "trust")
    monkeypatch.setattr(keys, "MERGED", tmp_path / "run" / "ssh_known_hosts")
    monkeypatch.setattr(keys, "SSH_CONFIG_D", tmp_path / "ssh_config.d")
    (tmp_path / "ssh_config.d").mkdir()
    return tmp_path


def target(name, addresses, names=()):
    return SimpleNamespace(name=name, addresses=tuple(addresses), names=tuple(names))


def test_the_host_certificate_names_the_targets_and_nothing_else(published):
    t = [target("a", [("127.0.0.1", 2222)], ["box.example"]), target("b", [("10.0.0.9", 22)])]
    ident = keys.SshIdentity(published / "state", "tree1", t)
    assert sorted(ident.cert.principals) == ["10.0.0.9", "127.0.0.1", "box.example"]
    line = ident.known_hosts_line().decode()
    assert line.startswith("@cert-authority 10.0.0.9,[127.0.0.1]:2222,[box.example]:2222 ")
    # OpenSSH reads the certificate as we mean it
    cert = published / "cert.pub"
    cert.write_bytes(ident.cert.export_certificate())
    shown = subprocess.run(["ssh-keygen", "-L", "-f", str(cert)], capture_output=True,
                           text=True, check=True).stdout
    assert "host certificate" in shown and "box.example" in shown
    # the CA and the host key are kept (0600): the next start certifies the same key
    again = keys.SshIdentity(published / "state", "tree1", t)
    assert again.host_key.public_data == ident.host_key.public_data
    assert oct((published / "state" / "ca").stat().st_mode & 0o777) == "0o600"
    known = asyncssh.import_known_hosts(line)
    assert known.match("127.0.0.1", "127.0.0.1", 2222)[1]      # a trusted CA for it


def test_trees_publish_side_by_side_and_clean_up(published):
    a = keys.SshIdentity(published / "sa", "tree-a", [target("a", [("127.0.0.1", 2201)])])
    b = keys.SshIdentity(published / "sb", "tree-b", [target("b", [("127.0.0.1", 2202)])])
    a.publish()
    b.publish()
    merged = keys.MERGED.read_text()
    assert "[127.0.0.1]:2201" in merged and "[127.0.0.1]:2202" in merged
    conf = (keys.SSH_CONFIG_D / keys.CONF_NAME).read_text()
    assert f"GlobalKnownHostsFile /etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2 " \
           f"{keys.MERGED}" in conf
    assert a.env()["AGENTGATE_SSH_KNOWN_HOSTS"] == str(a.known_hosts)
    a.unpublish()
    assert "2201" not in keys.MERGED.read_text() and "2202" in keys.MERGED.read_text()
    keys.unpublish_tree("tree-b")         # as `agentgate-hostagent cleanup` does
    assert not keys.MERGED.exists() and not (keys.SSH_CONFIG_D / keys.CONF_NAME).exists()
