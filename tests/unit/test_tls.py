"""Certificates and bundles; the TLS transport that sends at once."""
from __future__ import annotations

import stat

import pytest
from cryptography import x509
from OpenSSL.SSL import WantReadError
from twisted.internet import abstract
from twisted.internet.testing import MemoryReactor

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


class _Wire(abstract.FileDescriptor):
    """A TCP transport whose socket takes `room` bytes (Twisted's buffering, sends recorded)."""

    connected = True

    def __init__(self, room: int) -> None:
        super().__init__(MemoryReactor())
        self.room, self.sent = room, []

    def writeSomeData(self, data) -> int:
        n = min(self.room, len(data))
        self.sent.append(bytes(data[:n]))
        self.room -= n
        return n


class _BIO:
    """The encrypted bytes waiting in a TLS connection's send buffer."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def bio_read(self, n: int) -> bytes:
        if not self.data:
            raise WantReadError()
        out, self.data = self.data[:n], self.data[n:]
        return out


def _sending(wire, data: bytes):
    proto = object.__new__(tls._write_through().protocol)
    proto._tlsConnection, proto.transport = _BIO(data), wire
    proto._flushSendBIO()
    return wire


def test_encrypted_bytes_go_to_the_socket_at_once():
    """With nothing buffered, a message is on the socket before the reactor turns."""
    wire = _sending(_Wire(room=1 << 20), b"lease")
    assert wire.sent == [b"lease"] and not wire._tempDataBuffer


def test_what_the_socket_does_not_take_waits_in_the_transport():
    wire = _sending(_Wire(room=3), b"lease")
    assert wire.sent == [b"lea"] and wire._tempDataBuffer == [b"se"]
    assert wire in wire.reactor.getWriters()


def test_bytes_already_waiting_keep_their_place():
    """Once anything waits in the transport, later bytes queue behind it, never ahead."""
    wire = _Wire(room=1 << 20)
    wire.write(b"first")
    _sending(wire, b"second")
    assert wire.sent == [] and wire._tempDataBuffer == [b"first", b"second"]
