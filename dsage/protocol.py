"""The wire protocol: length-prefixed msgpack frames, request ids, events and chunking.

Every frame is a 4-byte big-endian length followed by one msgpack array.  Four message
types exist:

- ``[0, id, verb, args]``   a request; `args` is a map of plain data;
- ``[1, id, ok, value]``    its reply; when `ok` is false `value` is ``{"type", "message"}``;
- ``[2, event, data]``      an event pushed without a reply (a job for a worker, a finished
  job for a client, a kill order);
- ``[3, more, chunk]``      a fragment: a message whose encoding is larger than the frame
  limit travels as consecutive fragments of at most `FRAME_DATA` bytes, reassembled by the
  receiver up to `MAX_MESSAGE` bytes and then decoded as one message.

The first request of a connection must be ``hello`` with ``{"version": [major, minor]}``;
a peer whose major version differs is refused with an error reply and disconnected.  The
identity of the peer is never taken from a message: it is the subject of its TLS client
certificate, and its role is what the server has on record for that subject.

msgpack decodes only plain data (no object graph); payloads are opaque bytes.
"""
from __future__ import annotations

import itertools
import socket
import struct
import threading
from typing import Any, Callable, Iterator

import msgpack
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from dsage import errors

PROTOCOL_VERSION = (2, 0)
#: TCP keepalive: probes after this many idle seconds, this many seconds apart, and the
#: link is dropped after this many unanswered (the kernel's defaults wait over two hours):
#: a client waiting for a result from a server whose machine went away without a word
#: finds out in about a minute, reconnects, and waits on.
KEEPALIVE = (30, 10, 3)
REQUEST, REPLY, EVENT, FRAGMENT = 0, 1, 2, 3
#: bytes of message per frame; larger messages are fragmented.
FRAME_DATA = 1 << 20
#: the largest frame accepted (a fragment's data plus its msgpack envelope).
FRAME_LIMIT = FRAME_DATA + 64
#: the largest reassembled message accepted.
MAX_MESSAGE = 256 << 20
#: the largest buffer a thread's msgpack Packer keeps between messages.
PACKER_KEEP = 16 << 20
_packers = threading.local()
#: the largest reassembly buffer kept for the next message (one per process: its threads'
#: reactor is one; a buffer is taken whole, so a nested use makes its own).
SPARE_KEEP = 16 << 20
_spare: bytearray | None = None

#: exception types that cross the wire by name.
WIRE_ERRORS: dict[str, type[Exception]] = {
    "AuthError": errors.AuthError,
    "RemoteError": errors.RemoteError,
    "ProtocolError": errors.ProtocolError,
}


def encode(message: list) -> bytes:
    """Pack one message as msgpack bytes (bytes stay bytes, str stays str)."""
    return msgpack.packb(message, use_bin_type=True)


def decode(data: bytes) -> list:
    """Unpack one message, refusing anything that is not a well-formed dsage message."""
    try:
        message = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as e:
        raise errors.ProtocolError(f"undecodable frame: {e.__class__.__name__}") from None
    if not isinstance(message, list) or not message or not isinstance(message[0], int):
        raise errors.ProtocolError("a frame must hold an array that starts with its type")
    kind = message[0]
    shapes = {REQUEST: (4, (int, str, dict)), REPLY: (4, (int, bool, object)),
              EVENT: (3, (str, dict)), FRAGMENT: (3, (bool, bytes))}
    if kind not in shapes:
        raise errors.ProtocolError(f"unknown message type {kind!r}")
    length, types = shapes[kind]
    if len(message) != length or not all(isinstance(v, t) for v, t in zip(message[1:], types)):
        raise errors.ProtocolError(f"malformed message of type {kind}")
    return message


def _frame_heads(size: int) -> Iterator[tuple[int, int, bytes]]:
    """(start, end, head) of each frame carrying a message of `size` bytes: one frame with
    its 4-byte length when it fits, else fragments (their msgpack envelope written by
    hand) of at most `FRAME_DATA` bytes."""
    if size <= FRAME_DATA:
        yield 0, size, struct.pack("!I", size)
        return
    for start in range(0, size, FRAME_DATA):
        end = min(start + FRAME_DATA, size)
        envelope = b"\x93\x03\xc3\xc6" if end < size else b"\x93\x03\xc2\xc6"
        yield start, end, b"".join((struct.pack("!I", 8 + end - start), envelope, struct.pack("!I", end - start)))


