"""The sender's connect shell: open a session's connections and run its handshake.

``connect`` opens every stream (TCP, then TLS if asked), sends each its HELLO and reads each
WELCOME; the frames themselves are ``wire``'s. ``check_tls_options`` validates the TLS
arguments of ``MultiStreamTCPTransport``.
"""

from __future__ import annotations

import socket
import ssl
import time

from loguru import logger

from dwcp._errors import TransportError
from dwcp.transport import wire
from dwcp.transport._io import _TIMEOUT_SLACK, TLSChannel, _close_quietly, is_loopback_host

__all__ = ["check_tls_options", "connect", "recv_exactly"]

_monotonic = time.monotonic


def connect(
    address: tuple[str, int],
    streams: int,
    *,
    session_id: bytes,
    first_id: int,
    sender_id: bytes,
    acknowledged: bool,
    keepalive_interval: float | None,
    connect_timeout: float,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    congestion_control: str | None,
) -> list[tuple[socket.socket, TLSChannel | None]]:
    """Open ``streams`` connections to ``address`` as session ``session_id``, all within
    ``connect_timeout``; TransportError (after closing what it opened) when a connection,
    the TLS handshake or the DWCP handshake fails, or the receiver refuses the session."""
    connections: list[tuple[socket.socket, TLSChannel | None]] = []
    socks: list[socket.socket] = []
    deadline = _monotonic() + connect_timeout
    peer = f"{address[0]}:{address[1]}"
    try:
        for index in range(streams):
            sock = socket.create_connection(
                address, timeout=max(deadline - _monotonic(), _TIMEOUT_SLACK)
            )
            socks.append(sock)
            # Small frames must leave at once: Nagle plus delayed ACKs would add tens of
            # milliseconds per acknowledged send.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if congestion_control is not None:
                # Set on the connected socket: Linux switches the algorithm of an open
                # connection, and no data has been sent on it yet.
                sock.setsockopt(
                    socket.IPPROTO_TCP,
                    socket.TCP_CONGESTION,
                    congestion_control.encode("ascii"),
                )
            hello = wire.pack_handshake(
                session_id,
                index,
                streams,
                acknowledged=acknowledged,
                # Whole milliseconds, at least 1 (the constructor's bounds).
                keepalive_ms=round((keepalive_interval or 0) * 1000),
                sender_id=sender_id,
                first_id=first_id,
            )
            if ssl_context is None:
                connections.append((sock, None))
                sock.sendall(hello)
            else:
                channel = TLSChannel.handshake(
                    sock,
                    ssl_context,
                    server_side=False,
                    server_hostname=server_hostname,
                    timeout=max(deadline - _monotonic(), _TIMEOUT_SLACK),
                )
                connections.append((sock, channel))
                channel.sendall(hello)
        # Handshakes go out first and answers are read after, so connecting N streams
        # costs about one round trip, not N (plus the TLS handshakes, one at a time).
        for sock, tls in connections:
            sock.settimeout(max(deadline - _monotonic(), _TIMEOUT_SLACK))
            try:
                welcome = recv_exactly(tls or sock, wire.WELCOME.size)
            except TimeoutError as exc:  # connected, but what answers is not a receiver
                raise TransportError(
                    f"no WELCOME from {peer} within connect_timeout "
                    f"({connect_timeout:g} s): is a dwcp receiver listening there?"
                ) from exc
            status = wire.parse_welcome(welcome)
            if status != wire.STATUS_ACCEPTED:
                why = {wire.STATUS_BUSY: "busy", wire.STATUS_REFUSED: "refused"}.get(
                    status, "unknown status"
                )
                raise TransportError(f"receiver refused the session (status {status}: {why})")
            sock.settimeout(None)  # blocking; the session sets the kernel send timeout
    except ssl.SSLError as exc:
        # Also a client certificate the receiver refused: TLS 1.3 tells the client only
        # after its side of the handshake, so the refusal arrives instead of WELCOME.
        for sock in socks:
            _close_quietly(sock)
        raise TransportError(f"TLS with {peer} failed: {exc}") from exc
    except OSError as exc:
        for sock in socks:
            _close_quietly(sock)
        raise TransportError(f"cannot connect to {peer}: {exc}") from exc
    except (wire.ProtocolError, TransportError) as exc:
        for sock in socks:
            _close_quietly(sock)
        if isinstance(exc, TransportError):
            raise
        raise TransportError(f"handshake failed: {exc}") from exc
    return connections


def recv_exactly(source: socket.socket | TLSChannel, size: int) -> bytes:
    """Read exactly ``size`` bytes (a handshake answer); EOF first is a ConnectionError."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        part = source.recv_into(view[got:])
        if not part:
            raise ConnectionError("connection closed during handshake")
        got += part
    return bytes(buf)


def check_tls_options(
    address: tuple[str, int], context: ssl.SSLContext | None, server_hostname: str | None
) -> str | None:
    """Validate the TLS arguments, warn about unsafe choices; return the name to verify."""
    peer = f"{address[0]}:{address[1]}"
    if server_hostname is not None and not isinstance(server_hostname, str):
        raise TypeError("server_hostname must be a str or None")
    if context is None:
        if server_hostname is not None:
            raise ValueError("server_hostname needs ssl_context")
        if not is_loopback_host(address[0]):
            logger.bind(peer=peer).warning(
                "Plaintext transport to a non-loopback address; pass ssl_context to encrypt"
            )
        return None
    if not isinstance(context, ssl.SSLContext):
        raise TypeError("ssl_context must be an ssl.SSLContext or None")
    if context.protocol == ssl.PROTOCOL_TLS_SERVER:
        raise ValueError("ssl_context is a server context; build it for PROTOCOL_TLS_CLIENT")
    name = address[0] if server_hostname is None else server_hostname
    if not name or name.startswith("."):
        raise ValueError(f"server_hostname must be a host name, got {name!r}")
    if context.verify_mode == ssl.CERT_NONE:
        logger.bind(peer=peer).warning("TLS without server verification")
    return name
