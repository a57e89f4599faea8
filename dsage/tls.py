"""The cluster's certificate authority, certificates, bundles and TLS options.

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
                .not_valid_before(_now() - datetime.timedelta(minutes=5))
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
        start = not_before or (_now() - datetime.timedelta(minutes=5))
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


def _note_refusal(conn, cert, errno: int, depth: int, ok: int) -> bool:
    """OpenSSL verify callback: remember why a peer certificate was refused, for the log."""
    if not ok:
        try:
            subject = cert.to_cryptography().subject.rfc4514_string()
        except Exception:
            subject = "?"
        try:
            proto = conn.get_app_data().wrappedProtocol
            proto.tls_refusal = f"{VERIFY_ERRORS.get(errno, f'verify error {errno}')} ({subject})"
        except AttributeError:
            pass
    return bool(ok)


def server_options(ca_pem: bytes, cert_pem_: bytes, key_pem_: bytes):
    """TLS options of the server: its certificate, client certificates required from the CA,
    and the reason of every refused certificate noted on its connection (`tls_refusal`)."""
    from OpenSSL import SSL
    from twisted.internet import ssl

    class Options(ssl.CertificateOptions):
        def _makeContext(self, *args, **kw):
            # Once, when the context is made: a context in use cannot be changed.
            ctx = super()._makeContext(*args, **kw)
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _note_refusal)
            return ctx

    ca = ssl.Certificate.loadPEM(ca_pem)
    own = ssl.PrivateCertificate.loadPEM(cert_pem_ + key_pem_)
    return Options(privateKey=own.privateKey.original, certificate=own.original,
                   trustRoot=ca, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)


def client_options(bundle: Bundle):
    """TLS options of a client or worker: verify the server against the CA, present own cert."""
    from twisted.internet import ssl

    return ssl.optionsForClientTLS(SERVER_NAME, trustRoot=ssl.Certificate.loadPEM(bundle.ca_pem),
                                   clientCertificate=ssl.PrivateCertificate.loadPEM(bundle.cert_pem + bundle.key_pem))


def peer_identity(transport) -> tuple[str, int]:
    """The (common name, serial number) of the verified peer certificate."""
    cert = transport.getPeerCertificate()
    if cert is None:
        raise ValueError("no client certificate")
    crt = cert.to_cryptography()
    names = crt.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ValueError("client certificate without a common name")
    return str(names[0].value), crt.serial_number


def client_endpoint(bundle: Bundle, reactor, host: str, port: int, timeout: float = 10):
    """An endpoint that dials `host:port` and speaks TLS as `bundle`'s identity; connect()
    fires with the application's protocol (as `wrapClientTLS`, but see `_write_through`)."""
    from twisted.internet.endpoints import HostnameEndpoint

    return _ClientTLSEndpoint(client_options(bundle), HostnameEndpoint(reactor, host, port, timeout=timeout))


def listen(reactor, port: int, options, factory, interface: str = ""):
    """Listen on `port` with TLS (see `_write_through`); a Deferred of the listening port."""
    from twisted.internet.endpoints import TCP4ServerEndpoint

    return TCP4ServerEndpoint(reactor, port, interface=interface).listen(_write_through()(options, False, factory))


@functools.cache
def _write_through():
    """A `TLSMemoryBIOFactory` whose connections encrypt and send each write at once.

    Twisted's default TLS transport holds every write until the next turn of the reactor
    (`callLater(0)`) to join small ones; a dsage message is one write already, so that only
    delayed every message by a reactor turn (0.1-0.2 ms of a 2 ms round trip here).  And
    the TCP transport under it holds its writes until the reactor's next poll: the
    encrypted bytes go to the socket at once when nothing is waiting there before them
    (a lease must leave before the server goes on to commit it)."""
    from OpenSSL.SSL import WantReadError
    from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

    class SendNowTLS(TLSMemoryBIOProtocol):
        def _flushSendBIO(self) -> None:
            try:
                data = self._tlsConnection.bio_read(2 ** 15)
            except WantReadError:
                return
            tcp = self.transport
            if (hasattr(tcp, "writeSomeData") and tcp.connected and not tcp._writeDisconnected
                    and not tcp._tempDataLen and tcp.offset == len(tcp.dataBuffer)):
                sent = tcp.writeSomeData(data)
                if isinstance(sent, Exception):     # the connection is lost: the reactor says so
                    sent = 0
                data = data[sent:]
            if data:
                tcp.write(data)

    class WriteThroughTLS(TLSMemoryBIOFactory):
        protocol = SendNowTLS

    return WriteThroughTLS


class _ClientTLSEndpoint:
    """A client endpoint wrapped in TLS (`WriteThroughTLS`)."""

    def __init__(self, options, wrapped) -> None:
        self.options = options
        self.wrapped = wrapped

    def connect(self, factory):
        """Connect; fires with `factory`'s protocol once the TCP connection is made."""
        tls_factory = _write_through()(self.options, True, factory)
        return self.wrapped.connect(tls_factory).addCallback(lambda proto: proto.wrappedProtocol)
