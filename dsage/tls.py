"""The cluster's certificate authority, certificates and bundles, and the TLS transport
every connection uses (the standard library's `ssl` over Twisted's TCP, see `TLSProtocol`).

Every identity (the server, each user, each worker) has an EC P-256 key and a certificate
signed by the cluster's CA.  The subject's common name is the identity; only the server's
certificate carries DNS names (``dsage-server`` plus the host names it was made for), so a
client or worker certificate can never pass for the server.  Clients verify the server as
``dsage-server`` whatever address they dial.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import ipaddress
import os
import re
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAME = "dsage-server"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
ROLES = ("admin", "client", "worker")
_PEM_RE = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----\s*", re.S)


def check_name(name: str) -> str:
    """Return `name` if it is a valid identity name, else raise ValueError."""
    if not NAME_RE.match(name or "") or name == SERVER_NAME:
        raise ValueError(f"invalid name {name!r}: use letters, digits and _.@- (at most 64)")
    return name


#: certificates are valid from this long before they are made: a machine whose clock is
#: behind (by hours: a hardware clock kept in local time, a clock not yet synced after a
#: boot) still accepts them.
BACKDATE = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key as unencrypted PKCS8 PEM."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    """The certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclasses.dataclass
class Authority:
    """The cluster's CA: its certificate and key, and what it signs."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, days: int = 3650) -> Authority:
        """Make a new self-signed CA."""
        key = new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dsage cluster CA"),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dsage")])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(_now() - BACKDATE)
                .not_valid_after(_now() + datetime.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True, crl_sign=True,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .sign(key, hashes.SHA256()))
        return cls(cert, key)

    @classmethod
    def load(cls, home: Path) -> Authority:
        """Read the CA from `home` (ca.pem and ca.key)."""
        cert = x509.load_pem_x509_certificate((home / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((home / "ca.key").read_bytes(), None)
        return cls(cert, key)

    def save(self, home: Path) -> None:
        """Write ca.pem and ca.key (0600) into `home`."""
        write_private(home / "ca.key", key_pem(self.key))
        (home / "ca.pem").write_bytes(cert_pem(self.cert))

    def issue(self, name: str, *, server_hosts: list[str] | None = None, days: int = 825,
              not_before: datetime.datetime | None = None,
              key: ec.EllipticCurvePrivateKey | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """Sign a new certificate for `name`; a server one when `server_hosts` is given."""
        key = key or new_key()
        start = not_before or (_now() - BACKDATE)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        if server_hosts is not None:
            alt: list[x509.GeneralName] = []
            for host in dict.fromkeys([SERVER_NAME, "localhost", *server_hosts]):
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    alt.append(x509.DNSName(host))
            alt.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
            builder = (builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        else:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                                            critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only (0600), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


@dataclasses.dataclass
class Bundle:
    """Everything one identity needs to connect: CA, own certificate and key, server address."""

    name: str
    role: str
    server: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def dumps(self) -> bytes:
        """The bundle file's content."""
        head = (f"# dsage bundle: keep this file secret (it holds a private key)\n"
                f"# name = {self.name}\n# role = {self.role}\n# server = {self.server}\n")
        return head.encode() + self.ca_pem + self.cert_pem + self.key_pem

    def save(self, path: Path) -> None:
        """Write the bundle file, mode 0600."""
        write_private(Path(path), self.dumps())

    @classmethod
    def load(cls, path: Path | str) -> Bundle:
        """Read a bundle file; ValueError with a clear message when it is not one."""
        path = Path(path).expanduser()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ValueError(f"no dsage bundle at {path}") from None
        fields = dict(re.findall(rb"^# (\w+) = (.*)$", data, re.M))
        blocks = [m.group(0) for m in _PEM_RE.finditer(data)]
        if len(blocks) != 3 or b"PRIVATE KEY" not in blocks[2] or not {b"name", b"role", b"server"} <= set(fields):
            raise ValueError(f"{path} is not a dsage bundle (expected a CA, a certificate and a key)")
        return cls(fields[b"name"].decode(), fields[b"role"].decode(), fields[b"server"].decode(),
                   blocks[0], blocks[1], blocks[2])

    def certificate(self) -> x509.Certificate:
        """The identity's own certificate."""
        return x509.load_pem_x509_certificate(self.cert_pem)


