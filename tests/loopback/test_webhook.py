"""Webhook alerts against a real local HTTP receiver that is up, down, slow, or failing."""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

import dwcp
from dwcp._events import SendRejected
from dwcp.testing import FakeClock, FakeTransport
from dwcp.webhook import EVENT_KINDS, WebhookNotifier, _alert, _retry_after, sign
from tests.conftest import wait_until

MakeManager = Callable[..., dwcp.Manager]
MakeNotifier = Callable[..., WebhookNotifier]


class Receiver:
    """A webhook endpoint on 127.0.0.1 that records alerts and answers as the test scripts.

    ``answers`` are status codes (or ``(code, headers)``) given in order, then 200; with
    ``gate`` set, each request waits on it before answering, which makes the receiver slow
    without any sleeping.  ``bodies`` keeps each request's raw body, for signatures.
    """

    def __init__(self, port: int = 0) -> None:
        self.answers: list[int | tuple[int, dict[str, str]]] = []
        self.bodies: list[bytes] = []
        self.gate: threading.Event | None = None
        self.received: list[tuple[dict[str, Any], dict[str, str]]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._lock:
                    receiver.received.append(
                        (json.loads(body), {k.lower(): v for k, v in self.headers.items()})
                    )
                    receiver.bodies.append(body)
                    answer = receiver.answers.pop(0) if receiver.answers else 200
                    gate = receiver.gate
                code, headers = answer if isinstance(answer, tuple) else (answer, {})
                if gate is not None:
                    gate.wait(10)
                self.send_response(code)
                for name, header in headers.items():
                    self.send_header(name, header)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # the notifier hung up on a slow answer: expected here

        self._server = Server(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks/secret-token"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="receiver"
        )
        self._thread.start()

    def headers(self) -> list[dict[str, str]]:
        with self._lock:
            return [headers for _, headers in self.received]

    def payloads(self) -> list[dict[str, Any]]:
        with self._lock:
            return [payload for payload, _ in self.received]

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def close(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL nothing listens on: bind a port, then let it go."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


@pytest.fixture
def make_notifier() -> Iterator[MakeNotifier]:
    """Build notifiers with quick retries; every one is closed (thread joined) at teardown."""
    made: list[WebhookNotifier] = []

    def make(url: str, **kwargs: Any) -> WebhookNotifier:
        options: dict[str, Any] = {"retry_backoff": 0.01, "timeout": 2.0}
        options.update(kwargs)
        notifier = WebhookNotifier(url, **options)
        made.append(notifier)
        return notifier

    yield make
    for notifier in made:
        notifier.close(timeout=2.0)


def failed(component: str = "transport") -> dwcp.RecoveryFailed:
    return dwcp.RecoveryFailed(component, 3, "ConnectionError: peer unreachable")


# -- the payload -------------------------------------------------------------------------------


def test_alert_payload_and_headers(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    notifier = make_notifier(receiver.url)
    notifier.start()
    notifier(failed())
    wait_until(lambda: notifier.delivered == 1)

    [(payload, headers)] = receiver.received
    assert payload == {
        "event": "recovery_failed",
        "manager": None,
        "peer": None,
        "component": "transport",
        "timestamp": payload["timestamp"],
        "details": {"attempts": 3, "error": "ConnectionError: peer unreachable"},
        "source": "dwcp",
    }
    stamp = datetime.fromisoformat(payload["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - stamp) < timedelta(minutes=1)
    assert headers["content-type"] == "application/json"
    assert headers["x-dwcp-event"] == "recovery_failed"
    assert (notifier.failed, notifier.dropped) == (0, 0)


def test_every_event_kind_maps_to_documented_details() -> None:
    assert _alert(dwcp.RecoveryFailed("sync", 3, None)) == (
        "recovery_failed",
        "sync",
        {"attempts": 3, "error": None},
    )
    assert _alert(dwcp.RecoverySucceeded("transport", 2, 1.23456)) == (
        "recovery_succeeded",
        "transport",
        {"attempts": 2, "downtime_seconds": 1.235},
    )
    assert _alert(dwcp.RecoveryStarted("transport", "boom")) == (
        "recovery_started",
        "transport",
        {"error": "boom"},
    )
    assert _alert(dwcp.ComponentUnhealthy("compression", "boom")) == (
        "component_unhealthy",
        "compression",
        {"error": "boom"},
    )
    assert _alert(dwcp.BreakerStateChanged("closed", "open")) == (
        "breaker_opened",
        "transport",
        {"from_state": "closed", "to_state": "open"},
    )
    assert _alert(dwcp.BreakerStateChanged("half-open", "closed")) == (
        "breaker_closed",
        "transport",
        {"from_state": "half-open", "to_state": "closed"},
    )
    assert _alert(dwcp.BreakerStateChanged("open", "half-open")) is None
    assert _alert(dwcp.RecoveryAttempt("transport", 1, 1.0)) is None
    assert _alert(SendRejected("open")) is None


def test_only_selected_kinds_are_posted(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    notifier = make_notifier(receiver.url)
    notifier.start()
    notifier(dwcp.RecoverySucceeded("transport", 1, 0.5))  # not selected by default
    notifier(dwcp.BreakerStateChanged("closed", "open"))
    notifier(failed())
    wait_until(lambda: notifier.delivered == 2)
    assert [p["event"] for p in receiver.payloads()] == ["breaker_opened", "recovery_failed"]


def test_all_kinds_can_be_selected(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    notifier = make_notifier(receiver.url, events=EVENT_KINDS)
    notifier.start()
    for event in (
        dwcp.ComponentUnhealthy("transport", "down"),
        dwcp.RecoveryStarted("transport", "down"),
        failed(),
        dwcp.BreakerStateChanged("closed", "open"),
        dwcp.RecoverySucceeded("transport", 1, 0.5),
        dwcp.BreakerStateChanged("half-open", "closed"),
        dwcp.NodeLost("web-2", 3.2, 3.0),
        dwcp.NodeBack("web-2", 12.5),
        dwcp.ComponentSuspected("transport", 9.1, 8.0),
    ):
        notifier(event)
    wait_until(lambda: notifier.delivered == 9)
    assert {p["event"] for p in receiver.payloads()} == set(EVENT_KINDS)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"events": ("recovery_failed", "nope")}, ValueError, "valid names are recovery_failed"),
        ({"events": ()}, ValueError, "valid names are"),
        ({"events": "recovery_failed"}, TypeError, "not a single str"),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"queue_size": 0}, ValueError, "queue_size"),
        ({"retry_attempts": 0}, ValueError, "retry_attempts"),
        ({"attempts": 0}, ValueError, "attempts"),
        ({"attempts": 2, "retry_attempts": 2}, TypeError, "not both"),
        ({"retry_backoff": -1}, ValueError, "retry_backoff"),
    ],
)
def test_configuration_is_validated(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        WebhookNotifier("http://127.0.0.1:9/hook", **kwargs)


@pytest.mark.parametrize("url", ["127.0.0.1:9/hook", "ftp://example.invalid/x", "http://"])
def test_url_must_be_absolute_http(url: str) -> None:
    with pytest.raises(ValueError, match="url"):
        WebhookNotifier(url)


# -- delivery and retries ----------------------------------------------------------------------


def test_a_5xx_is_retried_until_accepted(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    receiver.answers = [500, 503]
    notifier = make_notifier(receiver.url, attempts=3)
    notifier.start()
    notifier(failed())
    wait_until(lambda: notifier.delivered == 1)
    assert receiver.count() == 3
    assert notifier.failed == 0


def test_5xx_on_every_attempt_fails_the_alert(
    receiver: Receiver, make_notifier: MakeNotifier
) -> None:
    receiver.answers = [500, 500, 500]
    notifier = make_notifier(receiver.url, attempts=3)
    notifier.start()
    notifier(failed())
    wait_until(lambda: notifier.failed == 1)
    assert (receiver.count(), notifier.delivered) == (3, 0)


def test_a_4xx_is_not_retried(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    receiver.answers = [400]
    notifier = make_notifier(receiver.url, attempts=3)
    notifier.start()
    notifier(failed())
    notifier(failed("sync"))  # the next alert goes through: the worker moved on
    wait_until(lambda: notifier.delivered == 1)
    assert notifier.failed == 1
    assert [p["component"] for p in receiver.payloads()] == ["transport", "sync"]


def test_a_receiver_that_is_down_fails_after_the_retries(
    closed_port_url: str, make_notifier: MakeNotifier
) -> None:
    notifier = make_notifier(closed_port_url, attempts=2)
    notifier.start()
    notifier(failed())
    wait_until(lambda: notifier.failed == 1)
    assert notifier.delivered == 0


def test_a_slow_receiver_times_out(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    receiver.gate = threading.Event()
    notifier = make_notifier(receiver.url, timeout=0.2, attempts=1)
    notifier.start()
    notifier(failed())
    wait_until(lambda: notifier.failed == 1)
    assert receiver.count() == 1


# -- the queue ---------------------------------------------------------------------------------


def test_a_full_queue_drops_the_oldest_alert(
    receiver: Receiver, make_notifier: MakeNotifier
) -> None:
    notifier = make_notifier(receiver.url, queue_size=2)
    for component in ("transport", "compression", "sync"):
        notifier(failed(component))  # not started yet: alerts wait in the queue
    assert (notifier.pending, notifier.dropped) == (2, 1)
    notifier.start()
    wait_until(lambda: notifier.delivered == 2)
    assert [p["component"] for p in receiver.payloads()] == ["compression", "sync"]


def test_the_caller_never_waits_for_delivery(
    receiver: Receiver, make_notifier: MakeNotifier
) -> None:
    receiver.gate = threading.Event()
    notifier = make_notifier(receiver.url, queue_size=3, timeout=10.0, repeat_interval=0)
    notifier.start()
    notifier(failed())
    wait_until(lambda: receiver.count() == 1)  # the worker is now stuck in that POST

    def call_ten_times() -> None:
        for _ in range(10):
            notifier(failed("sync"))

    calls = threading.Thread(target=call_ten_times)
    calls.start()
    calls.join(5)
    assert not calls.is_alive()
    assert (notifier.pending, notifier.dropped) == (3, 7)

    receiver.gate.set()
    notifier.close(timeout=5)
    assert notifier.delivered == 4


# -- close -------------------------------------------------------------------------------------


def test_close_delivers_what_is_queued(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    notifier = make_notifier(receiver.url)
    for component in ("transport", "sync", "consensus"):
        notifier(failed(component))
    notifier.start()
    notifier.close(timeout=5)
    assert notifier.delivered == 3
    assert [t for t in threading.enumerate() if t.name == "dwcp-webhook"] == []
    notifier.close()  # idempotent

    notifier(failed("compression"))  # after close: dropped, not queued
    assert (notifier.pending, notifier.dropped) == (0, 1)


def test_close_cuts_a_backoff_short(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    receiver.answers = [500]
    notifier = make_notifier(receiver.url, attempts=3, retry_backoff=30.0)
    notifier.start()
    notifier(failed())
    notifier(failed("sync"))
    wait_until(lambda: receiver.count() == 1)  # the worker now backs off for 30 s

    began = time.monotonic()
    notifier.close(timeout=0.1)
    assert time.monotonic() - began < 10.0  # far below the 30 s backoff it would wait out
    assert (notifier.delivered, notifier.failed, notifier.dropped) == (0, 1, 1)
    assert [t for t in threading.enumerate() if t.name == "dwcp-webhook"] == []


def test_start_twice_is_refused_and_restart_works(
    receiver: Receiver, make_notifier: MakeNotifier
) -> None:
    notifier = make_notifier(receiver.url)
    notifier.start()
    with pytest.raises(dwcp.DWCPError) as excinfo:
        notifier.start()
    assert excinfo.value.code == "ALREADY_STARTED"
    notifier.close()
    with notifier:
        notifier(failed())
    assert notifier.delivered == 1


# -- with a manager ----------------------------------------------------------------------------


def test_manager_events_reach_the_webhook(
    receiver: Receiver, make_notifier: MakeNotifier, make_manager: MakeManager
) -> None:
    transport = FakeTransport()
    manager = make_manager(transport, initial_backoff=0.01, max_retries=2, max_failures=1)
    notifier = make_notifier(receiver.url)
    manager.add_listener(notifier)
    notifier.start()
    manager.start()

    transport.healthy = False
    transport.fail_sends = ConnectionError("reset")
    with pytest.raises(dwcp.TransportError):
        manager.send_with_circuit_breaker(b"x")
    assert manager.attempt_component_recovery("transport") is False
    wait_until(lambda: notifier.delivered == 2)

    by_kind = {p["event"]: p for p in receiver.payloads()}
    assert set(by_kind) == {"breaker_opened", "recovery_failed"}
    assert by_kind["recovery_failed"]["details"]["attempts"] == 2
    assert by_kind["breaker_opened"]["details"] == {"from_state": "closed", "to_state": "open"}


# -- who sent it -------------------------------------------------------------------------------


def test_the_payload_names_the_manager_and_the_peer(
    receiver: Receiver, make_notifier: MakeNotifier
) -> None:
    notifier = make_notifier(receiver.url)
    notifier.start()
    notifier(dwcp.RecoveryFailed("transport", 3, "boom", manager="payments", peer="10.0.0.7:7400"))
    wait_until(lambda: notifier.delivered == 1)
    [payload] = receiver.payloads()
    assert (payload["manager"], payload["peer"]) == ("payments", "10.0.0.7:7400")


# -- deduplication -----------------------------------------------------------------------------


def retrip(manager: str = "") -> list[dwcp.BreakerStateChanged]:
    return [
        dwcp.BreakerStateChanged("open", "half-open", manager=manager),
        dwcp.BreakerStateChanged("half-open", "open", manager=manager),
    ]


def test_half_open_retrips_post_one_breaker_opened_per_repeat_interval(
    receiver: Receiver, make_notifier: MakeNotifier
) -> None:
    clock = FakeClock(1000.0)
    notifier = make_notifier(
        receiver.url,
        events=("breaker_opened", "breaker_closed"),
        repeat_interval=timedelta(minutes=10),
        clock=clock,
    )
    notifier(dwcp.BreakerStateChanged("closed", "open"))
    for _ in range(20):  # ten minutes of re-trips at 30 s each
        clock.advance(29.0)
        for event in retrip():
            notifier(event)
    assert (notifier.pending, notifier.suppressed) == (1, 20)

    clock.advance(600.0)  # still open after the repeat interval: one reminder
    for event in retrip():
        notifier(event)
    assert (notifier.pending, notifier.suppressed) == (2, 20)

    # It closes: reported; a new outage a moment later is reported at once.
    notifier(dwcp.BreakerStateChanged("half-open", "closed"))
    clock.advance(1.0)
    notifier(dwcp.BreakerStateChanged("closed", "open"))
    notifier.start()
    wait_until(lambda: notifier.delivered == 4)
    assert [p["event"] for p in receiver.payloads()] == [
        "breaker_opened",
        "breaker_opened",
        "breaker_closed",
        "breaker_opened",
    ]


def test_an_outage_reaches_the_receiver_even_when_its_first_alert_failed(
    make_notifier: MakeNotifier, closed_port_url: str
) -> None:
    """Deduplication is recorded on delivery: the first ``breaker_opened`` fails (the
    receiver is down), so the next re-trip within ``repeat_interval`` is posted, and once
    that one is delivered the re-trips after it are repeats."""
    notifier = make_notifier(
        closed_port_url, events=("breaker_opened",), attempts=2, repeat_interval=3600
    )
    notifier.start()
    notifier(dwcp.BreakerStateChanged("closed", "open"))
    wait_until(lambda: notifier.failed == 1)  # nothing listens: refused, twice
    receiver = Receiver(port=int(urlsplit(closed_port_url).port or 0))  # the receiver is up
    try:
        for event in retrip():  # the next re-trip, well within the hour
            notifier(event)
        wait_until(lambda: notifier.delivered == 1)
        assert [p["event"] for p in receiver.payloads()] == ["breaker_opened"]
        assert notifier.suppressed == 0
        for event in retrip():
            notifier(event)
        assert (notifier.suppressed, notifier.pending, notifier.delivered) == (1, 0, 1)
    finally:
        receiver.close()


def test_a_queued_alert_suppresses_its_repeats_until_it_is_delivered(
    receiver: Receiver, make_notifier: MakeNotifier
) -> None:
    notifier = make_notifier(receiver.url, events=("breaker_opened",))
    for _ in range(3):
        for event in retrip():
            notifier(event)
    assert (notifier.pending, notifier.suppressed) == (1, 2)
    notifier.start()
    wait_until(lambda: notifier.delivered == 1)
    for event in retrip():
        notifier(event)
    assert (notifier.pending, notifier.suppressed) == (0, 3)
    assert receiver.count() == 1


def test_an_alert_delivered_after_its_outage_ended_does_not_silence_the_next_outage(
    receiver: Receiver, make_notifier: MakeNotifier
) -> None:
    """The close clears the memory even of an alert still queued: when that alert is then
    delivered, the next outage's ``breaker_opened`` is still posted."""
    notifier = make_notifier(receiver.url, events=("breaker_opened",))
    notifier(dwcp.BreakerStateChanged("closed", "open"))  # queued, not yet delivered
    notifier(dwcp.BreakerStateChanged("half-open", "closed"))  # not posted, but clears
    notifier.start()
    wait_until(lambda: notifier.delivered == 1)
    notifier(dwcp.BreakerStateChanged("closed", "open"))  # a new outage
    wait_until(lambda: notifier.delivered == 2)
    assert notifier.suppressed == 0
    assert [p["event"] for p in receiver.payloads()] == ["breaker_opened", "breaker_opened"]


def test_dedup_is_per_manager_and_component(make_notifier: MakeNotifier) -> None:
    notifier = make_notifier("http://127.0.0.1:9/hook", events=("recovery_failed",))
    for manager in ("payments", "audit"):
        for component in ("transport", "sync"):
            for _ in range(3):
                notifier(dwcp.RecoveryFailed(component, 3, "boom", manager=manager))
    assert (notifier.pending, notifier.suppressed) == (4, 8)


def test_an_escalated_components_repeated_unhealthy_is_posted_once_until_it_recovers(
    make_notifier: MakeNotifier,
) -> None:
    clock = FakeClock(1000.0)
    notifier = make_notifier(
        "http://127.0.0.1:9/hook", events=("component_unhealthy",), clock=clock
    )
    for _ in range(50):  # one per monitoring pass while escalated
        clock.advance(10.0)
        notifier(dwcp.ComponentUnhealthy("sync", "down", manager="m"))
    assert (notifier.pending, notifier.suppressed) == (1, 49)
    # The recovery is not a selected kind, yet it re-arms the alert.
    notifier(dwcp.RecoverySucceeded("sync", 1, 500.0, manager="m"))
    notifier(dwcp.ComponentUnhealthy("sync", "down again", manager="m"))
    assert (notifier.pending, notifier.suppressed) == (2, 49)


def test_repeat_interval_zero_posts_every_alert(make_notifier: MakeNotifier) -> None:
    notifier = make_notifier("http://127.0.0.1:9/hook", repeat_interval=0)
    for _ in range(5):
        notifier(failed())
    assert (notifier.pending, notifier.suppressed) == (5, 0)


# -- signatures --------------------------------------------------------------------------------


def test_requests_are_signed_with_the_shared_secret(
    receiver: Receiver, make_notifier: MakeNotifier
) -> None:
    receiver.answers = [500]  # the retry is signed afresh
    notifier = make_notifier(receiver.url, secret="s3cret")
    notifier.start()
    notifier(failed())
    wait_until(lambda: notifier.delivered == 1)

    headers = receiver.headers()
    assert len(headers) == 2
    assert headers[0]["x-dwcp-delivery"] == headers[1]["x-dwcp-delivery"]
    for body, request_headers in zip(receiver.bodies, headers):
        timestamp = request_headers["x-dwcp-timestamp"]
        assert abs(int(timestamp) - time.time()) < 60
        # What a receiver does, with the standard library only.
        expected = hmac.new(b"s3cret", timestamp.encode() + b"." + body, hashlib.sha256)
        signature = request_headers["x-dwcp-signature-256"]
        assert hmac.compare_digest(signature, "sha256=" + expected.hexdigest())
        assert not hmac.compare_digest(signature, sign("wrong", timestamp, body))


def test_unsigned_without_a_secret(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    notifier = make_notifier(receiver.url)
    notifier.start()
    notifier(failed())
    wait_until(lambda: notifier.delivered == 1)
    [headers] = receiver.headers()
    assert "x-dwcp-signature-256" not in headers and "x-dwcp-timestamp" not in headers


def test_sign_matches_a_known_vector() -> None:
    digest = hmac.new(b"key", b"1700000000.{}", hashlib.sha256).hexdigest()
    assert sign(b"key", "1700000000", b"{}") == f"sha256={digest}"
    assert sign("key", "1700000000", b"{}") == sign(b"key", "1700000000", b"{}")


# -- 408, 429 and Retry-After ------------------------------------------------------------------


def http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


@pytest.mark.parametrize(
    ("answer", "low", "high"),
    [
        ((429, {"Retry-After": "7"}), 7.0, 7.0),
        ((503, {"Retry-After": "2"}), 2.0, 2.0),
        ((429, {"Retry-After": "3600"}), 30.0, 30.0),  # bounded
        ((408, {}), 0.25, 0.25),  # no Retry-After: the usual backoff
        ((429, {"Retry-After": "soon"}), 0.25, 0.25),  # unreadable: the usual backoff
    ],
)
def test_retry_later_answers_are_retried_after_what_they_ask(
    receiver: Receiver,
    make_notifier: MakeNotifier,
    answer: tuple[int, dict[str, str]],
    low: float,
    high: float,
) -> None:
    receiver.answers = [answer]
    clock = FakeClock()
    notifier = make_notifier(receiver.url, retry_backoff=0.25, clock=clock)
    notifier.start()
    notifier(failed())
    wait_until(lambda: notifier.delivered == 1)
    assert receiver.count() == 2
    assert len(clock.slept) == 1 and low <= clock.slept[0] <= high, clock.slept


def test_retry_after_as_an_http_date(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    receiver.answers = [(429, {"Retry-After": http_date(20)})]
    clock = FakeClock()
    notifier = make_notifier(receiver.url, clock=clock)
    notifier.start()
    notifier(failed())
    wait_until(lambda: notifier.delivered == 1)
    [delay] = clock.slept
    # At most the 20 s asked (whole seconds on the wire), less the moments the request took
    # on a busy machine; the lower bound still excludes the usual 0.5 s backoff and the
    # 30 s cap that a misread date (in the past, or an hour off) would give.
    assert 10.0 <= delay <= 20.0, delay


def test_429_on_every_attempt_fails_after_the_retries(
    receiver: Receiver, make_notifier: MakeNotifier
) -> None:
    receiver.answers = [(429, {"Retry-After": "1"})] * 3
    clock = FakeClock()
    notifier = make_notifier(receiver.url, attempts=3, clock=clock)
    notifier.start()
    notifier(failed())
    wait_until(lambda: notifier.failed == 1)
    assert (receiver.count(), clock.slept) == (3, [1.0, 1.0])


def test_other_4xx_are_still_not_retried(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    receiver.answers = [(403, {"Retry-After": "1"})]
    clock = FakeClock()
    notifier = make_notifier(receiver.url, clock=clock)
    notifier.start()
    notifier(failed())
    wait_until(lambda: notifier.failed == 1)
    assert (receiver.count(), clock.slept) == (1, [])


def test_retry_after_parsing() -> None:
    now = 1_700_000_000.0
    assert _retry_after("120", now) == 120.0
    assert _retry_after(" 0 ", now) == 0.0
    assert _retry_after(email.utils.formatdate(now + 90, usegmt=True), now) == 90.0
    assert _retry_after(email.utils.formatdate(now - 90, usegmt=True), now) == 0.0
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now) == 0.0  # in the past
    assert _retry_after("-5", now) is None
    assert _retry_after("tomorrow", now) is None
    assert _retry_after(None, now) is None


# -- configuration, repr, aliases --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"enabled": "no"}, TypeError, "enabled must be a bool"),
        ({"enabled": 0}, TypeError, "enabled must be a bool"),
        ({"repeat_interval": -1}, ValueError, "repeat_interval"),
        ({"repeat_interval": "1h"}, TypeError, "repeat_interval"),
        ({"timeout": timedelta(0)}, ValueError, "timeout"),
        ({"secret": 1234}, TypeError, "secret must be a str or bytes"),
        ({"secret": ""}, ValueError, "secret must not be empty"),
        ({"clock": 5}, TypeError, "clock must have now"),
    ],
)
def test_more_configuration_is_validated(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        WebhookNotifier("http://127.0.0.1:9/hook", **kwargs)


def test_seconds_accept_timedelta(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    receiver.answers = [500]
    clock = FakeClock()
    notifier = make_notifier(
        receiver.url,
        timeout=timedelta(seconds=2),
        retry_backoff=timedelta(milliseconds=250),
        clock=clock,
    )
    notifier.start()
    notifier(failed())
    wait_until(lambda: notifier.delivered == 1)
    assert clock.slept == [0.25]
    notifier.close(timeout=timedelta(seconds=2))


def test_a_disabled_notifier_posts_nothing(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    notifier = make_notifier(receiver.url, enabled=False)
    notifier.start()
    notifier(failed())
    notifier.close()
    assert (receiver.count(), notifier.pending, notifier.dropped) == (0, 0, 0)


def test_repr_names_the_host_only_and_stop_is_close(
    receiver: Receiver, make_notifier: MakeNotifier
) -> None:
    notifier = make_notifier(receiver.url, secret="x")
    text = repr(notifier)
    assert "secret-token" not in text and "/hooks" not in text
    assert text.startswith(f"<WebhookNotifier http://127.0.0.1:{urlsplit(receiver.url).port} ")
    assert " stopped signed events=recovery_failed,breaker_opened " in text
    notifier.start()
    assert " started " in repr(notifier)
    notifier(failed())
    wait_until(lambda: notifier.delivered == 1)
    notifier.stop()
    assert "delivered=1" in repr(notifier) and " stopped " in repr(notifier)
    assert [t for t in threading.enumerate() if t.name == "dwcp-webhook"] == []


def test_the_documented_verification_accepts_real_requests(
    receiver: Receiver, make_notifier: MakeNotifier
) -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "webhooks.md").read_text()
    code = docs.split("## Signatures", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/webhooks.md", "exec"), namespace)  # noqa: S102 - our own docs
    verify = namespace["verify"]

    notifier = make_notifier(receiver.url, secret=b"shared-secret")
    notifier.start()
    notifier(failed())
    wait_until(lambda: notifier.delivered == 1)
    [headers], [body] = receiver.headers(), receiver.bodies
    as_sent = {
        "X-DWCP-Timestamp": headers["x-dwcp-timestamp"],
        "X-DWCP-Signature-256": headers["x-dwcp-signature-256"],
    }
    assert verify(b"shared-secret", as_sent, body) is True
    assert verify(b"another-secret", as_sent, body) is False
    assert verify(b"shared-secret", as_sent, body.replace(b"transport", b"transpork")) is False
    stale = {**as_sent, "X-DWCP-Timestamp": str(int(headers["x-dwcp-timestamp"]) - 3600)}
    assert verify(b"shared-secret", stale, body) is False
