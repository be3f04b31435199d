"""What ``Manager.deliver()`` gives the application: its handle, its error, and the
manager's ``deliver()`` and ``flush()``.

A ``Delivery`` settles exactly once, confirmed or failed with a ``DeliveryError``; its state
is written by the outbox (``_outbox``, the queue and the ``dwcp-delivery`` thread) under the
outbox's lock, and its waits and callbacks go through the outbox.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from loguru import logger

from dwcp._errors import DWCPError

if TYPE_CHECKING:
    from dwcp._outbox import Outbox

__all__ = ["Delivery", "DeliveryCalls", "DeliveryError", "run_callback"]


class DeliveryError(DWCPError):
    """A message given to ``Manager.deliver()`` was not confirmed, or was not accepted.

    ``code``: ``DELIVERY_TIMEOUT`` (its deadline passed first), ``STOPPED`` (the manager
    stopped first), ``REFUSED`` (the transport refused it, e.g. over its
    ``max_message_size``; ``__cause__`` says why), ``BUFFER_FULL`` (raised by ``deliver()``:
    no room in the byte budget within ``delivery_max_block``), ``FLUSH_TIMEOUT`` (raised by
    ``flush()``).

    ``sent``: whether the message had been handed to the transport. A sent message is in
    the transport's window, which keeps resending it after reconnects: it may still arrive.
    One that was not sent never will.
    """

    def __init__(self, message: str, *, code: str, sent: bool = False) -> None:
        super().__init__(message, code=code)
        self.sent = sent


class Delivery:
    """The outcome of one ``Manager.deliver()``, future-like (returned by it, not built).

    It settles exactly once: confirmed by the receiver (``exception()`` is None), or failed
    with a ``DeliveryError``. Handles settle on the ``dwcp-delivery`` thread, which also runs
    the done callbacks.
    """

    __slots__ = ("_callbacks", "_error", "_outbox", "data", "deadline", "done_", "sent", "size")

    def __init__(
        self,
        outbox: Outbox,
        data: bytes,
        size: int,
        deadline: float,
        callback: Callable[[Delivery], object] | None,
    ) -> None:
        self._outbox = outbox
        self.data: bytes | None = data  # dropped once sent: the transport's window has it
        self.size = size  # len(data)
        self.deadline = deadline
        self.sent = False
        self.done_ = False
        self._error: DeliveryError | None = None
        self._callbacks: list[Callable[[Delivery], object]] | None = (
            None if callback is None else [callback]
        )

    def __repr__(self) -> str:
        if not self.done_:
            state = "sent" if self.sent else "queued"
        else:
            state = "confirmed" if self._error is None else f"failed {self._error.code}"
        return f"<Delivery {self.size} bytes {state}>"

    def done(self) -> bool:
        """Whether the message is confirmed or failed."""
        return self.done_

    def exception(self, timeout: float | None = None) -> DeliveryError | None:
        """Wait (``timeout`` seconds; None: until it settles) and return the failure, or None
        once the receiver confirmed it. Raises ``TimeoutError`` if it has not settled in time.
        """
        self._outbox.wait_settled(self, timeout)
        return self._error

    def result(self, timeout: float | None = None) -> None:
        """Wait as ``exception()`` does; return once confirmed, raise the ``DeliveryError``
        if it failed."""
        error = self.exception(timeout)
        if error is not None:
            raise error

    def add_done_callback(self, fn: Callable[[Delivery], object]) -> None:
        """Call ``fn(handle)`` once it settles, on the delivery thread; at once, here, if it
        already has. An exception from ``fn`` is logged and ignored."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if not self._outbox.add_callback(self, fn):
            run_callback(fn, self)


def run_callback(fn: Callable[[Delivery], object], handle: Delivery) -> None:
    try:
        fn(handle)
    except BaseException as exc:  # noqa: BLE001 - the application's bug must not stop delivery
        # SystemExit too (sys.exit() in a callback): it would end the dwcp-delivery thread,
        # and with it every handle's settling, with no one to see it.
        logger.opt(exception=exc).error("Delivery callback failed")


class DeliveryCalls:
    """The manager's delivery methods (a mixin of ``Manager``, which sets ``_outbox``)."""

    _outbox: Outbox

    def deliver(
        self,
        data: bytes | bytearray | memoryview,
        *,
        timeout: float | None = None,
        callback: Callable[[Delivery], object] | None = None,
    ) -> Delivery:
        """Accept ``data`` for delivery and return its handle; the library retries it until
        the receiver confirms it or ``timeout`` passes.

        Messages go out in the order ``deliver()`` accepted them, through the circuit
        breaker: sent by the calling thread when nothing is queued, nothing awaits
        confirmation and nothing stands in the way, else by the ``dwcp-delivery`` thread in
        runs of up to 256 (one breaker call a run; one at a time after a failure). A failed send is retried
        (the same message first) after a pause of 0.05 s doubling to 1 s; while the breaker
        is open nothing is sent, and once it reads half-open the next send is its trial. A
        sent message is in the transport's window, which resends it after reconnects; the
        handle settles when the receiver confirms it. ``stop()`` fails what is unconfirmed
        once the transport is closed (``DeliveryError``, code ``STOPPED``).

        Args:
            data: the message (bytes-like; copied unless ``bytes``).
            timeout: seconds from now until the message fails with ``DeliveryError``
                (``DELIVERY_TIMEOUT``); default: the manager's ``delivery_timeout``.
            callback: called with the handle once it settles, on the delivery thread.

        Blocks while the accepted, unsettled messages' bytes would exceed
        ``delivery_buffer_bytes``, for at most ``delivery_max_block`` seconds, then raises
        ``DeliveryError`` (``BUFFER_FULL``); sending the message itself, it may also wait
        as a send does while the transport's window is full. Raises ``ValueError`` for a
        message larger than the whole budget, ``TypeError`` for data that is not
        bytes-like, and ``DWCPError`` with code ``NOT_STARTED``, ``NO_TRANSPORT``, or
        ``NOT_ACKNOWLEDGED`` (the transport is not a ``MultiStreamTCPTransport`` with
        ``acknowledged=True``: nothing would confirm the message).
        """
        return self._outbox.deliver(data, timeout, callback)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every message ``deliver()`` accepted before this call has settled
        (confirmed or failed: see each handle); each has a deadline, so this ends without
        ``timeout`` too. Raises ``DeliveryError`` (code ``FLUSH_TIMEOUT``) when ``timeout``
        seconds pass first."""
        self._outbox.flush(timeout)