def make_bundle(ca: Authority, name: str, role: str, server: str, **issue_kw) -> tuple[Bundle, int]:
    """Issue a certificate for `name` and wrap it as a bundle; returns (bundle, serial)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    cert, key = ca.issue(check_name(name), **issue_kw)
    return Bundle(name, role, server, cert_pem(ca.cert), cert_pem(cert), key_pem(key)), cert.serial_number


#: OpenSSL's certificate verification errors that users meet, by number.
VERIFY_ERRORS = {9: "certificate not yet valid", 10: "certificate expired", 18: "self-signed certificate",
                 19: "self-signed certificate in chain", 20: "certificate not signed by the cluster's CA",
                 21: "certificate not signed by the cluster's CA", 23: "certificate revoked",
                 24: "invalid CA certificate", 26: "certificate not for this purpose"}


def server_options(ca_pem: bytes, cert_pem_: bytes, key_pem_: bytes) -> ssl.SSLContext:
    """TLS context of the server: its certificate, client certificates required from the CA
    (and for client use: OpenSSL checks the purpose by side)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ca_pem.decode())
    _load_identity(ctx, cert_pem_, key_pem_)
    ctx.num_tickets = 0             # connections are long-lived: no session to resume
    return ctx


def client_options(bundle: Bundle) -> ssl.SSLContext:
    """TLS context of a client or worker: verify the server as SERVER_NAME against the
    cluster's CA, present its own certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)     # CERT_REQUIRED, hostname checked
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=bundle.ca_pem.decode())
    _load_identity(ctx, bundle.cert_pem, bundle.key_pem)
    return ctx


def _load_identity(ctx: ssl.SSLContext, cert_pem_: bytes, key_pem_: bytes) -> None:
    """Give `ctx` a certificate and key held in memory (`load_cert_chain` reads files only:
    an anonymous in-memory file where the system has them, else a private temporary one)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("dsage-identity")
        try:
            os.write(fd, cert_pem_ + key_pem_)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory() as folder:       # 0700
        path = Path(folder) / "identity.pem"
        write_private(path, cert_pem_ + key_pem_)
        ctx.load_cert_chain(path)


def peer_identity(transport) -> tuple[str, int]:
    """The (common name, serial number) of the verified peer certificate."""
    der = transport.getPeerCertificate()
    if der is None:
        raise ValueError("no client certificate")
    crt = x509.load_der_x509_certificate(der)
    names = crt.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ValueError("client certificate without a common name")
    return str(names[0].value), crt.serial_number


def describe_error(error: BaseException) -> str:
    """A TLS failure in words: the certificate problem, or OpenSSL's reason."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return VERIFY_ERRORS.get(error.verify_code, error.verify_message or "certificate refused")
    if isinstance(error, ssl.SSLError) and error.reason:
        return "TLS: " + error.reason.lower().replace("_", " ")
    return str(error)


def client_endpoint(bundle: Bundle, reactor, host: str, port: int, timeout: float = 10):
    """An endpoint that dials `host:port` and speaks TLS as `bundle`'s identity; connect()
    fires with the application's protocol once the TCP connection is made."""
    from twisted.internet.endpoints import HostnameEndpoint

    return _ClientTLSEndpoint(client_options(bundle), HostnameEndpoint(reactor, host, port, timeout=timeout))


