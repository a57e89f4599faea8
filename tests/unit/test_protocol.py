"""Frames, codecs, fragments and the request/reply machinery over an in-memory transport."""
from __future__ import annotations

import struct

import pytest
from twisted.internet import defer
from twisted.internet.testing import StringTransport

from dsage import errors
from dsage.protocol import (EVENT, FRAGMENT, FRAME_DATA, REPLY, REQUEST, MessageProtocol, decode, encode,
                            fragments)


class Echo(MessageProtocol):
    """Answers `echo` and `boom`; records events."""

    def __init__(self):
        super().__init__()
        self.events = []

    def handle_request(self, verb, args):
        if verb == "echo":
            return args
        if verb == "later":
            return defer.succeed({"later": True})
        if verb == "boom":
            raise errors.AuthError("not you")
        return super().handle_request(verb, args)

    def handle_event(self, event, data):
        self.events.append((event, data))


def connect():
    proto = Echo()
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def frames(data: bytes) -> list[list]:
    out, parts = [], []
    while data:
        (n,) = struct.unpack("!I", data[:4])
        message = decode(data[4:4 + n])
        data = data[4 + n:]
        if message[0] == FRAGMENT:
            parts.append(message[2])
            if not message[1]:
                out.append(decode(b"".join(parts)))
                parts = []
        else:
            out.append(message)
    return out


def feed(proto, message) -> None:
    for frame in fragments(encode(message)):
        proto.dataReceived(frame)


def test_codec_round_trip_keeps_bytes_and_str_apart():
    """bytes stay bytes and str stays str through a frame."""
    msg = [REQUEST, 1, "x", {"b": b"\x00\xff", "s": "text", "n": None, "l": [1, 2.5]}]
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize("bad", [b"\xc1", encode("text"), encode([]), encode([9, 1]), encode([REQUEST, "1", "v", {}]),
                                 encode([REQUEST, 1, "v"]), encode([EVENT, "e", []]), encode([FRAGMENT, True, "x"]),
                                 encode([REQUEST, 1, "v", {1: 2}])])
def test_malformed_frames_are_protocol_errors(bad):
    """Anything but a well-formed message raises ProtocolError."""
    with pytest.raises(errors.ProtocolError):
        decode(bad)


def test_requests_are_answered_with_their_id():
    """A request gets a reply carrying its id and the handler's value."""
    proto, transport = connect()
    feed(proto, [REQUEST, 7, "echo", {"a": 1}])
    feed(proto, [REQUEST, 8, "later", {}])
    assert frames(transport.value()) == [[REPLY, 7, True, {"a": 1}], [REPLY, 8, True, {"later": True}]]


def test_errors_cross_the_wire_by_name():
    """A refused request becomes an error reply, rebuilt as the same exception type."""
    server, st = connect()
    feed(server, [REQUEST, 1, "boom", {}])
    reply = frames(st.value())[0]
    assert reply[:3] == [REPLY, 1, False] and reply[3]["type"] == "AuthError"
    client, ct = connect()
    d = client.call("boom")
    feed(client, reply)
    failures = []
    d.addErrback(failures.append)
    assert failures[0].check(errors.AuthError) and "not you" in str(failures[0].value)


def test_unknown_request_gets_an_error_reply():
    """An unknown verb is refused, not ignored."""
    proto, transport = connect()
    feed(proto, [REQUEST, 3, "nope", {}])
    assert frames(transport.value())[0][3]["type"] == "ProtocolError"


