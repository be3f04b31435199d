"""``python -m dwcp demo``: watch a Manager ride out a receiver outage, live, on 127.0.0.1.

One process runs a ``MultiStreamReceiver`` and a ``Manager`` over a ``MultiStreamTCPTransport``
(with its health server), streams numbered messages, stops the receiver for ``--outage``
seconds and brings it back on the same port.  Every printed line is timestamped from the
start of the run and comes from the manager's events (breaker transitions, the monitor's
verdicts, recovery attempts and their backoff), from the demo itself (what it does to the
receiver), or from a periodic status line.  A summary ends the run.

``--time-scale`` multiplies the library's default timings (health interval 10 s, check
timeout 5 s, recovery backoff 1-2-4 s, breaker reset 30 s, send timeout 10 s): at the
default 0.1 the backoff is 0.1-0.2-0.4 s and a run takes about ``--duration`` seconds.

Exit codes: 0 when the breaker ended closed, messages flowed again after the outage, and
every message was delivered intact once or reported failed or rejected (none lost); 1
otherwise; 2 for invalid flags; 130 when interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import re
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

from dwcp._errors import CircuitOpenError, DWCPError
from dwcp._events import (
    BreakerStateChanged,
    ComponentEscalated,
    ComponentUnhealthy,
    Event,
    RecoveryAttempt,
    RecoveryFailed,
    RecoveryStarted,
    RecoverySucceeded,
    SendRejected,
)
from dwcp._manager import Manager
from dwcp.transport import MultiStreamReceiver, MultiStreamTCPTransport, wire

__all__ = ["DemoConfig", "DemoResult", "configure", "run", "run_demo"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# The library's defaults, which --time-scale multiplies.
_HEALTH_INTERVAL = 10.0
_CHECK_TIMEOUT = 5.0
_INITIAL_BACKOFF = 1.0
_RESET_TIMEOUT = 30.0
_SEND_TIMEOUT = 10.0
_CONNECT_TIMEOUT = 5.0
_MAX_RETRIES = 3
_MAX_FAILURES = 5
# A send or connect timeout shorter than this fails healthy loopback traffic on a busy machine;
# these two guard against a slow peer, not pace the story, so they are not scaled below it.
_MIN_IO_TIMEOUT = 1.0
# After the last send, how long messages already handed over may take to reach the receiver
# (unacknowledged mode only; an acknowledged send returns after delivery).
_DRAIN_TIMEOUT = 2.0
_ID = struct.Struct("!Q")
_MAX_RATE = 10_000.0
_ERROR_PREFIX = re.compile(r"^\w+: \[[A-Z_]+\] ")


@dataclass(frozen=True)
class DemoConfig:
    """How a demo run streams and when it breaks the receiver; times are seconds."""

    messages_per_second: float = 20.0
    message_size: int = 1024
    warmup: float = 2.0
    outage: float = 2.0
    duration: float = 10.0
    time_scale: float = 0.1
    streams: int = 4
    acknowledged: bool = True
    status_interval: float = 1.0

    def problem(self) -> str | None:
        """Why these flags cannot make a run (checks across flags), or None."""
        if self.duration <= self.warmup + self.outage:
            return (
                f"--duration ({self.duration:g}) must exceed --warmup + --outage "
                f"({self.warmup:g} + {self.outage:g}), or nothing is left to watch the recovery"
            )
        return None

    @property
    def health_interval(self) -> float:
        return _HEALTH_INTERVAL * self.time_scale

    @property
    def check_timeout(self) -> float:
        return _CHECK_TIMEOUT * self.time_scale

    @property
    def initial_backoff(self) -> float:
        return _INITIAL_BACKOFF * self.time_scale

    @property
    def reset_timeout(self) -> float:
        return _RESET_TIMEOUT * self.time_scale

    @property
    def send_timeout(self) -> float:
        return max(_SEND_TIMEOUT * self.time_scale, _MIN_IO_TIMEOUT)

    @property
    def connect_timeout(self) -> float:
        return max(_CONNECT_TIMEOUT * self.time_scale, _MIN_IO_TIMEOUT)


@dataclass(frozen=True)
class DemoResult:
    """What a run did.  ``sent == delivered + lost + failed + rejected``."""

    sent: int
    delivered: int
    failed: int
    rejected: int
    #: Sends that returned, yet the receiver never got the message (unacknowledged mode).
    lost: int
    duplicates: int
    corrupt: int
    #: Sends that raised although the message arrived: its acknowledgement died with the link.
    arrived_despite_failure: int
    breaker_state: str
    #: Whether a send succeeded after the receiver came back.
    recovered: bool
    #: From the receiver's return to the breaker closing (or, if it never opened, to the
    #: first message delivered).
    recovery_time: float | None
    #: From the receiver's stop to the breaker opening, and to the monitor's verdict.
    time_to_open: float | None
    time_to_detect: float | None
    recovery_attempts: int
    interrupted: bool
    #: What stopped the sender or status thread early (a bug), if anything.
    crash: str | None = None

    @property
    def ok(self) -> bool:
        """The exit-code verdict: recovered, breaker closed, nothing lost, duplicated or torn."""
        return (
            not self.interrupted
            and self.crash is None
            and self.recovered
            and self.breaker_state == "closed"
            and self.lost == 0
            and self.duplicates == 0
            and self.corrupt == 0
        )


# -- command line -----------------------------------------------------------------------------


def _number(
    kind: Callable[[str], float], low: float, high: float, *, low_open: bool
) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        too_low = value <= low if low_open else value < low
        if math.isnan(value) or too_low or value > high:
            bound = f"> {low:g}" if low_open else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound} and <= {high:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the demo's flags to its subparser."""
    d = DemoConfig()
    seconds = _number(float, 0.0, 3600.0, low_open=True)
    parser.add_argument(
        "--messages-per-second",
        type=_number(float, 0.0, _MAX_RATE, low_open=True),
        default=d.messages_per_second,
        metavar="RATE",
        help=f"how many messages to send each second (default {d.messages_per_second:g})",
    )
    parser.add_argument(
        "--message-size",
        type=_number(int, _ID.size, wire.DEFAULT_MAX_MESSAGE_SIZE, low_open=False),
        default=d.message_size,
        metavar="BYTES",
        help=f"bytes per message, {_ID.size} to {wire.DEFAULT_MAX_MESSAGE_SIZE} "
        f"(default {d.message_size})",
    )
    parser.add_argument(
        "--warmup",
        type=seconds,
        default=d.warmup,
        metavar="SECONDS",
        help=f"how long to stream before the receiver is stopped (default {d.warmup:g})",
    )
    parser.add_argument(
        "--outage",
        type=seconds,
        default=d.outage,
        metavar="SECONDS",
        help=f"how long the receiver stays down (default {d.outage:g})",
    )
    parser.add_argument(
        "--duration",
        type=seconds,
        default=d.duration,
        metavar="SECONDS",
        help=f"how long to stream in all; must exceed warmup + outage (default {d.duration:g})",
    )
    parser.add_argument(
        "--time-scale",
        type=_number(float, 0.001, 10.0, low_open=False),
        default=d.time_scale,
        metavar="FACTOR",
        help="multiplies the manager's default timings (health interval 10 s, backoff "
        f"1-2-4 s, breaker reset 30 s); default {d.time_scale:g}",
    )
    parser.add_argument(
        "--streams",
        type=_number(int, 1, wire.MAX_STREAMS, low_open=False),
        default=d.streams,
        help=f"TCP connections per session, 1 to {wire.MAX_STREAMS} (default {d.streams})",
    )
    parser.add_argument(
        "--unacknowledged",
        action="store_true",
        help="send without waiting for the receiver's acknowledgement: faster, but a send "
        "that returned may still be lost in the outage (and the run then fails)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo from parsed flags; return the exit code."""
    config = DemoConfig(
        messages_per_second=args.messages_per_second,
        message_size=int(args.message_size),
        warmup=args.warmup,
        outage=args.outage,
        duration=args.duration,
        time_scale=args.time_scale,
        streams=int(args.streams),
        acknowledged=not args.unacknowledged,
    )
    problem = config.problem()
    if problem is not None:
        print(f"dwcp demo: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = run_demo(config)
    except (DWCPError, OSError) as exc:
        print(f"dwcp demo: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if result.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if result.ok else EXIT_FAILED


def run_demo(config: DemoConfig, out: TextIO | None = None) -> DemoResult:
    """Run one demo, printing its progress and summary to ``out`` (default stdout).

    Ctrl-C ends it early, cleanly, with a summary (``interrupted`` is then true).
    """
    problem = config.problem()
    if problem is not None:
        raise ValueError(problem)
    demo = _Demo(config, out if out is not None else sys.stdout)
    result = demo.run()
    demo.print_summary(result)
    return result


# -- the run ----------------------------------------------------------------------------------


class _Console:
    """Timestamped lines from several threads, one whole line at a time."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()
        self.t0 = time.time()

    def line(self, source: str, text: str, at: float | None = None) -> None:
        offset = (time.time() if at is None else at) - self.t0
        with self._lock:
            print(f"[{offset:6.2f}s] {source:<9} {text}", file=self._out, flush=True)

    def plain(self, text: str = "") -> None:
        with self._lock:
            print(text, file=self._out, flush=True)


class _Inbox:
    """The receiver's record: which message ids arrived intact, how often, and what was torn."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._filler = _filler(size)
        self.counts: Counter[int] = Counter()
        self.corrupt = 0
        self._cond = threading.Condition()

    def __call__(self, data: bytes) -> None:
        intact = len(data) == self._size and data.endswith(self._filler)
        with self._cond:
            if intact:
                self.counts[_ID.unpack_from(data)[0]] += 1
            else:
                self.corrupt += 1
            self._cond.notify_all()

    def wait_for(self, idents: Iterable[int], timeout: float) -> bool:
        """Wait until every id in ``idents`` arrived; False if ``timeout`` passed first."""
        wanted = set(idents)
        with self._cond:
            return self._cond.wait_for(lambda: wanted.issubset(self.counts), timeout)


class _Tally:
    """The sender's record: how each send ended."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = 0
        self.ok: list[int] = []
        self.failed: list[int] = []
        self.rejected = 0

    def snapshot(self) -> tuple[int, int, int, int]:
        with self.lock:
            return self.sent, len(self.ok), len(self.failed), self.rejected


def _filler(size: int) -> bytes:
    body = size - _ID.size
    return (bytes(range(256)) * (body // 256 + 1))[:body]


def _short(error: str | None, limit: int = 100) -> str:
    text = _ERROR_PREFIX.sub("", error or "unknown error")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Demo:
    """One run: owns the receiver, the manager, and the sender and status threads."""

    def __init__(self, config: DemoConfig, out: TextIO) -> None:
        self.config = config
        self.console = _Console(out)
        # Set once at the end: stops the sender and status threads.  Its wait() also paces
        # the run, so Ctrl-C interrupts any pause at once.
        self.stop = threading.Event()
        self.inbox = _Inbox(config.message_size)
        self.tally = _Tally()
        self.filler = _filler(config.message_size)
        self.killed_at: float | None = None
        self.back_at: float | None = None
        self.first_ok_after_back: float | None = None
        self.opened_at: float | None = None
        self.closed_after_back: float | None = None
        self.detected_at: float | None = None
        self.announce_rejection = False
        self.receiver_up = False
        self.crash: str | None = None

    # -- the timeline ------------------------------------------------------------------------

    def run(self) -> DemoResult:
        config, say = self.config, self.console.line
        receiver = MultiStreamReceiver(("127.0.0.1", 0), on_message=self.inbox)
        manager: Manager | None = None
        threads: list[threading.Thread] = []
        interrupted = False
        breaker_state = "not started"
        attempts = 0
        try:
            receiver.start()
            self.receiver_up = True
            address = receiver.address
            say("demo", f"receiver listening on {address[0]}:{address[1]}")
            transport = MultiStreamTCPTransport(
                address,
                streams=config.streams,
                send_timeout=config.send_timeout,
                connect_timeout=config.connect_timeout,
                acknowledged=config.acknowledged,
            )
            manager = Manager(
                transport,
                health_interval=config.health_interval,
                health_check_timeout=config.check_timeout,
                max_retries=_MAX_RETRIES,
                initial_backoff=config.initial_backoff,
                max_failures=_MAX_FAILURES,
                reset_timeout=config.reset_timeout,
                health_port=0,
            )
            manager.add_listener(self.on_event)
            manager.start()
            say("demo", f"health endpoint: {manager.health_url}/healthz")
            backoffs = "/".join(f"{config.initial_backoff * 2**i:.2f}" for i in range(_MAX_RETRIES))
            say(
                "demo",
                f"manager started: health check every {config.health_interval:.2f}s, "
                f"recovery backoff {backoffs}s, breaker opens after {_MAX_FAILURES} failed "
                f"sends and resets after {config.reset_timeout:.2f}s",
            )
            threads = [
                threading.Thread(
                    target=self.guarded, args=(self.send_loop, manager), name="dwcp-demo-sender"
                ),
                threading.Thread(
                    target=self.guarded, args=(self.status_loop, manager), name="dwcp-demo-status"
                ),
            ]
            mode = "acknowledged" if config.acknowledged else "unacknowledged"
            say(
                "demo",
                f"streaming {config.messages_per_second:g} msg/s of {config.message_size} bytes "
                f"over {config.streams} TCP streams ({mode})",
            )
            start = time.monotonic()
            for thread in threads:
                thread.start()
            self.pause_until(start + config.warmup)
            self.after_next_health_pass(manager, start + config.duration - config.outage)
            # Each moment is taken before the act, so whatever it causes comes after it.
            self.killed_at = time.time()
            say("demo", f"stopping the receiver for {config.outage:g}s", self.killed_at)
            receiver.stop()
            self.receiver_up = False
            self.pause_until(time.monotonic() + config.outage)
            self.back_at = time.time()
            receiver.start()
            self.receiver_up = True
            say("demo", f"receiver back on {address[0]}:{address[1]}", self.back_at)
            self.pause_until(start + config.duration)
            say("demo", "streaming done; shutting down")
        except KeyboardInterrupt:
            interrupted = True
            self.console.line("demo", "interrupted; shutting down")
        finally:
            self.stop.set()
            for thread in threads:
                if thread.is_alive():
                    thread.join()
            if manager is not None:
                breaker_state = manager.circuit_breaker_state
                attempts = manager.metrics().recovery_attempts
                if not interrupted:
                    self.inbox.wait_for(self.tally.ok, _DRAIN_TIMEOUT)
                manager.stop()  # also delivers the events still queued for on_event
            receiver.stop()
        return self.result(breaker_state, attempts, interrupted)

    def pause_until(self, deadline: float) -> None:
        self.stop.wait(max(deadline - time.monotonic(), 0.0))

    def after_next_health_pass(self, manager: Manager, latest: float) -> None:
        """Return right after the monitor's next check of the transport ends, or at ``latest``.

        Stopping the receiver then gives the sends a whole health interval to trip the
        breaker before the monitor looks, so the watcher sees the two react in turn.
        """

        def checks() -> int:
            return manager.metrics().components["transport"].checks

        before = checks()
        config = self.config
        deadline = min(time.monotonic() + config.health_interval + config.check_timeout, latest)
        while checks() == before and time.monotonic() < deadline:
            self.stop.wait(0.005)

    # -- the threads -------------------------------------------------------------------------

    def guarded(self, loop: Callable[[Manager], None], manager: Manager) -> None:
        """Run a thread's loop; an unexpected error is printed and fails the run."""
        try:
            loop(manager)
        except Exception as exc:  # noqa: BLE001 - a thread must not die silently
            self.crash = f"{threading.current_thread().name}: {exc!r}"
            self.console.line("demo", f"stopped by an unexpected error in {self.crash}")

    def send_loop(self, manager: Manager) -> None:
        """Send numbered messages at the configured rate until ``stop`` is set."""
        period = 1.0 / self.config.messages_per_second
        tally = self.tally
        next_at = time.monotonic()
        ident = 0
        while not self.stop.is_set():
            data = _ID.pack(ident) + self.filler
            try:
                manager.send_with_circuit_breaker(data)
            except CircuitOpenError:
                with tally.lock:
                    tally.sent += 1
                    tally.rejected += 1
            except DWCPError:
                # TransportError, or NOT_STARTED while recovery has the transport closed.
                with tally.lock:
                    tally.sent += 1
                    tally.failed.append(ident)
            else:
                with tally.lock:
                    tally.sent += 1
                    tally.ok.append(ident)
                if self.back_at is not None and self.first_ok_after_back is None:
                    self.first_ok_after_back = time.time()
            ident += 1
            # Pace by the schedule, but never burst to catch up after a slow send.
            next_at = max(next_at + period, time.monotonic())
            self.stop.wait(max(next_at - time.monotonic(), 0.0))

    def status_loop(self, manager: Manager) -> None:
        """Print the counts, breaker and transport state every ``status_interval``."""
        while not self.stop.wait(self.config.status_interval):
            sent, ok, failed, rejected = self.tally.snapshot()
            health = manager.health()
            transport = health.components["transport"].status
            self.console.line(
                "status",
                f"sent {sent} | delivered {ok} | failed {failed} | rejected {rejected} | "
                f"breaker {health.breaker_state} | transport {transport} | "
                f"receiver {'up' if self.receiver_up else 'DOWN'}",
            )

    # -- events ------------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        """Print one manager event (on the manager's event thread)."""
        say, at = self.console.line, event.timestamp
        scale = self.config.time_scale
        if isinstance(event, BreakerStateChanged):
            if event.new == "open":
                self.opened_at = at
                self.announce_rejection = True
                say(
                    "breaker",
                    f"{event.old} -> OPEN after {_MAX_FAILURES} failed sends in a row: "
                    "sends are now rejected at once",
                    at,
                )
            elif event.new == "half-open":
                say("breaker", f"{event.old} -> HALF-OPEN: the next send is a trial", at)
            else:
                if self.back_at is not None and self.closed_after_back is None:
                    self.closed_after_back = at
                say("breaker", f"{event.old} -> CLOSED: the trial send got through", at)
        elif isinstance(event, SendRejected):
            if self.announce_rejection:
                self.announce_rejection = False
                say("breaker", "rejected a send without touching the network", at)
        elif isinstance(event, ComponentUnhealthy):
            if self.killed_at is not None and self.detected_at is None:
                self.detected_at = at
            say("monitor", f"{event.component} unhealthy: {_short(event.error)}", at)
        elif isinstance(event, RecoveryStarted):
            say("recovery", f"{event.component}: recovery cycle started", at)
        elif isinstance(event, RecoveryAttempt):
            nominal = event.backoff / scale
            say(
                "recovery",
                f"{event.component}: attempt {event.attempt}/{_MAX_RETRIES} in "
                f"{event.backoff:.2f}s (backoff {nominal:g}s x time scale {scale:g})",
                at,
            )
        elif isinstance(event, RecoveryFailed):
            say(
                "recovery",
                f"{event.component}: all {event.attempts} attempts failed "
                f"({_short(event.error, 70)}); the monitor retries on its next pass",
                at,
            )
        elif isinstance(event, RecoverySucceeded):
            say(
                "recovery",
                f"{event.component}: reconnected on attempt {event.attempts}, "
                f"down {event.downtime:.2f}s",
                at,
            )
        elif isinstance(event, ComponentEscalated):
            say("recovery", f"{event.component}: restart intensity exceeded; escalated", at)

    # -- the verdict -------------------------------------------------------------------------

    def result(self, breaker_state: str, attempts: int, interrupted: bool) -> DemoResult:
        counts = self.inbox.counts
        ok = self.tally.ok
        delivered = sum(1 for ident in ok if counts[ident])
        end = self.closed_after_back or self.first_ok_after_back
        return DemoResult(
            sent=self.tally.sent,
            delivered=delivered,
            failed=len(self.tally.failed),
            rejected=self.tally.rejected,
            lost=len(ok) - delivered,
            duplicates=sum(1 for n in counts.values() if n > 1),
            corrupt=self.inbox.corrupt,
            arrived_despite_failure=sum(1 for ident in self.tally.failed if counts[ident]),
            breaker_state=breaker_state,
            recovered=self.first_ok_after_back is not None,
            recovery_time=None if end is None or self.back_at is None else end - self.back_at,
            time_to_open=_since(self.killed_at, self.opened_at),
            time_to_detect=_since(self.killed_at, self.detected_at),
            recovery_attempts=attempts,
            interrupted=interrupted,
            crash=self.crash,
        )

    def print_summary(self, r: DemoResult) -> None:
        def after_stop(value: float | None) -> str:
            return "never" if value is None else f"{value:.2f}s after the receiver stopped"

        if r.recovery_time is None:
            recovery = "did not recover"
        elif r.time_to_open is not None:
            recovery = f"{r.recovery_time:.2f}s (receiver back -> breaker closed)"
        else:
            recovery = f"{r.recovery_time:.2f}s (receiver back -> first delivery)"
        arrived = (
            f" ({r.arrived_despite_failure} arrived anyway; their acknowledgement was lost)"
            if r.arrived_despite_failure
            else ""
        )
        rows = [
            ("messages sent", f"{r.sent}"),
            ("delivered", f"{r.delivered}"),
            ("failed", f"{r.failed} (the send raised){arrived}"),
            ("rejected", f"{r.rejected} (refused by the open breaker, never sent)"),
            ("lost", f"{r.lost}"),
        ]
        if r.duplicates or r.corrupt:
            rows.append(("duplicated / torn", f"{r.duplicates} / {r.corrupt}"))
        rows += [
            ("breaker opened", after_stop(r.time_to_open)),
            ("monitor noticed", after_stop(r.time_to_detect)),
            ("recovery attempts", f"{r.recovery_attempts}"),
            ("time to recover", recovery),
            ("breaker at the end", r.breaker_state),
        ]
        if r.interrupted:
            verdict = "INTERRUPTED"
        elif r.ok:
            verdict = "OK: recovered, breaker closed, no message lost"
        else:
            reasons = []
            if not r.recovered:
                reasons.append(
                    "no message got through after the receiver returned "
                    "(try a longer --duration or a smaller --time-scale)"
                )
            if r.breaker_state != "closed":
                reasons.append(f"breaker ended {r.breaker_state}")
            if r.lost:
                reasons.append(f"{r.lost} sends returned but never arrived")
            if r.duplicates or r.corrupt:
                reasons.append("duplicated or torn messages")
            if r.crash is not None:
                reasons.append(f"crashed: {r.crash}")
            verdict = "FAILED: " + "; ".join(reasons)
        rows.append(("result", verdict))
        width = max(len(label) for label, _ in rows) + 2
        self.console.plain()
        self.console.plain("summary")
        for label, value in rows:
            self.console.plain(f"  {label + ':':<{width}}{value}")


def _since(start: float | None, end: float | None) -> float | None:
    if start is None or end is None or end < start:
        return None
    return end - start
