"""Posts selected manager events as JSON alerts to a webhook URL, from a thread of its own.

A ``WebhookNotifier`` is a listener: ``manager.add_listener(notifier)``.  Calling it only puts
the alert on a bounded queue (when full, the oldest alert is dropped and counted), so the
manager's event thread is never held up by a slow or dead receiver.  A thread named
``dwcp-webhook`` POSTs each alert; 5xx, 408 and 429 answers, timeouts and connection errors
are retried with exponential backoff (or after the answer's ``Retry-After``, at most 30 s),
other 4xx answers are not.

Alerts are deduplicated per (manager, component, event): one that repeats within
``repeat_interval`` of the last one delivered, or of one still waiting to be delivered, is
suppressed (counted in ``suppressed``), so an outage's half-open -> open re-trips post one
``breaker_opened``, not one per re-trip.  The memory is written when the receiver accepts an
alert, not when it is queued: an alert that fails (the receiver is down) leaves none, so the
next repeat is queued and the outage reaches the receiver once it answers.  The
opposite event clears that memory: ``breaker_closed`` for ``breaker_opened``, a
``recovery_succeeded`` for the component's ``component_unhealthy``, ``recovery_started`` and
``recovery_failed`` and ``component_suspected`` (and each of the first three for
``recovery_succeeded``), so the next outage is
reported at once.

Payload (``Content-Type: application/json``, one alert per request)::

    {
      "event": "recovery_failed",
      "manager": "payments-peer",
      "peer": "10.0.0.7:7400",
      "component": "transport",
      "timestamp": "2024-05-01T12:00:00.123Z",
      "details": {"attempts": 3, "error": "ConnectionRefusedError: ..."},
      "source": "dwcp"
    }

``manager`` is the publishing manager's name (its ``breaker_name``), ``peer`` the address its
transport talks to; each is null when the event does not say.  ``timestamp`` is ISO-8601 UTC, when the event
happened.  ``component`` is the component's slot name; breaker events name ``transport``,
whose sends the breaker guards.
``details`` by ``event``:

- ``recovery_failed``: ``attempts`` (int), ``error`` (str or null)
- ``recovery_succeeded``: ``attempts`` (int), ``downtime_seconds`` (float)
- ``recovery_started``: ``error`` (str or null), the failure that started the cycle
- ``component_unhealthy``: ``error`` (str)
- ``component_suspected``: ``suspicion`` (phi, float), ``threshold`` (float); cleared by the
  component's ``recovery_succeeded``
- ``breaker_opened``: ``from_state`` (str), ``to_state`` (``"open"``)
- ``breaker_closed``: ``from_state`` (str), ``to_state`` (``"closed"``)
- ``node_lost`` (cluster; ``component`` null): ``node``, ``silent_for``, ``bound``, ``reason``
- ``node_back`` (cluster; ``component`` null): ``node``, ``down_for``; deduplicated per node,
  each clearing the other

The request also carries the headers ``X-DWCP-Event: <event>`` and ``X-DWCP-Delivery: <id>``
(the same on every retry of one alert).  With a ``secret``, every request is signed:
``X-DWCP-Timestamp`` is the Unix time of the attempt and ``X-DWCP-Signature-256`` is
``sha256=`` and the hex HMAC-SHA256 of ``<timestamp>.<body>`` under the secret.  See
``docs/webhooks.md``.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

import tenacity
from loguru import logger

from dwcp import _validation as check
from dwcp._breaker import CLOSED, OPEN
from dwcp._clock import Clock, SystemClock
from dwcp._errors import DWCPError
from dwcp._events import (
    BreakerStateChanged,
    ComponentSuspected,
    ComponentUnhealthy,
    NodeBack,
    NodeLost,
    RecoveryFailed,
    RecoveryStarted,
    RecoverySucceeded,
)
from dwcp._lifecycle import StartStop

__all__ = ["EVENT_KINDS", "WebhookNotifier", "sign"]

EVENT_KINDS = (
    "recovery_failed",
    "breaker_opened",
    "recovery_succeeded",
    "breaker_closed",
    "component_unhealthy",
    "recovery_started",
    "node_lost",
    "node_back",
    "component_suspected",
)
_THREAD_NAME = "dwcp-webhook"
# No single backoff grows past this, however many attempts are configured.
_MAX_BACKOFF = 30.0
# Receivers answer with a short acknowledgement; read no more than this of it.
_MAX_RESPONSE = 64 * 1024
# 4xx answers that say "later", not "never": request timeout, too many requests.
_RETRY_LATER = (408, 429)
# An opposite event clears the deduplication memory of these kinds (see the module doc).
_CLEARS = {
    "breaker_closed": ("breaker_opened",),
    "breaker_opened": ("breaker_closed",),
    "recovery_succeeded": (
        "component_unhealthy",
        "recovery_started",
        "recovery_failed",
        "component_suspected",
    ),
    "component_unhealthy": ("recovery_succeeded",),
    "recovery_started": ("recovery_succeeded",),
    "recovery_failed": ("recovery_succeeded",),
    "node_lost": ("node_back",),
    "node_back": ("node_lost",),
}


class _Retryable(Exception):
    """The receiver may accept a later attempt: 5xx, 408, 429, timeout, connection error."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        #: Seconds the receiver asked us to wait (``Retry-After``), if it did.
        self.retry_after = retry_after


