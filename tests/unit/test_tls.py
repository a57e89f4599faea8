"""Certificates and bundles; the TLS transport that sends at once."""
from __future__ import annotations

import datetime
import os
import stat

import pytest
from cryptography import x509
from twisted.internet import abstract, error
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.test import iosim

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


def _sending(wire, data: bytes):
    tls.send_now(wire, data)
    return wire


def test_encrypted_bytes_go_to_the_socket_at_once():
    """With nothing buffered, a message is on the socket before the reactor turns."""
    wire = _sending(_Wire(room=1 << 20), b"lease")
    assert wire.sent == [b"lease"] and not wire._tempDataBuffer


def test_what_the_socket_does_not_take_waits_in_the_transport():
    """The rest waits, uncopied, as the transport's send buffer; then later bytes behind it."""
    data = b"lease"
    wire = _sending(_Wire(room=3), data)
    assert wire.sent == [b"lea"] and wire.dataBuffer is data and wire.offset == 3
    assert wire in wire.reactor.getWriters()
    _sending(wire, b" and more")
    wire.room = 1 << 20
    wire.doWrite()
    assert b"".join(wire.sent) == b"lease and more"


def test_bytes_already_waiting_keep_their_place():
    """Once anything waits in the transport, later bytes queue behind it, never ahead."""
    wire = _Wire(room=1 << 20)
    wire.write(b"first")
    _sending(wire, b"second")
    assert wire.sent == [] and wire._tempDataBuffer == [b"first", b"second"]


# -- the TLS transport, two real TLS ends joined in memory (twisted.test.iosim) ------------
class _Collect(Protocol):
    def connectionMade(self) -> None:
        self.data, self.lost = bytearray(), None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.lost = reason


class _CollectViews(_Collect):
    """Takes views of the TLS transport's buffer (as MessageProtocol does), copying them."""

    takes_views = True

    def connectionMade(self) -> None:
        super().connectionMade()
        self.kinds = set()

    def dataReceived(self, data) -> None:
        self.kinds.add(type(data))
        self.data += data


def _ends(ca, server_ca=None, client_bundle=None, app=_Collect):
    """(server's application protocol, client's, TLS wrappers, pump) after the handshake."""
    signer = server_ca or ca
    cert, key = signer.issue(tls.SERVER_NAME, server_hosts=["127.0.0.1"])
    server_ctx = tls.server_options(tls.cert_pem(ca.cert), tls.cert_pem(cert), tls.key_pem(key))
    bundle = client_bundle or tls.make_bundle(ca, "alice", "client", "127.0.0.1:1")[0]
    sp = tls._factory()(server_ctx, True, Factory.forProtocol(app)).buildProtocol(None)
    cp = tls._factory()(tls.client_options(bundle), False, Factory.forProtocol(app)).buildProtocol(None)
    server, client = sp.wrappedProtocol, cp.wrappedProtocol
    pump = iosim.connect(sp, iosim.FakeTransport(sp, isServer=True), cp, iosim.FakeTransport(cp, isServer=False))
    return server, client, (sp, cp), pump


def test_large_and_small_writes_cross_intact_both_ways(ca):
    """Writes made before the handshake ends, many records at once and single bytes all
    arrive in order; the server sees the client's certificate."""
    big = os.urandom(3 << 20)
    server, client, (sp, _), pump = _ends(ca)
    assert sp._ready
    client.transport.write(b"x")
    client.transport.write(big)
    client.transport.writeSequence([b"a", b"b"])
    pump.flush()
    assert bytes(server.data) == b"x" + big + b"ab"
    server.transport.write(big[::-1])
    pump.flush()
    assert bytes(client.data) == big[::-1]
    name, _ = tls.peer_identity(server.transport)
    assert name == "alice"


def test_views_written_and_received_are_copied_in_time(ca):
    """A view written is encrypted before writeSequence returns (its memory may change
    after); a protocol that takes views gets each read's plaintext as a view of the shared
    buffer, several times over for a read larger than it, all intact."""
    big = bytearray(os.urandom(3 << 20))
    expected = bytes(big)
    server, client, _, pump = _ends(ca, app=_CollectViews)
    with memoryview(big) as view:
        client.transport.writeSequence([b"head", view[:1 << 20], view[1 << 20:]])
    big[:] = bytes(len(big))
    pump.flush()
    assert bytes(server.data) == b"head" + expected and server.kinds == {memoryview}
    assert tls._spare is not None and len(tls._spare) < len(expected)


class _CloseOnData(_CollectViews):
    def dataReceived(self, data) -> None:
        super().dataReceived(data)
        self.transport.loseConnection()


def test_a_protocol_that_closes_while_a_large_read_is_handed_on_is_not_read_further(ca):
    """Closing from dataReceived, with more decrypted data of the same read to come, ends
    the connection cleanly after that one delivery."""
    server, client, _, pump = _ends(ca, app=_CloseOnData)
    client.transport.write(os.urandom(3 << 20))
    pump.flush()
    assert 0 < len(server.data) <= tls.READ_BUFFER
    assert server.lost is not None and server.lost.check(error.ConnectionDone)


def test_closing_ends_both_sides_cleanly(ca):
    """A close_notify ends the peer's connection as done, not as an error (and does not
    leave its reader spinning)."""
    server, client, _, pump = _ends(ca)
    client.transport.loseConnection()
    pump.flush()
    assert client.lost is not None and server.lost is not None
    assert server.lost.check(error.ConnectionDone)


def test_a_server_of_another_ca_is_refused_with_the_reason(ca):
    server, client, _, pump = _ends(ca, server_ca=tls.Authority.create())
    pump.flush()
    assert client.lost is not None and server.data == b"" and client.data == b""
    assert tls.describe_error(client.lost.value) == "certificate not signed by the cluster's CA"


def test_an_expired_client_certificate_is_refused_with_the_reason(ca):
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    bundle, _ = tls.make_bundle(ca, "bob", "client", "127.0.0.1:1", not_before=past, days=1)
    server, client, (_, cp), pump = _ends(ca, client_bundle=bundle)
    cp.write(b"hello?")
    pump.flush()
    assert server.data == b"" and server.lost is not None and client.lost is not None
    assert tls.describe_error(server.lost.value) == "certificate expired"


def test_closing_during_the_handshake_drops_the_connection(ca):
    """A peer that never finishes its handshake is dropped at once, not kept open for the
    writes waiting behind it."""
    cert, key = ca.issue(tls.SERVER_NAME, server_hosts=["127.0.0.1"])
    server_ctx = tls.server_options(tls.cert_pem(ca.cert), tls.cert_pem(cert), tls.key_pem(key))
    sp = tls._factory()(server_ctx, True, Factory.forProtocol(_Collect)).buildProtocol(None)
    wire = iosim.FakeTransport(sp, isServer=True)
    sp.makeConnection(wire)
    sp.write(b"waiting for the handshake")
    sp.loseConnection()
    assert wire.disconnecting and wire.disconnectReason is not None
