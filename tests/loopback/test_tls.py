"""TLS on the multi-stream transport: delivery, server and mutual authentication, refusals.

A throw-away CA and certificates are made once per test session with ``cryptography``.
Every connection stays on 127.0.0.1; the non-loopback addresses below are only constructed.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from loguru import logger

import dwcp
from dwcp import TransportError
from dwcp.transport import MultiStreamReceiver, MultiStreamTCPTransport, wire
from dwcp.transport._io import is_loopback_host
from tests.conftest import Inbox, ReceiverFactory, TransportFactory, closed_by_peer, wait_until
from tests.faultproxy import FaultProxy, fault_proxy_fixture  # noqa: F401 - "fault_proxy"

CHUNK = 1024
TIMEOUT = 10.0
PLAINTEXT_WARNING = "Plaintext transport to a non-loopback address; pass ssl_context to encrypt"
UNVERIFIED_WARNING = "TLS without server verification"


# -- certificates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    """Paths of PEM files: a CA, a server and a client certificate it signed, another CA."""

    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(subject: str, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _make_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, _name(common_name), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    common_name: str,
    names: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A CA with a server certificate (IP 127.0.0.1, DNS localhost) and a client one."""
    folder = tmp_path_factory.mktemp("pki")
    ca = _make_ca("dwcp test CA")
    other = _make_ca("some other CA")
    server = _make_leaf(
        ca,
        "dwcp receiver",
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client = _make_leaf(
        ca, "dwcp sender", [x509.DNSName("dwcp-sender.test")], ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return PKI(
        ca=_write_cert(folder / "ca.pem", ca[0]),
        other_ca=_write_cert(folder / "other-ca.pem", other[0]),
        server_cert=_write_cert(folder / "server.pem", server[0]),
        server_key=_write_key(folder / "server.key", server[1]),
        client_cert=_write_cert(folder / "client.pem", client[0]),
        client_key=_write_key(folder / "client.key", client[1]),
    )


def server_context(pki: PKI, *, mutual: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if mutual:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki.ca)
    return context


def client_context(
    pki: PKI, *, trust: Path | None = None, certificate: bool = False
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=trust or pki.ca)
    if certificate:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def dwcp_logs() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """(message, bound fields) of every dwcp log record while the test runs."""
    records: list[tuple[str, dict[str, Any]]] = []
    sink = logger.add(
        lambda m: records.append((m.record["message"], dict(m.record["extra"]))), level="DEBUG"
    )
    logger.enable("dwcp")
    yield records
    logger.disable("dwcp")
    logger.remove(sink)


class Bystander:
    """A healthy session that keeps sending acknowledged messages while a test attacks."""

    def __init__(self, transport: MultiStreamTCPTransport, inbox: Inbox) -> None:
        self.transport = transport
        self.inbox = inbox
        self.sent = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-bystander")
        self._thread.start()

    def _run(self) -> None:
        try:
            # Paced, so the pump does not starve the handshakes under test of CPU.
            while not self._stop.wait(0.002):
                self.transport.send(b"bystander %d" % self.sent, wait=True)
                self.sent += 1
        except BaseException as exc:  # noqa: BLE001 - reported by assert_alive()
            self.error = exc

    def assert_alive(self) -> None:
        """Fail unless several more messages get through from now on, all in order."""
        target = self.sent + 5
        wait_until(lambda: self.sent >= target or self.error is not None, TIMEOUT)
        assert self.error is None, self.error
        self.transport.health_check()
        sent = self.sent  # acknowledged: each of these was delivered before it was counted
        mine = [m for m in self.inbox.messages if m.startswith(b"bystander ")]
        assert mine[:sent] == [b"bystander %d" % n for n in range(sent)]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def bystander_factory(
    transport_factory: TransportFactory,
) -> Iterator[Callable[..., Bystander]]:
    running: list[Bystander] = []

    def make(receiver: MultiStreamReceiver, inbox: Inbox, **kwargs: Any) -> Bystander:
        transport = transport_factory(receiver.address, acknowledged=True, **kwargs)
        transport.start()
        bystander = Bystander(transport, inbox)
        running.append(bystander)
        return bystander

    yield make
    for bystander in running:
        bystander.stop()


def tls_refusals(logs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [
        str(extra["reason"])
        for message, extra in logs
        if message == "Receiver closed connection" and str(extra["reason"]).startswith("TLS")
    ]


# -- delivery ---------------------------------------------------------------------------------

SHAPES = [0, 10, CHUNK, CHUNK + 1, 37 * CHUNK + 3, 1 << 20]


@pytest.mark.parametrize("acknowledged", [False, True], ids=["fire-and-forget", "acknowledged"])
def test_messages_arrive_intact_over_tls(
    pki: PKI,
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    acknowledged: bool,
) -> None:
    receiver, inbox = receiver_factory(ssl_context=server_context(pki))
    transport = transport_factory(
        receiver.address, streams=3, acknowledged=acknowledged, ssl_context=client_context(pki)
    )
    transport.start()
    messages = [os.urandom(size) for size in SHAPES] * 2
    for message in messages:
        transport.send(message)
    assert receiver.wait_delivered(len(messages), TIMEOUT)
    assert inbox.messages == messages
    transport.health_check()
    # Recovery's close() then start() opens a fresh TLS session.
    transport.close()
    transport.start()
    transport.send(b"again" * 1000)
    assert receiver.wait_delivered(len(messages) + 1, TIMEOUT)
    assert inbox.messages[-1] == b"again" * 1000


def test_concurrent_senders_over_tls(
    pki: PKI, receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    receiver, inbox = receiver_factory(ssl_context=server_context(pki))
    transport = transport_factory(
        receiver.address, acknowledged=True, ssl_context=client_context(pki)
    )
    transport.start()

    def sender(number: int) -> None:
        for seq in range(60):
            transport.send(b"%d:%d:" % (number, seq) + b"x" * (5 * CHUNK if seq % 7 else 10))

    workers = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    transport.flush()  # everything acknowledged, so delivered
    assert len(inbox.messages) == 240
    for number in range(4):
        seqs = [int(m.split(b":")[1]) for m in inbox.messages if m.startswith(b"%d:" % number)]
        assert seqs == list(range(60))
    transport.health_check()


def test_server_certificate_verified_by_dns_name(
    pki: PKI, receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    receiver, inbox = receiver_factory(ssl_context=server_context(pki))
    transport = transport_factory(
        receiver.address, server_hostname="localhost", ssl_context=client_context(pki)
    )
    transport.start()
    transport.send(b"by name")
    assert receiver.wait_delivered(1, TIMEOUT)
    assert inbox.messages == [b"by name"]


def test_mutual_tls_accepts_a_client_with_a_valid_certificate(
    pki: PKI, receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    receiver, inbox = receiver_factory(ssl_context=server_context(pki, mutual=True))
    transport = transport_factory(
        receiver.address, acknowledged=True, ssl_context=client_context(pki, certificate=True)
    )
    transport.start()
    transport.send(b"mutual" * 3000, wait=True)
    assert inbox.messages == [b"mutual" * 3000]


def test_unverified_client_context_is_allowed_with_a_warning(
    pki: PKI,
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    dwcp_logs: list[tuple[str, dict[str, Any]]],
) -> None:
    receiver, inbox = receiver_factory(ssl_context=server_context(pki))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    transport = transport_factory(receiver.address, ssl_context=context)
    transport.start()
    transport.send(b"unverified")
    assert receiver.wait_delivered(1, TIMEOUT)
    assert inbox.messages == [b"unverified"]
    assert [m for m, _ in dwcp_logs].count(UNVERIFIED_WARNING) == 1
    transport_factory(receiver.address, ssl_context=client_context(pki))
    assert [m for m, _ in dwcp_logs].count(UNVERIFIED_WARNING) == 1


# -- refusals ---------------------------------------------------------------------------------

REFUSALS: dict[str, tuple[bool, Callable[[PKI], dict[str, Any]]]] = {
    # name: (receiver requires client certificates, client's keyword arguments)
    "no-client-certificate": (True, lambda pki: {"ssl_context": client_context(pki)}),
    "wrong-ca": (False, lambda pki: {"ssl_context": client_context(pki, trust=pki.other_ca)}),
    "wrong-hostname": (
        False,
        lambda pki: {"ssl_context": client_context(pki), "server_hostname": "elsewhere.test"},
    ),
    "plaintext-client": (False, lambda pki: {}),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_clients_leave_other_sessions_alone(
    pki: PKI,
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    bystander_factory: Callable[..., Bystander],
    dwcp_logs: list[tuple[str, dict[str, Any]]],
    case: str,
) -> None:
    mutual, client_kwargs = REFUSALS[case]
    receiver, inbox = receiver_factory(ssl_context=server_context(pki, mutual=mutual))
    bystander = bystander_factory(
        receiver, inbox, ssl_context=client_context(pki, certificate=True)
    )
    intruder = transport_factory(receiver.address, streams=2, **client_kwargs(pki))
    with pytest.raises(TransportError) as refused:
        intruder.start()
    assert not intruder.started
    if case in ("wrong-ca", "wrong-hostname"):
        assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
    elif case == "no-client-certificate":
        assert isinstance(refused.value.__cause__, ssl.SSLError)
    # The receiver closed the intruder's connection and said why, and nothing else.
    wait_until(lambda: tls_refusals(dwcp_logs), TIMEOUT)
    bystander.assert_alive()
    assert receiver.session_count == 1
    assert all(m.startswith(b"bystander ") for m in inbox.messages)


def test_tls_client_to_a_plaintext_receiver_is_refused(
    pki: PKI,
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    bystander_factory: Callable[..., Bystander],
) -> None:
    receiver, inbox = receiver_factory()
    bystander = bystander_factory(receiver, inbox)
    intruder = transport_factory(receiver.address, ssl_context=client_context(pki))
    with pytest.raises(TransportError):
        intruder.start()
    assert not intruder.started
    bystander.assert_alive()
    assert receiver.session_count == 1


@pytest.mark.parametrize(
    "sent", [b"", b"\x16\x03\x01\x02\x00\x01"], ids=["nothing", "partial-client-hello"]
)
def test_client_that_never_finishes_the_tls_handshake(
    pki: PKI,
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    bystander_factory: Callable[..., Bystander],
    raw_connections: Callable[[tuple[str, int]], socket.socket],
    dwcp_logs: list[tuple[str, dict[str, Any]]],
    sent: bytes,
) -> None:
    # idle_timeout is long: the handshake timeout alone must close the silent clients.
    handshake_timeout = 1.5
    receiver, inbox = receiver_factory(
        ssl_context=server_context(pki),
        tls_handshake_timeout=handshake_timeout,
        idle_timeout=60.0,
    )
    bystander = bystander_factory(receiver, inbox, ssl_context=client_context(pki))
    began = time.monotonic()
    silent = [raw_connections(receiver.address) for _ in range(3)]
    for sock in silent:
        sock.sendall(sent)
    # A new session gets in long before the silent clients time out: neither the accept
    # loop nor another connection waits for them.
    newcomer = transport_factory(
        receiver.address, connect_timeout=handshake_timeout / 2, ssl_context=client_context(pki)
    )
    newcomer.start()
    newcomer.send(b"newcomer")
    wait_until(lambda: b"newcomer" in inbox.messages, TIMEOUT)
    bystander.assert_alive()
    for sock in silent:
        assert closed_by_peer(sock)
    assert handshake_timeout - 0.1 < time.monotonic() - began < handshake_timeout + 10.0
    wait_until(lambda: len(tls_refusals(dwcp_logs)) == 3, TIMEOUT)
    assert set(tls_refusals(dwcp_logs)) == {"TLS handshake timed out"}
    bystander.assert_alive()


def test_silence_after_the_tls_handshake_is_bounded_by_idle_timeout(
    pki: PKI, receiver_factory: ReceiverFactory
) -> None:
    receiver, _ = receiver_factory(ssl_context=server_context(pki), idle_timeout=0.3)
    raw = socket.create_connection(receiver.address, timeout=TIMEOUT)
    with raw, client_context(pki).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        began = time.monotonic()
        try:
            data = tls.recv(100)  # no HELLO from us: the receiver must give up
        except (ConnectionResetError, ssl.SSLEOFError):
            data = b""
        assert data == b""
        assert 0.2 < time.monotonic() - began < 10.0  # idle_timeout, not the default


def test_stop_does_not_wait_for_a_pending_tls_handshake(
    pki: PKI,
    receiver_factory: ReceiverFactory,
    raw_connections: Callable[[tuple[str, int]], socket.socket],
) -> None:
    receiver, _ = receiver_factory(ssl_context=server_context(pki), tls_handshake_timeout=60.0)
    sock = raw_connections(receiver.address)
    wait_until(lambda: any(t.name.startswith("dwcp-receiver-conn") for t in threading.enumerate()))
    began = time.monotonic()
    receiver.stop()
    assert time.monotonic() - began < 10.0  # not the 60 s handshake timeout
    assert closed_by_peer(sock)


class StallingTLSPeer:
    """Completes the TLS and DWCP handshakes of one stream, then never reads again."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        # Small buffers make a non-reading peer push back after little data.
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.listener.settimeout(TIMEOUT)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.release = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-stalling-peer")
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            conn.settimeout(TIMEOUT)
            with self.context.wrap_socket(conn, server_side=True) as tls:
                hello = b""
                while len(hello) < wire.HANDSHAKE.size:
                    hello += tls.recv(wire.HANDSHAKE.size - len(hello))
                tls.sendall(wire.pack_welcome(wire.STATUS_ACCEPTED))
                self.release.wait(TIMEOUT)

    def close(self) -> None:
        self.release.set()
        self._thread.join()
        self.listener.close()


def test_stalled_tls_peer_fails_the_send_within_send_timeout(
    pki: PKI, transport_factory: TransportFactory
) -> None:
    # A blocking ssl.SSLSocket would retry a timed-out write forever; this must not.
    peer = StallingTLSPeer(server_context(pki))
    try:
        transport = transport_factory(
            peer.address,
            streams=1,
            chunk_size=256 * 1024,
            send_timeout=0.5,
            ssl_context=client_context(pki),
            keepalive_interval=None,  # without one, nothing written for send_timeout is a stall
        )
        transport.start()
        began = time.monotonic()
        with pytest.raises(TransportError, match="stalled"):
            transport.send(b"\0" * (16 << 20))
        assert time.monotonic() - began < 10.0
        with pytest.raises(TransportError, match="broken"):
            transport.health_check()
        transport.close()
    finally:
        peer.close()


# -- plaintext warning and argument checks ----------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.200.3.4", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("db.localhost", True),
        ("192.0.2.1", False),
        ("0.0.0.0", False),
        ("2001:db8::1", False),
        ("example.invalid", False),
        ("localhost.example", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_plaintext_to_a_non_loopback_address_warns_once_per_transport(
    pki: PKI, dwcp_logs: list[tuple[str, dict[str, Any]]]
) -> None:
    def warnings() -> int:
        return [message for message, _ in dwcp_logs].count(PLAINTEXT_WARNING)

    # Documentation addresses, never connected: only calls that do no I/O follow.
    transport = MultiStreamTCPTransport(("192.0.2.1", 9))
    assert warnings() == 1
    repr(transport)
    with pytest.raises(TransportError, match="not started"):
        transport.health_check()
    with pytest.raises(TransportError, match="not started"):
        transport.send(b"x")
    transport.close()
    assert warnings() == 1
    MultiStreamTCPTransport(("example.invalid", 9))
    assert warnings() == 2
    for host in ("127.0.0.1", "::1", "localhost"):
        MultiStreamTCPTransport((host, 9))
    MultiStreamTCPTransport(("192.0.2.1", 9), ssl_context=client_context(pki))
    assert warnings() == 2


def test_tls_arguments_are_validated(pki: PKI) -> None:
    address = ("127.0.0.1", 9)
    with pytest.raises(TypeError, match="ssl_context"):
        MultiStreamTCPTransport(address, ssl_context="tls")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="server_hostname"):
        MultiStreamTCPTransport(
            address,
            ssl_context=client_context(pki),
            server_hostname=b"localhost",  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="server_hostname"):
        MultiStreamTCPTransport(address, server_hostname="localhost")
    with pytest.raises(ValueError, match="server_hostname"):
        MultiStreamTCPTransport(address, ssl_context=client_context(pki), server_hostname=".x")
    with pytest.raises(ValueError, match="ssl_context"):
        MultiStreamTCPTransport(address, ssl_context=server_context(pki))
    with pytest.raises(TypeError, match="ssl_context"):
        MultiStreamReceiver(on_message=print, ssl_context=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ssl_context"):
        MultiStreamReceiver(on_message=print, ssl_context=client_context(pki))
    with pytest.raises(ValueError, match="tls_handshake_timeout"):
        MultiStreamReceiver(on_message=print, tls_handshake_timeout=0)


def test_a_refused_tls_handshake_under_a_manager_is_a_failed_recovery_attempt_retried(
    pki: PKI,
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    make_manager: Callable[..., dwcp.Manager],
) -> None:
    """docs/tls.md, "What happens when TLS fails": "**Sender.** `start()` raises
    `dwcp.TransportError`, and the `ssl.SSLError` is its `__cause__`. [...] Under a
    `Manager`, this is just a failed recovery attempt, retried with backoff." """
    receiver, inbox = receiver_factory(ssl_context=server_context(pki))
    transport = transport_factory(
        receiver.address, ssl_context=client_context(pki, trust=pki.other_ca)
    )
    events: list[dwcp.Event] = []
    manager = make_manager(transport, initial_backoff=0.05, max_retries=3)
    manager.add_listener(events.append)
    manager.start()  # does not raise: the transport starts degraded
    assert manager.is_started

    def of(kind: type[dwcp.Event]) -> list[Any]:
        return [e for e in list(events) if isinstance(e, kind)]

    wait_until(lambda: of(dwcp.RecoveryFailed), TIMEOUT)
    unhealthy = of(dwcp.ComponentUnhealthy)[0]
    assert unhealthy.component == "transport"
    assert "CERTIFICATE_VERIFY_FAILED" in unhealthy.error, unhealthy.error
    backoffs = [e.backoff for e in of(dwcp.RecoveryAttempt) if e.component == "transport"]
    assert backoffs[:3] == [0.05, 0.1, 0.2]  # retried with the usual backoff
    assert of(dwcp.RecoveryFailed)[0].attempts == 3
    with pytest.raises(TransportError) as raised:
        manager.send_with_circuit_breaker(b"never")
    assert raised.value.code == "NOT_STARTED"
    assert inbox.messages == []


def test_without_checksums_tls_still_detects_corruption_and_delivers_nothing_corrupted(
    pki: PKI,
    receiver_factory: ReceiverFactory,
    transport_factory: TransportFactory,
    fault_proxy: Callable[..., FaultProxy],
) -> None:
    """docs/tls.md, "Performance and limits": "TLS records are authenticated, so
    `checksum=False` saves the CRC without losing corruption detection." A proxy process
    flips one bit of the encrypted stream: the session breaks, and every message delivered
    is one that was sent, byte for byte."""
    receiver, inbox = receiver_factory(ssl_context=server_context(pki))
    proxy = fault_proxy(receiver.address)
    transport = transport_factory(
        proxy.address,
        streams=1,
        checksum=False,
        acknowledged=True,
        send_timeout=2.0,
        ssl_context=client_context(pki),
    )
    transport.start()
    sent = [(b"%06d" % number) * 170 for number in range(400)]
    transport.send(sent[0], wait=True)
    proxy.corrupt(after=3000)  # inside a later record's ciphertext
    broke: TransportError | None = None
    deadline = time.monotonic() + 30.0
    for message in sent[1:]:
        try:
            transport.send(message, wait=True)
        except TransportError as error:
            broke = error
            break
        assert time.monotonic() < deadline
    assert proxy.stats()["fired"], "the proxy never flipped the bit"
    assert broke is not None, "a corrupted TLS stream was accepted"
    assert inbox.messages == sent[: len(inbox.messages)]  # nothing corrupted, in order
    transport.close()
    transport.start()  # a recovery's fresh TLS session carries on
    transport.send(b"after", wait=True)
    assert inbox.messages[-1] == b"after"
    assert all(m in sent for m in inbox.messages[:-1])


def test_an_ip_address_dialled_must_be_an_ip_entry_in_the_certificate(
    tmp_path: Path, receiver_factory: ReceiverFactory, transport_factory: TransportFactory
) -> None:
    """docs/tls.md, "Server authentication": "The sender checks the receiver's certificate
    against the host in `address` by default (`receiver.example.net` above, or an IP address
    such as `10.0.0.7`, which then has to be an IP entry in the certificate). If you dial one
    name but the certificate carries another, pass `server_hostname=...`." """
    ca = _make_ca("dns-only CA")
    # DNS entries only: "127.0.0.1" spelled as a DNS name is not an IP entry.
    leaf = _make_leaf(
        ca,
        "dns-only receiver",
        [x509.DNSName("localhost"), x509.DNSName("127.0.0.1")],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(
        _write_cert(tmp_path / "leaf.pem", leaf[0]), _write_key(tmp_path / "leaf.key", leaf[1])
    )
    trust = _write_cert(tmp_path / "ca.pem", ca[0])
    receiver, inbox = receiver_factory(ssl_context=server)
    assert receiver.address[0] == "127.0.0.1"
    by_ip = transport_factory(
        receiver.address, ssl_context=ssl.create_default_context(cafile=trust)
    )
    with pytest.raises(TransportError) as refused:
        by_ip.start()
    assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
    by_name = transport_factory(
        receiver.address,
        server_hostname="localhost",
        ssl_context=ssl.create_default_context(cafile=trust),
    )
    by_name.start()
    by_name.send(b"by its name")
    assert receiver.wait_delivered(1, TIMEOUT)
    assert inbox.messages == [b"by its name"]
