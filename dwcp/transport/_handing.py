"""The receiver's delivery threads: whole messages to ``on_message`` in id order, and ACKs.

One thread per session runs ``Delivery.run``: it takes what reassembly made ready, drops
what a named sender's earlier session delivered already (duplicates), calls ``on_message``,
and, for an acknowledged session, writes the cumulative ACKs ``AckPolicy`` decides on.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable

from loguru import logger

from dwcp.transport import _receiving, wire
from dwcp.transport._reassembly import Ready
from dwcp.transport._receiving import AckPolicy
from dwcp.transport._sessions import Session

__all__ = ["Delivery", "check_arity"]

# Deliveries between releases of their budget.
_DELIVERY_BATCH = 64
# A consumer slower than this a message is confirmed message by message (see Delivery.run).
_SLOW = 0.0001


class Delivery:
    """Delivers the messages of a receiver's sessions, one thread per session (``run``).

    ``finished(session)`` is called once a session's delivery is over, whatever ended it.
    """

    def __init__(
        self,
        on_message: Callable[..., object],
        finished: Callable[[Session], None],
        *,
        with_ids: bool = False,
    ) -> None:
        self.on_message = on_message
        #: Hand ``on_message`` the sender id (hex) and message id too.
        self.with_ids = with_ids
        self._finished = finished
        self._cond = threading.Condition(threading.Lock())
        #: How many messages ``on_message`` has been called with.
        self.delivered = 0
        #: How many resent messages were acknowledged and not delivered again.
        self.duplicates = 0

    def wait(self, count: int, timeout: float) -> bool:
        """Wait until ``delivered >= count``; False if ``timeout`` passes first."""
        with self._cond:
            return self._cond.wait_for(lambda: self.delivered >= count, timeout)

    def run(self, session: Session) -> None:
        """The session's delivery thread: hand whole messages to on_message, in id order.

        Readers never run user code, so a slow ``on_message`` slows every stream alike
        (through the budget) instead of starving the stream whose reader happened to
        deliver.
        """
        reassembly = session.reassembly
        on_message = self.on_message
        try:
            predecessor = session.predecessor
            if predecessor is not None:
                # Its sender resends what it did not see acknowledged; whatever of that the
                # old session still delivers must come first, so the duplicates are known.
                predecessor.over.wait()
                session.predecessor = None  # no chain of dead sessions kept alive
            if not session.acknowledged:
                while True:
                    batch = reassembly.take(None)
                    if batch is None:
                        return
                    for at in range(0, len(batch), _DELIVERY_BATCH):
                        self._deliver_some(session, batch[at : at + _DELIVERY_BATCH], on_message)
            # Acknowledged: one cumulative ACK for a batch of messages (see AckPolicy). An
            # ACK per small batch would cost both ends more than the messages when the
            # consumer keeps up.
            policy = AckPolicy()
            monotonic = time.monotonic
            # A quick consumer gets its messages in parts and one ACK per part (or per
            # ACK_EVERY, or ACK_DELAY); a slow one (over _SLOW a message) one at a time, each
            # confirmed as soon as on_message returned, so that confirmations follow the
            # consumer instead of the backlog it has yet to work through.
            step = _DELIVERY_BATCH
            while True:
                batch = reassembly.take(policy.wait(monotonic()))
                if batch is None:
                    break
                at = 0
                while at < len(batch):
                    part = batch[at : at + min(step, policy.room())]
                    began = monotonic()
                    # A part whose consumer turns slow ends early, once the delay passed.
                    handled = self._deliver_some(
                        session, part, on_message, began + _receiving.ACK_DELAY
                    )
                    at += handled
                    last, now = part[handled - 1], monotonic()
                    step = 1 if now - began > _SLOW * handled else _DELIVERY_BATCH
                    if (
                        policy.delivered(
                            handled, last[0], last[3], session.ack_now, now, began=began
                        )
                        or step == 1
                    ):
                        self._acknowledge(session, policy.through, policy.stream)
                        policy.acked()
                if policy.unacked and (not batch or policy.due(monotonic())):
                    self._acknowledge(session, policy.through, policy.stream)
                    policy.acked()
            if policy.unacked:
                # The session ended: its sender may still read (a half-closed stream).
                self._acknowledge(session, policy.through, policy.stream)
        except Exception as exc:  # noqa: BLE001 - never die silently
            logger.opt(exception=exc).error("Receiver delivery failed")
        finally:
            self._finished(session)

    def _deliver_some(
        self,
        session: Session,
        batch: list[Ready],
        on_message: Callable[..., object],
        until: float | None = None,
    ) -> int:
        """Hand ``batch`` on in order; return how many of its messages were handled (all,
        unless the clock passed ``until`` after one of them: an ACK is then due)."""
        cost = handled = 0
        sender = session.sender
        expected = None if sender is None else sender.next_id
        delivered = duplicates = 0
        sender_id = session.sender_id.hex() if self.with_ids else None
        reassembly = session.reassembly
        for mid, pieces, price, _ in batch:
            if reassembly.dropped:
                # The receiver's stop() dropped what was not yet handed on, also what
                # this thread holds: a take() can hold thousands of messages.
                cost += sum(ready[2] for ready in batch[handled:])
                handled = len(batch)
                break
            cost += price
            handled += 1
            if expected is not None:
                if mid < expected:
                    duplicates += 1  # resent by a reconnected sender, delivered before
                    continue
                if mid > expected and session.acknowledged:
                    logger.bind(session=session.name, expected=expected, got=mid).warning(
                        "Sender skipped message ids (it no longer had them to resend)"
                    )
            expected = mid + 1
            # A list of pieces, or bytes/bytearray (joining those makes the bytes we hand on).
            payload = pieces if type(pieces) is bytes else b"".join(pieces)  # type: ignore[arg-type]
            try:
                if sender_id is None:
                    on_message(payload)
                else:
                    on_message(payload, sender_id, mid)
            except Exception as exc:  # noqa: BLE001 - the application's bug must not end the session
                logger.bind(session=session.name, message_id=mid).opt(exception=exc).error(
                    "Message handler failed"
                )
            delivered += 1
            if until is not None and time.monotonic() >= until:
                break
        if sender is not None:
            sender.next_id = expected
        with self._cond:
            self.delivered += delivered
            self.duplicates += duplicates
            self._cond.notify_all()
        reassembly.done(cost)
        return handled

    def _acknowledge(self, session: Session, through: int, stream: int) -> None:
        """One cumulative ACK for every message up to ``through``, on the stream that carried
        the last one (or any other still open)."""
        if session.reassembly.closed:
            return  # aborted or replaced: its sender gave up on it and resends
        frame = wire.pack_ack(through)
        candidates = [session.connections[stream]] + session.connections
        for conn in candidates:
            if conn is None or conn.closed:
                continue  # that stream ended; its sender saw the end as well
            try:
                conn.write(frame)
                return
            except OSError as exc:
                # The sender's window waits, then it resends; keep delivering.
                logger.bind(session=session.name, error=str(exc)).warning(
                    "Receiver could not acknowledge messages"
                )


def check_arity(on_message: Callable[..., object], count: int) -> None:
    """Raise ``TypeError`` when ``on_message`` cannot take ``count`` positional arguments:
    every message would otherwise fail in the handler, logged but lost to the application."""
    try:
        signature = inspect.signature(on_message)
    except (TypeError, ValueError):
        return  # a builtin without a signature: it will tell at the first message
    try:
        signature.bind(*range(count))
    except TypeError:
        what = "(data, sender_id, message_id) with with_ids=True" if count == 3 else "(data)"
        raise TypeError(f"on_message must accept {what}; its signature is {signature}") from None
