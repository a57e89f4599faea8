"""Certificates and bundles."""
from __future__ import annotations

import stat

import pytest
from cryptography import x509

from dsage import tls


@pytest.fixture(scope="module")
def ca():
    return tls.Authority.create()


def test_bundle_round_trip_and_mode(tmp_path, ca):
    """A bundle saves with mode 0600 and loads back with the same parts."""
    bundle, serial = tls.make_bundle(ca, "alice", "client", "example.org:8081")
    path = tmp_path / "alice.pem"
    bundle.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = tls.Bundle.load(path)
    assert (loaded.name, loaded.role, loaded.server) == ("alice", "client", "example.org:8081")
    assert loaded.certificate().serial_number == serial
    assert loaded.dumps() == bundle.dumps()


def test_client_certificates_cannot_pass_for_the_server(ca):
    """Only the server's certificate carries DNS names (what clients verify)."""
    server, _ = ca.issue("dsage-server", server_hosts=["lab.example.org"])
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "dsage-server" in names.get_values_for_type(x509.DNSName)
    client, _ = ca.issue("alice")
    with pytest.raises(x509.ExtensionNotFound):
        client.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    with pytest.raises(ValueError):
        tls.make_bundle(ca, "dsage-server", "client", "x:1")


@pytest.mark.parametrize("name", ["", "a b", "../x", "x" * 65, "-lead"])
def test_bad_names_are_refused(name):
    """Names are plain words: no spaces, slashes or leading punctuation."""
    with pytest.raises(ValueError):
        tls.check_name(name)


def test_not_a_bundle_is_a_clear_error(tmp_path):
    """Loading something that is not a bundle says so."""
    path = tmp_path / "x.pem"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not a dsage bundle"):
        tls.Bundle.load(path)
    with pytest.raises(ValueError, match="no dsage bundle"):
        tls.Bundle.load(tmp_path / "missing.pem")


def test_authority_saves_its_key_privately(tmp_path, ca):
    """The CA key is written 0600 and loads back."""
    ca.save(tmp_path)
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    assert tls.Authority.load(tmp_path).cert == ca.cert