class _Rejected(Exception):
    """The receiver refused the alert itself (4xx); sending it again cannot help."""


class _Aborted(Exception):
    """``close()`` ran out of time while a delivery was backing off."""


def _alert(event: object) -> tuple[str, str | None, dict[str, Any]] | None:
    """The (kind, component, details) of an event, or None for events no webhook reports."""
    if isinstance(event, RecoveryFailed):
        return (
            "recovery_failed",
            event.component,
            {"attempts": event.attempts, "error": event.error},
        )
    if isinstance(event, RecoverySucceeded):
        details = {"attempts": event.attempts, "downtime_seconds": round(event.downtime, 3)}
        return "recovery_succeeded", event.component, details
    if isinstance(event, RecoveryStarted):
        return "recovery_started", event.component, {"error": event.error}
    if isinstance(event, ComponentUnhealthy):
        return "component_unhealthy", event.component, {"error": event.error}
    if isinstance(event, BreakerStateChanged) and event.to_state in (OPEN, CLOSED):
        kind = "breaker_opened" if event.to_state == OPEN else "breaker_closed"
        return kind, "transport", {"from_state": event.from_state, "to_state": event.to_state}
    if isinstance(event, ComponentSuspected):
        details = {"suspicion": round(event.suspicion, 3), "threshold": event.threshold}
        return "component_suspected", event.component, details
    if isinstance(event, NodeLost):  # cluster events (dwcp.cluster) name no component
        lost: dict[str, Any] = {"node": event.node, "silent_for": event.silent_for}
        return "node_lost", None, {**lost, "bound": event.bound, "reason": event.reason}
    if isinstance(event, NodeBack):
        return "node_back", None, {"node": event.node, "down_for": event.down_for}
    return None


def _utc_timestamp(seconds: float | None = None) -> str:
    moment = (
        datetime.now(timezone.utc)
        if seconds is None
        else datetime.fromtimestamp(seconds, timezone.utc)
    )
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:  # RFC 9110 dates are GMT; the parser leaves "-0000" naive
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def _secret(value: object) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes):
        raise TypeError(f"secret must be a str or bytes, got {type(value).__name__}")
    if not value:
        raise ValueError("secret must not be empty (pass None for unsigned requests)")
    return value


