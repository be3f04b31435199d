"""Socket helpers shared by the sender and the receiver: kernel timeouts, argument checks, TLS."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import struct
import sys
import threading
import time
from typing import cast

Buffer = bytes | bytearray | memoryview

_monotonic = time.monotonic
# A lock wait shorter than this does not shorten the socket timeout (saves a syscall).
_TIMEOUT_SLACK = 0.001
# Ciphertext read per recv(); a TLS record is at most about 16 KiB.
_TLS_READ_SIZE = 64 * 1024


def _check_address(address: object, *, lowest_port: int) -> None:
    """Raise TypeError unless ``address`` is a (host, port) tuple of a str and an int,
    ValueError for a port out of range; the message names what is wrong."""
    if not isinstance(address, tuple) or len(address) != 2:
        raise TypeError(f"address must be a (host, port) tuple, got {address!r}")
    host, port = address
    if not isinstance(host, str):
        raise TypeError(f"address host must be a str, got {type(host).__name__} {host!r}")
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"address port must be an int, got {type(port).__name__} {port!r}")
    if not lowest_port <= port < 65536:
        raise ValueError(f"address port must be in {lowest_port}..65535, got {port}")


def _bounded_int(name: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return value


def set_kernel_timeout(sock: socket.socket, option: int, seconds: float | None) -> float:
    """Set SO_SNDTIMEO or SO_RCVTIMEO of a blocking socket to ``seconds``; return the value.

    A blocking socket with a kernel timeout costs one syscall per send or receive, where
    Python's ``settimeout()`` adds a poll() before each and halves small-message throughput.
    When it expires the call fails with BlockingIOError (or returns a partial count).
    ``None`` removes the timeout (and returns 0.0).
    """
    seconds = 0.0 if seconds is None else max(seconds, _TIMEOUT_SLACK)
    if sys.platform == "win32":
        sock.setsockopt(socket.SOL_SOCKET, option, int(seconds * 1000) if seconds else 0)
    else:
        whole = int(seconds)
        timeval = struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, option, timeval)
    return seconds


def _set_send_timeout(sock: socket.socket, seconds: float) -> float:
    return set_kernel_timeout(sock, socket.SO_SNDTIMEO, seconds)


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` names this machine: 127.0.0.0/8, ::1 or "localhost" (nothing resolved)."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _remaining(deadline: float) -> float:
    left = deadline - _monotonic()
    if left <= 0:
        raise TimeoutError("TLS handshake timed out")
    return left


class TLSChannel:
    """TLS over a blocking socket, safe for one reading thread and several writing threads.

    OpenSSL forbids using one connection from two threads at once, and ``ssl.SSLSocket``
    does not serialise them (a reader blocked in ``recv`` while a writer sends corrupts the
    connection). So this drives an ``SSLObject`` through memory buffers under a short lock
    and does the socket I/O itself, outside the lock. It also keeps the kernel send timeout
    working: a blocking ``SSLSocket`` retries a timed-out write forever.

    Writers hold ``write_lock`` from ``encrypt()`` until its records are on the socket, so
    records leave in the order they were sealed.
    """

    __slots__ = ("_incoming", "_lock", "_obj", "_outgoing", "_raw", "sock", "write_lock")

    def __init__(
        self,
        sock: socket.socket,
        obj: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> None:
        self.sock = sock
        self.write_lock = threading.Lock()
        self._obj = obj
        self._incoming = incoming
        self._outgoing = outgoing
        self._lock = threading.Lock()
        self._raw = bytearray(_TLS_READ_SIZE)

    @classmethod
    def handshake(
        cls,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        timeout: float,
    ) -> TLSChannel:
        """Run the TLS handshake on ``sock`` within ``timeout`` seconds.

        Leaves ``sock`` in timeout mode (``settimeout(None)`` makes it blocking again).
        Raises ssl.SSLError when the peer or its certificate is refused (after telling the
        peer why), TimeoutError, or another OSError when the connection fails.
        """
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = context.wrap_bio(
            incoming, outgoing, server_side=server_side, server_hostname=server_hostname
        )
        channel = cls(sock, obj, incoming, outgoing)
        deadline = _monotonic() + timeout
        raw = channel._raw
        try:
            while True:
                try:
                    obj.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
                except ssl.SSLError:
                    alert = outgoing.read()
                    if alert:
                        try:
                            sock.sendall(alert)
                        except OSError:
                            pass  # the peer learns nothing more; our own error wins
                    raise
                records = outgoing.read()
                if records:
                    sock.settimeout(_remaining(deadline))
                    sock.sendall(records)
                if done:
                    break
                sock.settimeout(_remaining(deadline))
                got = sock.recv_into(raw)
                if got:
                    incoming.write(memoryview(raw)[:got])
                else:
                    incoming.write_eof()  # do_handshake() then raises SSLEOFError
        except TimeoutError as exc:
            raise TimeoutError("TLS handshake timed out") from exc
        return channel

    def encrypt(self, *parts: Buffer) -> bytes:
        """Return the TLS records that carry ``parts``; see the class doc on ``write_lock``."""
        with self._lock:
            for part in parts:
                self._obj.write(part)
            return self._outgoing.read()

    def sendall(self, data: Buffer) -> None:
        """Encrypt and send ``data`` (bounded by the socket's kernel send timeout)."""
        with self.write_lock:
            self.sock.sendall(self.encrypt(data))

    def recv_into(self, buffer: memoryview, nbytes: int = 0, flags: int = 0) -> int:
        """Decrypt into ``buffer``; return the byte count, 0 at end of stream.

        ``flags`` is accepted for signature compatibility with ``socket.recv_into`` and
        ignored. The peer closing TCP without a TLS close_notify also counts as end of
        stream: DWCP frames carry their own lengths, so a cut inside one is still detected.
        """
        size = nbytes or len(buffer)
        if not size:
            return 0
        while True:
            with self._lock:
                try:
                    # Given a buffer, read() returns a count (typeshed says bytes).
                    got = cast(int, self._obj.read(size, buffer))
                except ssl.SSLWantReadError:
                    got = -1
                except ssl.SSLZeroReturnError:
                    got = 0
                reply = self._outgoing.pending
            if reply:
                # Reading produced records (a TLS 1.3 key update answer, say): send them in
                # turn with the writers' records.
                with self.write_lock:
                    with self._lock:
                        records = self._outgoing.read()
                    self.sock.sendall(records)
            if got >= 0:
                return got
            count = self.sock.recv_into(self._raw)  # blocks outside the lock
            if not count:
                return 0
            with self._lock:
                self._incoming.write(memoryview(self._raw)[:count])