def fragments(packed: bytes | memoryview) -> list[bytes]:
    """An encoded message as the frames that carry it, each with its 4-byte length and
    within `FRAME_LIMIT`.  Each byte of the message is copied once."""
    with memoryview(packed) as view:
        return [b"".join((head, view[start:end])) for start, end, head in _frame_heads(len(view))]


#: bytes of a frame's start sent joined to its head (one TLS record: the head is not a
#: record of its own); the rest of a large frame goes as a view of the packed message.
_JOINED = 16 << 10


def frame_parts(view: memoryview) -> Iterator[list[bytes | memoryview]]:
    """The frames of an encoded message as [head and start, rest]: the rest is a view of
    `view` (not copied), to be written before `view` changes."""
    for start, end, head in _frame_heads(len(view)):
        split = min(end, start + _JOINED - len(head))
        parts: list[bytes | memoryview] = [b"".join((head, view[start:split]))]
        if split < end:
            parts.append(view[split:end])
        yield parts


def _packer() -> msgpack.Packer:
    """This thread's msgpack Packer (its buffer is kept: large messages do not each cost
    fresh memory)."""
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    return packer


def _packed(message: list, use: Callable[[memoryview], None]) -> None:
    """Call `use` with the encoding of `message` in this thread's Packer, which is reset
    after (and dropped if the message made it larger than `PACKER_KEEP`)."""
    packer = _packer()
    try:
        packer.pack(message)
        with packer.getbuffer() as packed:
            size = len(packed)
            use(packed)
    finally:
        packer.reset()
    if size > PACKER_KEEP:
        _packers.packer = None


def write_message(transport: Any, message: list) -> None:
    """Write one message's frames to `transport`.  A transport that copies what it is given
    before it returns (`copies_writes`: the TLS transport encrypts at once) gets each frame
    as a `writeSequence` of its head and views of the Packer's buffer: no copy of ours."""
    if getattr(transport, "copies_writes", False):
        def write(packed: memoryview) -> None:
            for parts in frame_parts(packed):
                transport.writeSequence(parts)
    else:
        def write(packed: memoryview) -> None:
            for frame in fragments(packed):
                transport.write(frame)
    _packed(message, write)


def _fragment(buffer: bytes | bytearray, start: int, end: int) -> tuple[bool, int] | None:
    """Whether the frame at buffer[start:end] (perhaps not all there yet) is a fragment
    encoded the plain way, its envelope all there: then its (more, offset of its data);
    else None (then `decode` judges the frame once it is whole)."""
    if len(buffer) < start + 5 or buffer[start] != 0x93 or buffer[start + 1] != FRAGMENT:
        return None
    flag, kind = buffer[start + 2], buffer[start + 3]
    sizes = {0xC4: (1, "!B"), 0xC5: (2, "!H"), 0xC6: (4, "!I")}     # msgpack bin 8, 16, 32
    if flag not in (0xC2, 0xC3) or kind not in sizes:
        return None
    width, fmt = sizes[kind]
    data = start + 4 + width
    if data > end or len(buffer) < data or end - data != struct.unpack_from(fmt, buffer, start + 4)[0]:
        return None
    return flag == 0xC3, data


def error_value(failure: Failure) -> dict[str, str]:
    """The error reply for a failed request: the exception's wire name and message."""
    exc = failure.value
    name = type(exc).__name__
    if name not in WIRE_ERRORS:
        name = "RemoteError"
    return {"type": name, "message": str(exc) or type(exc).__name__}


def error_from_value(value: Any) -> Exception:
    """Rebuild the exception of an error reply."""
    if not isinstance(value, dict):
        return errors.RemoteError(str(value))
    cls = WIRE_ERRORS.get(str(value.get("type")), errors.RemoteError)
    return cls(str(value.get("message", "")))