def sign(secret: str | bytes, timestamp: str, body: bytes) -> str:
    """The ``X-DWCP-Signature-256`` value for ``body`` sent at ``timestamp`` (Unix seconds).

    A receiver recomputes it from the raw body and the ``X-DWCP-Timestamp`` header and
    compares with ``hmac.compare_digest``; rejecting old timestamps stops replays.
    """
    if not isinstance(secret, (str, bytes)):
        raise TypeError(f"secret must be str or bytes, got {type(secret).__name__}")
    if not isinstance(timestamp, str):
        raise TypeError(
            f"timestamp must be the X-DWCP-Timestamp header's text, got {type(timestamp).__name__}"
        )
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise TypeError(f"body must be the raw bytes received, got {type(body).__name__}")
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, timestamp.encode() + b"." + bytes(body), hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def _kinds(events: Iterable[str]) -> frozenset[str]:
    if isinstance(events, str):
        raise TypeError("events must be a collection of event names, not a single str")
    try:
        kinds = frozenset(events)
    except TypeError as exc:  # None, 5, a list of lists: not an iterable of names
        raise TypeError(
            f"events must be a collection of event names, got {type(events).__name__}"
        ) from exc
    wrong = sorted({type(k).__name__ for k in kinds if not isinstance(k, str)})
    if wrong:
        raise TypeError(f"events must be a collection of event names (str), got {', '.join(wrong)}")
    unknown = sorted(k for k in kinds if k not in EVENT_KINDS)
    if unknown or not kinds:
        what = f"unknown event name(s) {', '.join(map(repr, unknown))}" if unknown else "no events"
        raise ValueError(f"{what}; valid names are {', '.join(EVENT_KINDS)}")
    return kinds


def _checked_url(url: str) -> str:
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, got {type(url).__name__}")
    check.url_host("url", url)  # first: urlsplit() raises on an unbalanced "[" (naming nothing)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"url must be an absolute http:// or https:// URL, got {url!r}")
    return url


@dataclass(eq=False)
class _Queued:
    """An alert waiting for delivery, with what its deduplication needs."""

    alert: dict[str, Any]
    key: tuple[str, str, str]  # (manager, component or node, event)
    epoch: int  # the key's clear count when queued: a delivery after a clear records nothing
    queued_at: float


@dataclass(eq=False)
class _Run:
    """One start()..close() period; a worker only ever looks at its own run's flags."""

    closing: bool = False
    abort: threading.Event = field(default_factory=threading.Event)


