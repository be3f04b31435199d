"""Posts selected manager events as JSON alerts to a webhook URL, from a thread of its own.

A ``WebhookNotifier`` is a listener: ``manager.add_listener(notifier)``.  Calling it only puts
the alert on a bounded queue (when full, the oldest alert is dropped and counted), so the
manager's event thread is never held up by a slow or dead receiver.  A thread named
``dwcp-webhook`` POSTs each alert; 5xx answers, timeouts and connection errors are retried
with exponential backoff, 4xx answers are not.

Payload (``Content-Type: application/json``, one alert per request)::

    {
      "event": "recovery_failed",
      "component": "transport",
      "timestamp": "2024-05-01T12:00:00.123Z",
      "details": {"attempts": 3, "error": "ConnectionRefusedError: ..."},
      "source": "dwcp"
    }

``timestamp`` is ISO-8601 UTC, when the event happened.  ``component`` is
the component's slot name; breaker events name ``transport``, whose sends the breaker guards.
``details`` by ``event``:

- ``recovery_failed``: ``attempts`` (int), ``error`` (str or null)
- ``recovery_succeeded``: ``attempts`` (int), ``downtime_seconds`` (float)
- ``recovery_started``: ``error`` (str or null), the failure that started the cycle
- ``component_unhealthy``: ``error`` (str)
- ``breaker_opened``: ``from_state`` (str), ``to_state`` (``"open"``)
- ``breaker_closed``: ``from_state`` (str), ``to_state`` (``"closed"``)
- ``node_lost`` (cluster; ``component`` null): ``node``, ``silent_for``, ``bound``, ``reason``
- ``node_back`` (cluster; ``component`` null): ``node``, ``down_for``

The request also carries the header ``X-DWCP-Event: <event>``.  See ``docs/webhooks.md``.
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import tenacity
from loguru import logger

from dwcp.breaker import CLOSED, OPEN
from dwcp.errors import DWCPError
from dwcp.events import (
    BreakerStateChanged,
    ComponentUnhealthy,
    NodeBack,
    NodeLost,
    RecoveryFailed,
    RecoveryStarted,
    RecoverySucceeded,
)
from dwcp.manager import _count, _describe, _seconds

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["EVENT_KINDS", "WebhookNotifier"]

EVENT_KINDS = (
    "recovery_failed",
    "breaker_opened",
    "recovery_succeeded",
    "breaker_closed",
    "component_unhealthy",
    "recovery_started",
    "node_lost",
    "node_back",
)
_THREAD_NAME = "dwcp-webhook"
# No single backoff grows past this, however many attempts are configured.
_MAX_BACKOFF = 30.0
# Receivers answer with a short acknowledgement; read no more than this of it.
_MAX_RESPONSE = 64 * 1024


class _Retryable(Exception):
    """The receiver may accept a later attempt: 5xx, timeout, connection error."""


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
    if isinstance(event, BreakerStateChanged) and event.new in (OPEN, CLOSED):
        kind = "breaker_opened" if event.new == OPEN else "breaker_closed"
        return kind, "transport", {"from_state": event.old, "to_state": event.new}
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


def _kinds(events: Iterable[str]) -> frozenset[str]:
    if isinstance(events, str):
        raise TypeError("events must be a collection of event names, not a single str")
    kinds = frozenset(events)
    unknown = sorted(k for k in kinds if k not in EVENT_KINDS)
    if unknown or not kinds:
        what = f"unknown event name(s) {', '.join(map(repr, unknown))}" if unknown else "no events"
        raise ValueError(f"{what}; valid names are {', '.join(EVENT_KINDS)}")
    return kinds


def _checked_url(url: str) -> str:
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, got {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"url must be an absolute http:// or https:// URL, got {url!r}")
    return url


@dataclass(eq=False)
class _Run:
    """One start()..close() period; a worker only ever looks at its own run's flags."""

    closing: bool = False
    abort: threading.Event = field(default_factory=threading.Event)