def test_large_messages_travel_in_fragments():
    """A message larger than a frame is split into fragments and reassembled."""
    proto, transport = connect()
    blob = bytes(range(256)) * (3 * FRAME_DATA // 256 + 10)
    feed(proto, [REQUEST, 1, "echo", {"blob": blob}])
    raw = transport.value()
    # The reply is fragmented too: every frame is within the limit.
    sizes, data = [], raw
    while data:
        (size,) = struct.unpack("!I", data[:4])
        sizes.append(size)
        data = data[4 + size:]
    assert len(sizes) >= 4 and max(sizes) <= proto.MAX_LENGTH
    client, _ = connect()
    d = client.call("echo")
    client.dataReceived(raw)
    assert d.result == {"blob": blob}


def test_fragments_are_plain_msgpack_and_any_encoding_of_them_is_taken():
    """The hand-written fragment envelope is the msgpack encoding of [3, more, data]; a
    peer that encodes fragments with msgpack itself (smaller bin headers) is understood."""
    blob = bytes(range(256)) * (2 * FRAME_DATA // 256 + 1)
    packed = encode([REQUEST, 1, "echo", {"blob": blob}])
    ours = [f[4:] for f in fragments(packed)]
    assert [decode(f)[:2] for f in ours] == [[FRAGMENT, True], [FRAGMENT, True], [FRAGMENT, False]]
    assert b"".join(decode(f)[2] for f in ours) == packed
    small = bytes(range(256)) * 1000
    packed = encode([REQUEST, 1, "echo", {"blob": small}])
    theirs = [encode([FRAGMENT, True, packed[:10]]), encode([FRAGMENT, True, packed[10:300]]),
              encode([FRAGMENT, False, packed[300:]])]         # bin 8, bin 16 and bin 32 data
    proto, transport = connect()
    for frame in theirs:
        proto.dataReceived(struct.pack("!I", len(frame)) + frame)
    client, _ = connect()
    d = client.call("echo")
    client.dataReceived(transport.value())
    assert d.result == {"blob": small}


def test_a_fragment_with_a_wrong_length_drops_the_connection():
    """A fragment whose declared data length is not its frame's is refused."""
    proto, transport = connect()
    frame = b"\x93\x03\xc3\xc6" + struct.pack("!I", 100) + b"x" * 50
    proto.dataReceived(struct.pack("!I", len(frame)) + frame)
    assert transport.disconnecting


def test_garbage_and_oversized_frames_drop_the_connection():
    """Undecodable or too large frames disconnect the peer."""
    proto, transport = connect()
    proto.dataReceived(struct.pack("!I", 3) + b"\xc1\xc1\xc1")
    assert transport.disconnecting
    proto, transport = connect()
    proto.dataReceived(struct.pack("!I", proto.MAX_LENGTH + 1) + b"x")
    assert transport.disconnecting


def test_events_are_delivered():
    """Pushed events reach handle_event without a reply."""
    proto, transport = connect()
    feed(proto, [EVENT, "job_done", {"job_id": 1}])
    assert proto.events == [("job_done", {"job_id": 1})] and transport.value() == b""


def test_pending_calls_fail_when_the_connection_is_lost():
    """Calls in flight fail with ConnectionLost when the link drops."""
    proto, transport = connect()
    d = proto.call("echo")
    proto.connectionLost(None)
    failures = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(errors.ConnectionLost)
    assert proto.call("echo").addErrback(failures.append) is not None and len(failures) == 2


def test_a_call_whose_arguments_cannot_be_sent_fails_alone():
    """Arguments msgpack cannot carry fail that call's Deferred; nothing stays pending (it
    used to fail again, unhandled, when the connection closed)."""
    proto, transport = connect()
    failures = []
    proto.call("echo", n=10**30).addErrback(failures.append)
    assert failures and failures[0].check(OverflowError) and proto._pending == {}
    assert transport.value() == b""
    proto.connectionLost(None)


def test_frames_split_anywhere_are_reassembled():
    """A stream cut at arbitrary points yields the same messages, in order."""
    proto, transport = connect()
    messages = [[REQUEST, i, "echo", {"n": i, "blob": bytes(i * 997 % 5000)}] for i in range(1, 40)]
    messages[20][3]["blob"] = bytes(range(256)) * (5 * FRAME_DATA // 512)     # in fragments
    stream = b"".join(f for m in messages for f in fragments(encode(m)))
    cut = 0
    for size in [1, 3, 7, 4096, 13, 65536] * 50:
        if cut >= len(stream):
            break
        proto.dataReceived(stream[cut:cut + size])
        cut += size
        assert len(proto._buffer) <= 65536 + 16    # a fragment's data does not wait there
    proto.dataReceived(stream[cut:])
    replies = frames(transport.value())
    assert [r[1] for r in replies] == list(range(1, 40))
    assert replies[5][3] == messages[5][3] and replies[20][3] == messages[20][3]


class CopyingTransport(StringTransport):
    """A transport that copies what it is given at once, as the TLS transport does."""

    copies_writes = True

    def __init__(self):
        super().__init__()
        self.sequences = []

    def writeSequence(self, parts):
        self.sequences.append([type(p) for p in parts])
        super().writeSequence([bytes(p) for p in parts])


def test_written_messages_reuse_the_packer_and_survive_an_unpackable_message():
    """Frames of successive messages (small, fragmented, larger than the packer keeps) all
    decode to their message, also after a message that could not be packed; a transport
    that copies at once gets the same bytes, large frames as a joined head and a view."""
    from dsage import protocol

    small = [EVENT, "x", {"n": 1}]
    large = [EVENT, "x", {"blob": bytes(range(256)) * (3 * FRAME_DATA // 256)}]
    huge = [EVENT, "x", {"blob": bytes(protocol.PACKER_KEEP + 1)}]
    for message in (small, large, small, huge, small):
        plain, copying = StringTransport(), CopyingTransport()
        protocol.write_message(plain, message)
        protocol.write_message(copying, message)
        assert frames(plain.value()) == [message]
        assert copying.value() == plain.value() == b"".join(fragments(encode(message)))
    assert copying.sequences == [[bytes]]
    protocol.write_message(copying, large)
    assert copying.sequences[1:] == [[bytes, memoryview]] * 3 + [[bytes]]     # the last: a few bytes
    with pytest.raises(TypeError):
        protocol.write_message(plain, [EVENT, "x", {"bad": object()}])
    protocol.write_message(plain, large)
    assert frames(plain.value())[-1] == large
