"""A draining peer in its own process: ``python -m benchmarks.sink [--rate-limit BYTES_PER_S]``.

Listens on three loopback ports and prints them as ``RAW_PORT DWCP_PORT STATS_PORT`` on one
line; a connection to the stats port gets the total bytes read so far (8 bytes, big-endian),
so a benchmark can time delivery rather than how much the socket buffers absorbed.  The raw
port drains plain TCP; the DWCP port answers each stream's HELLO with a WELCOME and then
drains.  Both read the same way, so a sender measured against either meets the same reader.
With ``--rate-limit`` every connection is read at most that many bytes per second (an
emulation of a WAN's per-flow limits, for the multi-stream scenario).
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time

from dwcp.transport import wire

_BURST = 0.01  # seconds of reading a rate-limited connection may catch up at once
_WELCOME = wire.pack_welcome(wire.STATUS_ACCEPTED)


_received = 0
_received_lock = threading.Lock()


def _count(n: int) -> None:
    global _received
    with _received_lock:
        _received += n


def _stats(server: socket.socket) -> None:
    while True:
        conn, _ = server.accept()
        with conn, _received_lock:
            conn.sendall(_received.to_bytes(8, "big"))


def _drain(conn: socket.socket, handshake: bool, rate: float | None) -> None:
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with conn:
        if handshake:
            hello = b""
            while len(hello) < wire.HANDSHAKE.size:
                part = conn.recv(wire.HANDSHAKE.size - len(hello))
                if not part:
                    return
                hello += part
            conn.sendall(_WELCOME)
        began = time.monotonic()
        received = 0
        chunk = len(buffer) if rate is None else max(4096, int(rate / 100))
        while True:
            try:
                n = conn.recv_into(view[:chunk])
            except OSError:
                return
            if not n:
                return
            _count(n)
            if rate is not None:
                received += n
                now = time.monotonic()
                ahead = received / rate - (now - began)
                if ahead > 0:
                    time.sleep(ahead)  # pacing a reader in a benchmark peer, not library code
                elif ahead < -_BURST:
                    # An idle connection may not bank credit beyond a short burst.
                    began, received = now - _BURST, 0


def _serve(server: socket.socket, handshake: bool, rate: float | None) -> None:
    while True:
        conn, _ = server.accept()  # default socket options, as a user's reader has
        if rate is not None:
            # A small receive window, as a rate-limited WAN path gives: the sender's bytes
            # wait in its own buffers instead of vanishing into ours.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        threading.Thread(target=_drain, args=(conn, handshake, rate), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate-limit", type=float, default=None)
    args = parser.parse_args()
    servers = []
    for handshake in (False, True):
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        servers.append(server)
        threading.Thread(
            target=_serve, args=(server, handshake, args.rate_limit), daemon=True
        ).start()
    stats = socket.socket()
    stats.bind(("127.0.0.1", 0))
    stats.listen(64)
    threading.Thread(target=_stats, args=(stats,), daemon=True).start()
    ports = [s.getsockname()[1] for s in (*servers, stats)]
    print(*ports, flush=True)
    # Serve until the parent closes our stdin (or dies).
    sys.stdin.read()


if __name__ == "__main__":
    main()