class WebhookNotifier(StartStop):
    """A manager listener that POSTs selected events to ``url`` as JSON alerts.

    ``start()`` begins delivery (events received before it wait in the queue); ``close()``
    (or ``stop()``) delivers what is queued until its deadline, then gives up and joins the
    thread.

    Args:
        url: absolute ``http://`` or ``https://`` URL the alerts are POSTed to.
        events: the event kinds to post, from ``EVENT_KINDS``.
        timeout: seconds (or a ``timedelta``) one HTTP request may take.
        queue_size: alerts waiting for delivery; when full, the oldest is dropped.
        attempts: requests per alert, the first included (3 if not given); counts of tries
            are ``attempts`` across dwcp, as in ``RecoveryPolicy``.
        retry_attempts: the old name of ``attempts``, still accepted.
        retry_backoff: seconds (or a ``timedelta``) before the second request; doubles
            each time, at most 30 s.  A ``Retry-After`` answer replaces it, also at most 30 s.
        repeat_interval: seconds (or a ``timedelta``) during which an alert with the same
            (manager, component, event) as one already posted is suppressed; 0 posts all.
        secret: shared secret that signs every request (``X-DWCP-Signature-256``); None
            sends unsigned requests.
        enabled: False makes the notifier ignore every event (start and close still work).
        clock: where ``repeat_interval`` is measured and retry waits are waited out (and cut
            short by ``close()``), as for the Manager; ``dwcp.testing.FakeClock`` in tests.
    """

    def __init__(
        self,
        url: str,
        *,
        events: Iterable[str] = ("recovery_failed", "breaker_opened"),
        timeout: float | timedelta = 5.0,
        queue_size: int = 1000,
        attempts: int | None = None,
        retry_backoff: float | timedelta = 0.5,
        repeat_interval: float | timedelta = 3600.0,
        secret: str | bytes | None = None,
        enabled: bool = True,
        clock: Clock | None = None,
        retry_attempts: int | None = None,
    ) -> None:
        self._url = _checked_url(url)
        parts = urlsplit(url)
        # Webhook URLs often carry a secret in the path or userinfo; logs name only the host.
        self._target = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        self._kinds = _kinds(events)
        self._timeout = check.seconds("timeout", timeout, allow_zero=False)
        self._queue_size = check.count("queue_size", queue_size)
        if attempts is not None and retry_attempts is not None:
            raise TypeError("give attempts or its old name retry_attempts, not both")
        if retry_attempts is not None:
            self._attempts = check.count("retry_attempts", retry_attempts)
        else:
            self._attempts = check.count("attempts", 3 if attempts is None else attempts)
        self._backoff = check.seconds("retry_backoff", retry_backoff, allow_zero=True)
        self._repeat = check.seconds("repeat_interval", repeat_interval, allow_zero=True)
        self._secret = _secret(secret)
        self._enabled = check.flag("enabled", enabled)
        if clock is not None and not isinstance(clock, Clock):
            raise TypeError(f"clock must have now() and sleep(), got {type(clock).__name__}")
        self._clock: Clock = clock or SystemClock()

        self._cond = threading.Condition()
        self._queue: deque[_Queued] = deque()
        self._run = _Run()
        self._thread: threading.Thread | None = None
        # When each (manager, component, kind) was last delivered, by ``clock.now()``; the
        # alert of each key queued or in delivery now; how often each key was cleared.
        self._last_posted: dict[tuple[str, str, str], float] = {}
        self._pending_by_key: dict[tuple[str, str, str], _Queued] = {}
        self._epochs: dict[tuple[str, str, str], int] = {}
        self._delivered = 0
        self._failed = 0
        self._dropped = 0
        self._suppressed = 0

    def __repr__(self) -> str:
        with self._cond:
            state = "started" if self._thread is not None else "stopped"
            counts = (
                f"delivered={self._delivered} failed={self._failed} dropped={self._dropped} "
                f"suppressed={self._suppressed} pending={len(self._queue)}"
            )
        events = ",".join(k for k in EVENT_KINDS if k in self._kinds)
        signed = " signed" if self._secret else ""
        return f"<WebhookNotifier {self._target} {state}{signed} events={events} {counts}>"

    # -- counters ---------------------------------------------------------------------------

    @property
    def events(self) -> frozenset[str]:
        """The event kinds this notifier posts."""
        return self._kinds

    @property
    def delivered(self) -> int:
        """Alerts the receiver accepted (2xx)."""
        return self._delivered

    @property
    def failed(self) -> int:
        """Alerts given up on: a 4xx answer, every attempt failed, or close() cut the retries."""
        return self._failed

    @property
    def dropped(self) -> int:
        """Alerts never sent: pushed out of a full queue, still queued at close(), or late."""
        return self._dropped

    @property
    def suppressed(self) -> int:
        """Alerts not queued because the same one was delivered, or queued and not yet
        delivered, within ``repeat_interval``."""
        return self._suppressed

    @property
    def pending(self) -> int:
        """Alerts waiting in the queue."""
        with self._cond:
            return len(self._queue)

    # -- the listener -------------------------------------------------------------------------

    def __call__(self, event: object) -> None:
        """Queue an alert for ``event`` if its kind is selected and not a repeat; never blocks."""
        if not self._enabled:
            return
        described = _alert(event)
        if described is None:
            return
        kind, component, details = described
        manager = str(getattr(event, "manager", "") or "")
        peer = str(getattr(event, "peer", "") or "")
        alert = {
            "event": kind,
            "manager": manager or None,
            "peer": peer or None,
            "component": component,
            "timestamp": _utc_timestamp(getattr(event, "timestamp", None)),
            "details": details,
            "source": "dwcp",
        }
        pushed_out: _Queued | None = None
        with self._cond:
            # Cluster events name no component: each node is deduplicated on its own.
            item = self._admit(manager, component or str(details.get("node") or ""), kind, alert)
            if item is None:
                return
            if self._run.closing:
                self._dropped += 1
                pushed_out = item
            else:
                if len(self._queue) >= self._queue_size:
                    pushed_out = self._queue.popleft()
                    self._dropped += 1
                self._queue.append(item)
                self._cond.notify()
            if pushed_out is not None:
                self._finished(pushed_out, delivered=False)
        if pushed_out is not None:
            dropped = pushed_out.alert["event"]
            logger.bind(url=self._target, event=dropped).warning(
                f"Webhook alert dropped: {dropped} (queue full or notifier closed)"
            )

    def _admit(
        self, manager: str, component: str, kind: str, alert: dict[str, Any]
    ) -> _Queued | None:
        # Caller holds the lock.  Every event updates the memory, selected or not, so a
        # recovery the receiver never hears of still re-arms the next failure's alert.
        for cleared in _CLEARS.get(kind, ()):
            gone = (manager, component, cleared)
            self._last_posted.pop(gone, None)
            self._pending_by_key.pop(gone, None)
            self._epochs[gone] = self._epochs.get(gone, 0) + 1
        if kind not in self._kinds:
            return None
        key, now = (manager, component, kind), self._clock.now()
        last = self._last_posted.get(key)
        waiting = self._pending_by_key.get(key)
        if (last is not None and now - last < self._repeat) or (
            waiting is not None and now - waiting.queued_at < self._repeat
        ):
            self._suppressed += 1
            return None
        item = _Queued(alert, key, self._epochs.get(key, 0), now)
        self._pending_by_key[key] = item
        return item

    def _finished(self, item: _Queued, *, delivered: bool) -> None:
        # Caller holds the lock.  Only an accepted alert is remembered, and only if nothing
        # cleared its key meanwhile; a failed or dropped one lets the next repeat through.
        if self._pending_by_key.get(item.key) is item:
            del self._pending_by_key[item.key]
        if delivered and item.epoch == self._epochs.get(item.key, 0):
            self._last_posted[item.key] = self._clock.now()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the delivery thread; raises ``DWCPError`` (``ALREADY_STARTED``) when running."""
        with self._cond:
            if self._thread is not None:
                raise DWCPError("webhook notifier is already started", code="ALREADY_STARTED")
            self._run = run = _Run()
            self._thread = threading.Thread(
                target=self._work, args=(run,), name=_THREAD_NAME, daemon=True
            )
            self._thread.start()

    def close(self, timeout: float | timedelta = 5.0) -> None:
        """Deliver queued alerts for up to ``timeout`` seconds, then stop and join the thread.

        Alerts still queued at the deadline are dropped; a delivery backing off is cut short.
        Idempotent; later events are dropped until ``start()`` is called again.
        """
        deadline = check.seconds("timeout", timeout, allow_zero=True)
        with self._cond:
            thread, self._thread = self._thread, None
            run = self._run
            run.closing = True
            self._cond.notify_all()
        if thread is not None:
            thread.join(deadline)
            if thread.is_alive():
                run.abort.set()
                with self._cond:
                    self._cond.notify_all()
                # Backoff waits end at once; a POST in flight ends within its own timeout.
                thread.join(self._timeout + 1.0)
                if thread.is_alive():
                    logger.bind(url=self._target).warning(
                        f"Webhook thread did not stop in time; a request to {self._target} is hung"
                    )
        with self._cond:
            left = len(self._queue)
            for item in self._queue:
                self._finished(item, delivered=False)
            self._queue.clear()
            self._dropped += left
        if left:
            logger.bind(url=self._target, dropped=left).warning(
                f"Webhook alerts dropped at close: {left} still queued for {self._target}"
            )

    def stop(self, timeout: float | timedelta = 5.0) -> None:
        """Alias of ``close()``, like ``Manager.stop()``."""
        self.close(timeout)

    # -- delivery -------------------------------------------------------------------------------

    def _work(self, run: _Run) -> None:
        while True:
            with self._cond:
                while not self._queue and not run.closing:
                    self._cond.wait()
                if run.abort.is_set() or not self._queue:
                    return
                item = self._queue.popleft()
            delivered = False
            try:
                delivered = self._deliver(item.alert, run)
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any bug
                with self._cond:
                    self._failed += 1
                logger.opt(exception=exc).error("Webhook delivery crashed")
            finally:
                with self._cond:
                    self._finished(item, delivered=delivered)

    def _deliver(self, alert: dict[str, Any], run: _Run) -> bool:
        """POST ``alert`` with retries; True when the receiver accepted it."""
        kind = str(alert["event"])
        body = json.dumps(alert).encode()
        delivery = str(uuid.uuid4())
        log = logger.bind(url=self._target, event=kind, delivery=delivery)
        backoff = tenacity.wait_exponential(multiplier=self._backoff, max=_MAX_BACKOFF)

        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            if isinstance(error, _Retryable) and error.retry_after is not None:
                # The receiver said when; still bounded, so close() and the queue move on.
                return min(error.retry_after, _MAX_BACKOFF)
            return float(backoff(state))

        def sleep(seconds: float) -> None:
            if not self._clock.sleep(seconds, run.abort):
                raise _Aborted

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.bind(attempt=state.attempt_number, error=str(error)).debug(
                f"Webhook delivery attempt {state.attempt_number} failed: {error}"
            )

        # Built per delivery: a Retrying keeps per-run statistics and is never shared.
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self._attempts),
            wait=wait,
            retry=tenacity.retry_if_exception_type(_Retryable),
            sleep=sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            retrying(self._post, body, kind, delivery)
        except (_Retryable, _Rejected, _Aborted) as exc:
            with self._cond:
                self._failed += 1
            reason = "close() deadline passed" if isinstance(exc, _Aborted) else str(exc)
            log.bind(error=reason).warning(
                f"Webhook delivery failed: {kind} to {self._target}: {reason}"
            )
            return False
        with self._cond:
            self._delivered += 1
        log.debug(f"Webhook alert delivered: {kind} to {self._target}")
        return True

    def _post(self, body: bytes, kind: str, delivery: str) -> None:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "dwcp-webhook",
            "X-DWCP-Event": kind,
            "X-DWCP-Delivery": delivery,
        }
        if self._secret is not None:
            # Signed per attempt: a receiver that rejects old timestamps still takes a retry.
            timestamp = str(int(time.time()))
            headers["X-DWCP-Timestamp"] = timestamp
            headers["X-DWCP-Signature-256"] = sign(self._secret, timestamp, body)
        request = urllib.request.Request(self._url, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                response.read(_MAX_RESPONSE)
        except urllib.error.HTTPError as exc:
            retry_after = _retry_after(exc.headers.get("Retry-After")) if exc.headers else None
            exc.close()
            if exc.code >= 500 or exc.code in _RETRY_LATER:
                raise _Retryable(f"HTTP {exc.code}", retry_after) from exc
            raise _Rejected(f"HTTP {exc.code}") from exc
        except (OSError, http.client.HTTPException) as exc:
            # URLError (refused, DNS), timeouts and resets are OSErrors; a garbled answer is
            # an HTTPException.  Both say nothing about the alert itself.
            raise _Retryable(check.describe(exc)) from exc