class MessageProtocol(Protocol):
    """Frames, requests with ids mapped to Deferreds, events, fragments.

    Subclasses answer requests in `handle_request(verb, args)` and events in
    `handle_event(event, data)`; `call()` sends a request and `send_event()` an event.
    """

    MAX_LENGTH = FRAME_LIMIT
    #: dataReceived copies what it keeps: the TLS transport may hand it a view of a buffer
    #: that it reuses once dataReceived returns.
    takes_views = True
    log = Logger()

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._pending: dict[int, defer.Deferred] = {}
        self._assembly = bytearray()     # the message being reassembled from fragments...
        self._assembled = 0              # ...is its first _assembled bytes
        self._buffer = bytearray()
        self._fragment_left = 0
        self._fragment_more = False
        self.closed = False
        self.when_closed: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.tune_transport()

    def tune_transport(self) -> None:
        """Small frames go out at once (no Nagle delay); dead peers are noticed by TCP too,
        within about a minute of silence (`KEEPALIVE`)."""
        for option in ("setTcpNoDelay", "setTcpKeepAlive"):
            try:
                getattr(self.transport, option)(True)
            except (AttributeError, OSError, NotImplementedError):
                pass
        try:
            sock = self.transport.getHandle()
            for name, value in zip(("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"), KEEPALIVE):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        except (AttributeError, OSError):
            pass            # not a TCP socket, or a system without these options

    # -- sending ---------------------------------------------------------------------
    def send_message(self, message: list) -> None:
        """Send one message, fragmented when it is larger than a frame."""
        if self.closed or self.transport is None:
            return
        write_message(self.transport, message)

    def call(self, verb: str, **args: Any) -> defer.Deferred:
        """Send a request; the Deferred fires with the reply or fails with its error."""
        if self.closed:
            return defer.fail(errors.ConnectionLost("not connected to the dsage server"))
        msg_id = next(self._ids)
        d = defer.Deferred(lambda _: self._pending.pop(msg_id, None))
        self._pending[msg_id] = d
        try:
            self.send_message([REQUEST, msg_id, verb, args])
        except Exception:               # arguments msgpack cannot carry: nothing was sent
            self._pending.pop(msg_id, None)
            return defer.fail()
        return d

    def send_event(self, event: str, data: dict) -> None:
        """Push an event to the peer."""
        self.send_message([EVENT, event, data])

    # -- receiving -------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        """Split the stream into frames.  Frames collect in one growing buffer (large ones
        cost linear time), except a fragment's data: once its envelope has come, the rest
        goes straight into the message being reassembled (one copy)."""
        view = memoryview(data)
        if self._fragment_left:
            n = min(self._fragment_left, len(view))
            with view[:n] as chunk:
                self._fragment_data(chunk)
            view = view[n:]
        buffer = self._buffer
        buffer += view
        view.release()
        offset = 0
        while len(buffer) - offset >= 4 and not self._stopped():
            (length,) = struct.unpack_from("!I", buffer, offset)
            if length > self.MAX_LENGTH:
                del buffer[:]
                self.lengthLimitExceeded(length)
                return
            start, end = offset + 4, offset + 4 + length
            if len(buffer) < end:
                fragment = _fragment(buffer, start, end)
                if fragment is not None:        # the rest of its data will not wait here
                    self._fragment_more, self._fragment_left = fragment[0], end - fragment[1]
                    self._reserve(end - fragment[1], fragment[0])
                    with memoryview(buffer) as whole, whole[fragment[1]:] as chunk:
                        self._fragment_data(chunk)
                    offset = len(buffer)
                break
            offset = end
            self.heard()
            try:
                message = self._frame(buffer, start, end)
            except errors.ProtocolError as e:
                self.protocol_error(str(e))
                message = None
            if message is not None:
                self.message_received(message)
        del buffer[:offset]

    def _stopped(self) -> bool:
        """Whether frames that came after this point are no longer read."""
        return self.closed or self.transport is None or bool(getattr(self.transport, "disconnecting", False))

    def _fragment_data(self, chunk: memoryview) -> None:
        """Data of the fragment under way, as it comes."""
        self.heard()
        self._fragment_left -= len(chunk)
        try:
            message = self._reassemble(self._fragment_more or self._fragment_left > 0, chunk)
        except errors.ProtocolError as e:
            self._fragment_left = 0
            self.protocol_error(str(e))
            return
        if message is not None:
            self.message_received(message)

    def _frame(self, buffer: bytearray, start: int, end: int) -> list | None:
        """The message the frame at buffer[start:end] completes, if any."""
        fragment = _fragment(buffer, start, end)
        with memoryview(buffer) as view:
            if fragment is not None:
                with view[fragment[1]:end] as chunk:
                    return self._reassemble(fragment[0], chunk)
            message = decode(view[start:end])
        if message[0] == FRAGMENT:
            return self._reassemble(message[1], message[2])
        return message

    def _reserve(self, size: int, more: bool) -> None:
        """Room in the message being reassembled for a fragment of `size` bytes, made once
        (not at each TCP read): the spare buffer of an earlier message when it is large
        enough, else a quarter more than the first fragment when more follow (a message
        just over a frame then fits), doubled when it grows."""
        global _spare
        need = self._assembled + size
        if need <= len(self._assembly):
            return
        if not self._assembled and _spare is not None and len(_spare) >= need:
            self._assembly, _spare = _spare, None
            return
        room = need + need // 4 if more and not self._assembled else max(need, 2 * len(self._assembly))
        grown = bytearray(min(room, MAX_MESSAGE))
        with memoryview(grown) as into, memoryview(self._assembly) as old:
            into[:self._assembled] = old[:self._assembled]      # a view: one copy, not two
        self._assembly = grown

    def _reassemble(self, more: bool, chunk: bytes | memoryview) -> list | None:
        global _spare
        end = self._assembled + len(chunk)
        if end > MAX_MESSAGE:
            raise errors.ProtocolError(f"message larger than {MAX_MESSAGE} bytes")
        self._reserve(len(chunk), more)
        with memoryview(self._assembly) as into:
            into[self._assembled:end] = chunk
        self._assembled = end
        if more:
            return None
        whole, self._assembly, self._assembled = self._assembly, bytearray(), 0
        try:
            with memoryview(whole) as view:
                message = decode(view[:end])
        finally:
            if len(whole) <= SPARE_KEEP and (_spare is None or len(_spare) < len(whole)):
                _spare = whole
        if message[0] == FRAGMENT:
            raise errors.ProtocolError("a fragment inside a fragment")
        return message

    def message_received(self, message: list) -> None:
        """Dispatch one whole message."""
        kind = message[0]
        if kind == REQUEST:
            _, msg_id, verb, args = message
            d = defer.maybeDeferred(self.handle_request, verb, args)
            d.addCallbacks(lambda value: self.send_message([REPLY, msg_id, True, value]),
                           lambda f: self._reply_error(msg_id, verb, f))
        elif kind == REPLY:
            _, msg_id, ok, value = message
            d = self._pending.pop(msg_id, None)
            if d is None:
                return
            if ok:
                d.callback(value)
            else:
                d.errback(error_from_value(value))
        elif kind == EVENT:
            _, event, data = message
            self.handle_event(event, data)

    def _reply_error(self, msg_id: int, verb: str, failure: Failure) -> None:
        if self.closed and failure.check(defer.CancelledError):
            return  # a long poll whose connection went away: nobody to answer
        if not failure.check(errors.DsageError, ValueError, TypeError, KeyError, LookupError):
            self.log.failure("request {verb} failed", failure, verb=verb)
        self.send_message([REPLY, msg_id, False, error_value(failure)])
        if failure.check(errors.ProtocolError) or (verb == "hello" and failure.check(errors.AuthError)):
            if getattr(self, "drop_on_refusal", False):
                self.transport.loseConnection()

    def heard(self) -> None:
        """A frame arrived (override to note the peer's liveness)."""

    def handle_request(self, verb: str, args: dict) -> Any:
        """Answer a request (override)."""
        raise errors.ProtocolError(f"unknown request {verb!r}")

    def handle_event(self, event: str, data: dict) -> None:
        """React to an event (override)."""

    def protocol_error(self, reason: str) -> None:
        """The peer broke the protocol: log it and drop the connection."""
        self.log.warn("dropping {peer}: {reason}", peer=self.peer_name(), reason=reason)
        self.transport.loseConnection()

    def lengthLimitExceeded(self, length: int) -> None:
        self.protocol_error(f"frame of {length} bytes exceeds the limit of {self.MAX_LENGTH}")

    def peer_name(self) -> str:
        """A printable name for the peer."""
        try:
            peer = self.transport.getPeer()
            return f"{peer.host}:{peer.port}"
        except Exception:
            return "?"

    def connectionLost(self, reason: Failure = None) -> None:
        self.closed = True
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(errors.ConnectionLost("connection to the dsage server lost"))
        Protocol.connectionLost(self, reason)
        self.when_closed.callback(None)

