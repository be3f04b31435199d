"""The receiver's listening socket and accept loop (I/O only: every decision about a
connection is the receiver's, made in the ``admit`` it is given)."""

from __future__ import annotations

import errno
import selectors
import socket
import time
from collections.abc import Callable

from loguru import logger

from dwcp._errors import TransportError

__all__ = ["HOUSEKEEPING", "accept_loop", "listen"]

# Out of descriptors (or memory) the listener is left alone this long, doubling up to the
# cap, so the accept loop neither spins nor floods the log.
_ACCEPT_BACKOFF = 0.05
_ACCEPT_BACKOFF_MAX = 1.0
_ACCEPT_LOG_EVERY = 10.0
# How often the accept thread looks for sessions whose streams failed to join in time.
HOUSEKEEPING = 0.5
_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# accept(2) (Linux): errors of the new connection or of the network, already pending, that
# the listener is fine after; accept is retried at once. Any other error is backed off
# from like running out of descriptors: the accept thread never ends while running.
_ACCEPT_TRANSIENT_ERRORS = {
    getattr(errno, name)
    for name in (
        "ENETDOWN", "EPROTO", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH",
        "EOPNOTSUPP", "ENETUNREACH", "ECONNABORTED", "EINTR", "EAGAIN", "EWOULDBLOCK",
    )
    if hasattr(errno, name)
}  # fmt: skip


def listen(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket on (host, port); the one place socket errors of
    start() become the library's TransportError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise TransportError(
            f"receiver cannot listen on {host}:{port}: {exc}", code="LISTEN_FAILED"
        ) from exc
    try:
        # Lets a restarted receiver bind its port again while old connections linger
        # in TIME_WAIT (the "peer restarts" case).
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
        listener.setblocking(False)
    except (OSError, UnicodeError) as exc:  # gaierror is an OSError; IDNA a UnicodeError
        listener.close()
        raise TransportError(
            f"receiver cannot listen on {host}:{port}: {exc}", code="LISTEN_FAILED"
        ) from exc
    return listener


def accept_loop(
    listener: socket.socket,
    wake: socket.socket,
    admit: Callable[[socket.socket, str], None],
    housekeeping: Callable[[], None],
) -> None:
    """The receiver's accept thread: ``admit`` each new connection, run ``housekeeping``
    every ``HOUSEKEEPING`` seconds, until ``wake`` is readable; then close ``listener``.

    No ``accept()`` error ends it (see ``_ACCEPT_TRANSIENT_ERRORS``).
    """
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake, selectors.EVENT_READ)
    backoff = 0.0
    paused_until = 0.0
    suppressed = 0
    logged_at = -_ACCEPT_LOG_EVERY
    try:
        while True:
            now = time.monotonic()
            if paused_until and now >= paused_until:
                selector.register(listener, selectors.EVENT_READ)
                paused_until = 0.0
            timeout = HOUSEKEEPING if not paused_until else min(HOUSEKEEPING, paused_until - now)
            events = selector.select(timeout)
            housekeeping()
            for key, _ in events:
                if key.fileobj is wake:
                    return
                try:
                    sock, addr = listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    if exc.errno in _ACCEPT_TRANSIENT_ERRORS:
                        # That connection's (or the network's) trouble, not the
                        # listener's: the next accept may well succeed.
                        logger.bind(error=str(exc)).debug("Receiver accept failed; retrying")
                        continue
                    # Out of descriptors (or an error accept(2) does not list): the
                    # pending connection may stay queued, so the listener stays readable;
                    # stop watching it for a while instead of spinning on it, and log at
                    # a bounded rate.
                    backoff = min(max(backoff * 2, _ACCEPT_BACKOFF), _ACCEPT_BACKOFF_MAX)
                    selector.unregister(listener)
                    paused_until = time.monotonic() + backoff
                    suppressed += 1
                    if time.monotonic() - logged_at >= _ACCEPT_LOG_EVERY:
                        logger.bind(error=str(exc), backoff=backoff, times=suppressed).warning(
                            "Receiver accept failed; backing off"
                        )
                        logged_at, suppressed = time.monotonic(), 0
                    break
                backoff = 0.0
                admit(sock, f"{addr[0]}:{addr[1]}")
    except Exception as exc:  # noqa: BLE001 - the accept thread must not die silently
        logger.opt(exception=exc).error("Receiver accept loop failed")
    finally:
        selector.close()
        listener.close()