class WebhookNotifier:
    """A manager listener that POSTs selected events to ``url`` as JSON alerts.

    ``start()`` begins delivery (events received before it wait in the queue); ``close()``
    delivers what is queued until its deadline, then gives up and joins the thread.
    """

    def __init__(
        self,
        url: str,
        *,
        events: Iterable[str] = ("recovery_failed", "breaker_opened"),
        timeout: float = 5.0,
        queue_size: int = 1000,
        retry_attempts: int = 3,
        retry_backoff: float = 0.5,
    ) -> None:
        self._url = _checked_url(url)
        parts = urlsplit(url)
        # Webhook URLs often carry a secret in the path or userinfo; logs name only the host.
        self._target = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        self._kinds = _kinds(events)
        self._timeout = _seconds("timeout", timeout, allow_zero=False)
        self._queue_size = _count("queue_size", queue_size)
        self._attempts = _count("retry_attempts", retry_attempts)
        self._backoff = _seconds("retry_backoff", retry_backoff, allow_zero=True)

        self._cond = threading.Condition()
        self._queue: deque[dict[str, Any]] = deque()
        self._run = _Run()
        self._thread: threading.Thread | None = None
        self._delivered = 0
        self._failed = 0
        self._dropped = 0

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
    def pending(self) -> int:
        """Alerts waiting in the queue."""
        with self._cond:
            return len(self._queue)

    # -- the listener -------------------------------------------------------------------------

    def __call__(self, event: object) -> None:
        """Queue an alert for ``event`` if its kind is selected; never blocks on delivery."""
        described = _alert(event)
        if described is None or described[0] not in self._kinds:
            return
        kind, component, details = described
        alert = {
            "event": kind,
            "component": component,
            "timestamp": _utc_timestamp(getattr(event, "timestamp", None)),
            "details": details,
            "source": "dwcp",
        }
        pushed_out: dict[str, Any] | None = None
        with self._cond:
            if self._run.closing:
                self._dropped += 1
                pushed_out = alert
            else:
                if len(self._queue) >= self._queue_size:
                    pushed_out = self._queue.popleft()
                    self._dropped += 1
                self._queue.append(alert)
                self._cond.notify()
        if pushed_out is not None:
            logger.bind(url=self._target, event=pushed_out["event"]).warning(
                "Webhook alert dropped"
            )

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

    def close(self, timeout: float = 5.0) -> None:
        """Deliver queued alerts for up to ``timeout`` seconds, then stop and join the thread.

        Alerts still queued at the deadline are dropped; a delivery backing off is cut short.
        Idempotent; later events are dropped until ``start()`` is called again.
        """
        deadline = _seconds("timeout", timeout, allow_zero=True)
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
                        "Webhook thread did not stop in time; a request is hung"
                    )
        with self._cond:
            left = len(self._queue)
            self._queue.clear()
            self._dropped += left
        if left:
            logger.bind(url=self._target, dropped=left).warning("Webhook alerts dropped at close")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- delivery -------------------------------------------------------------------------------

    def _work(self, run: _Run) -> None:
        while True:
            with self._cond:
                while not self._queue and not run.closing:
                    self._cond.wait()
                if run.abort.is_set() or not self._queue:
                    return
                alert = self._queue.popleft()
            try:
                self._deliver(alert, run)
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any bug
                with self._cond:
                    self._failed += 1
                logger.opt(exception=exc).error("Webhook delivery crashed")

    def _deliver(self, alert: dict[str, Any], run: _Run) -> None:
        kind = str(alert["event"])
        body = json.dumps(alert).encode()
        log = logger.bind(url=self._target, event=kind)

        def sleep(seconds: float) -> None:
            if run.abort.wait(seconds):
                raise _Aborted

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.bind(attempt=state.attempt_number, error=str(error)).debug(
                "Webhook delivery attempt failed"
            )

        # Built per delivery: a Retrying keeps per-run statistics and is never shared.
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self._attempts),
            wait=tenacity.wait_exponential(multiplier=self._backoff, max=_MAX_BACKOFF),
            retry=tenacity.retry_if_exception_type(_Retryable),
            sleep=sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            retrying(self._post, body, kind)
        except (_Retryable, _Rejected, _Aborted) as exc:
            with self._cond:
                self._failed += 1
            reason = "close() deadline passed" if isinstance(exc, _Aborted) else str(exc)
            log.bind(error=reason).warning("Webhook delivery failed")
            return
        with self._cond:
            self._delivered += 1
        log.debug("Webhook alert delivered")

    def _post(self, body: bytes, kind: str) -> None:
        request = urllib.request.Request(
            self._url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": "dwcp-webhook",
                "X-DWCP-Event": kind,
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                response.read(_MAX_RESPONSE)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code >= 500:
                raise _Retryable(f"HTTP {exc.code}") from exc
            raise _Rejected(f"HTTP {exc.code}") from exc
        except (OSError, http.client.HTTPException) as exc:
            # URLError (refused, DNS), timeouts and resets are OSErrors; a garbled answer is
            # an HTTPException.  Both say nothing about the alert itself.
            raise _Retryable(_describe(exc)) from exc