#: connections the kernel queues until the server accepts them (Twisted's default is 50):
#: workers reconnecting after a restart come at once, and each TLS handshake takes the
#: reactor a millisecond or two (1,000 at once overflowed a queue of 50 some 700 times).
LISTEN_BACKLOG = 1024


def listen(reactor, port: int, options: ssl.SSLContext, factory, interface: str = ""):
    """Listen on `port` with TLS (see `TLSProtocol`); a Deferred of the listening port."""
    from twisted.internet.endpoints import TCP4ServerEndpoint

    endpoint = TCP4ServerEndpoint(reactor, port, backlog=LISTEN_BACKLOG, interface=interface)
    return endpoint.listen(_factory()(options, True, factory))


def send_now(tcp, data: bytes) -> None:
    """Write `data` to the TCP transport `tcp`, to its socket at once when nothing waits
    there before it (Twisted's transports hold every write until the reactor's next poll;
    a lease must leave before the server goes on to commit it).  What the socket does not
    take then waits as the transport's send buffer itself, from where it stopped (written,
    the rest would be copied once by the slice and again by the transport's join)."""
    if (hasattr(tcp, "writeSomeData") and tcp.connected and not tcp._writeDisconnected
            and not tcp._tempDataLen and tcp.offset == len(tcp.dataBuffer)):
        sent = tcp.writeSomeData(data)
        if isinstance(sent, Exception):     # the connection is lost: the reactor says so
            sent = 0
        if sent < len(data):
            tcp.dataBuffer, tcp.offset = data, sent
            tcp.startWriting()
    elif data:
        tcp.write(data)


#: the largest plaintext of a TLS record.
RECORD = 1 << 14
#: plaintext decrypted into one buffer, shared by the connections of the reactor's thread,
#: before it is handed on (a TCP read of 64 KiB is one delivery, with no copy of ours).
READ_BUFFER = 16 * RECORD
_spare: bytearray | None = None


@functools.cache
def _factory():
    """The TLS wrapping factory and its protocol (Twisted imported on first use)."""
    from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
    from twisted.python.failure import Failure

    class TLSProtocol(ProtocolWrapper):
        """TLS over a TCP transport with the standard library's `ssl` (memory BIOs).

        Twisted's own TLS transport, on pyOpenSSL, runs a dozen Python calls per 16 KiB
        record each way and holds every write until the next turn of the reactor; here a
        whole message is encrypted as it is written and sent at once, and a TCP read is
        decrypted record by record in C into one shared buffer and delivered as one chunk
        (see bench/README.md)."""

        copies_writes = True    # what is written is encrypted (or copied) before write returns
        _ready = False          # the handshake is done
        _lost = False           # the TLS connection is over (an error, or the peer closed it)
        _reason = None          # the TLS failure to report to the application

        def makeConnection(self, transport) -> None:
            self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
            side = self.factory.server_side
            self._tls = self.factory.context.wrap_bio(self._in, self._out, server_side=side,
                                                      server_hostname=None if side else SERVER_NAME)
            self._pending: list[bytes] = []
            super().makeConnection(transport)   # the application's connectionMade: it may write
            self._handshake()

        def getPeerCertificate(self) -> bytes | None:
            """The peer's certificate (DER), verified against the cluster's CA."""
            return self._tls.getpeercert(binary_form=True) if self._ready else None

        def _handshake(self) -> bool:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return False
            except (ssl.SSLError, ValueError):
                self._fail(Failure())
                return False
            self._ready = True
            pending, self._pending = self._pending, []
            for data in pending:
                self._tls.write(data)
            self._flush()
            return True

        def dataReceived(self, data: bytes) -> None:
            if self._lost:
                return
            self._in.write(data)
            if not self._ready and (not self._handshake() or self._lost):
                return
            global _spare
            buffer, _spare = _spare or bytearray(READ_BUFFER), None     # a nested call has its own
            try:
                ended = self._decrypt(buffer)
            finally:
                _spare = buffer
            if ended is not None:
                self._fail(ended or None)
            elif self._out.pending:             # a key update, a ticket
                self._flush()

        def _decrypt(self, buffer: bytearray) -> Failure | bool | None:
            """Decrypt the whole records received into `buffer` and hand them on; a Failure
            if the TLS connection failed, False if the peer closed it, else None."""
            ended, filled = None, 0
            with memoryview(buffer) as whole:
                while True:
                    if filled > len(buffer) - RECORD:
                        self._deliver(whole[:filled])
                        filled = 0
                        if self._lost or self.disconnecting:   # the application closed it
                            break
                    try:
                        n = self._tls.read(RECORD, whole[filled:filled + RECORD])
                    except ssl.SSLWantReadError:
                        break
                    except ssl.SSLError:
                        ended = Failure()
                        break
                    if not n:                       # the peer's close_notify
                        ended = False
                        break
                    filled += n
                if filled:
                    self._deliver(whole[:filled])
            return ended

        def _deliver(self, view: memoryview) -> None:
            """Hand decrypted data to the application: a view of the shared buffer to a
            protocol that copies what it keeps (`takes_views`), else bytes."""
            with view:
                if getattr(self.wrappedProtocol, "takes_views", False):
                    self.wrappedProtocol.dataReceived(view)
                else:
                    self.wrappedProtocol.dataReceived(bytes(view))

        def write(self, data: bytes) -> None:
            self.writeSequence((data,))

        def writeSequence(self, data) -> None:
            """Encrypt each part now (a view may change once this returns) and send."""
            if self._lost or self.disconnecting:
                return
            if not self._ready:
                self._pending.extend(bytes(part) for part in data)
                return
            try:
                for part in data:
                    if part:
                        self._tls.write(part)
            except ssl.SSLError:
                self._fail(Failure())
                return
            self._flush()

        def _flush(self) -> None:
            if self._out.pending:
                send_now(self.transport, self._out.read())

        def loseConnection(self) -> None:
            """Send what was written, a close_notify, and close (a connection still in its
            handshake, perhaps a peer that never speaks, is dropped with what it wrote)."""
            if self.disconnecting or not self.connected:
                return
            self.disconnecting = True
            if self._ready or self._lost:
                self._close()
            else:
                self.abortConnection()

        def _close(self) -> None:
            if not self._lost:
                self._lost = True
                try:
                    self._tls.unwrap()
                except (ssl.SSLError, ValueError):
                    pass                        # ours is out; the peer's is not awaited
                self._flush()
            self.transport.loseConnection()

        def abortConnection(self) -> None:
            self.disconnecting = True
            self._lost = True
            self.transport.abortConnection()

        def _fail(self, reason) -> None:
            """The TLS connection is over (`reason`: a Failure, or None when the peer closed
            it cleanly): send any alert, and close."""
            if self._reason is None and reason is not None:
                self._reason = reason
            self._lost = True
            self._flush()
            self.transport.loseConnection()

        def connectionLost(self, reason) -> None:
            self.connected = False
            reason, self._reason = self._reason or reason, None
            super().connectionLost(reason)

    class TLSFactory(WrappingFactory):
        protocol = TLSProtocol
        noisy = False           # as Twisted's own: no "Starting factory" line per connection

        def __init__(self, context: ssl.SSLContext, server_side: bool, wrapped) -> None:
            super().__init__(wrapped)
            self.context, self.server_side = context, server_side

    return TLSFactory


class _ClientTLSEndpoint:
    """A client endpoint wrapped in TLS (`TLSProtocol`)."""

    def __init__(self, context: ssl.SSLContext, wrapped) -> None:
        self.context = context
        self.wrapped = wrapped

    def connect(self, factory):
        """Connect; fires with `factory`'s protocol once the TCP connection is made."""
        return self.wrapped.connect(_factory()(self.context, False, factory)).addCallback(
            lambda proto: proto.wrappedProtocol)
