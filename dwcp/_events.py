"""Typed, immutable events and their delivery to listeners on a thread of their own."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loguru import logger

from dwcp._breaker import OPEN

__all__ = [
    "BreakerStateChanged",
    "ComponentEscalated",
    "ComponentSuspected",
    "ComponentUnhealthy",
    "Event",
    "Listener",
    "NodeBack",
    "NodeLost",
    "RecoveryAttempt",
    "RecoveryFailed",
    "RecoveryStarted",
    "RecoverySucceeded",
    "SendRejected",
]


@dataclass(frozen=True)
class _Origin:
    """Who published an event, keyword-only on every event class."""

    #: The publishing manager's name (its ``breaker_name``), so several managers in one
    #: process can be told apart; "" when not set.
    manager: str = field(default="", kw_only=True)
    #: The peer the manager's transport talks to (such as ``"10.0.0.7:7400"``), "" if unknown.
    peer: str = field(default="", kw_only=True)


@dataclass(frozen=True)
class ComponentUnhealthy(_Origin):
    """A health check failed, raised, or timed out."""

    component: str
    error: str
    #: When it happened (``time.time()``); not part of equality.
    timestamp: float = field(default_factory=time.time, compare=False)


@dataclass(frozen=True)
class ComponentSuspected(_Origin):
    """The component's suspicion (phi) rose to its policy's ``suspicion_threshold``.

    Raised once per crossing, before any check need have failed: its checks (or sends) are
    late or slow compared with their history.
    """

    component: str
    suspicion: float
    threshold: float
    #: When it happened (``time.time()``); not part of equality.
    timestamp: float = field(default_factory=time.time, compare=False)


@dataclass(frozen=True)
class ComponentEscalated(_Origin):
    """The component exceeded its restart intensity; no cycle runs until a reset or cool-down."""

    component: str
    max_cycles: int
    window: float
    #: When it happened (``time.time()``); not part of equality.
    timestamp: float = field(default_factory=time.time, compare=False)


@dataclass(frozen=True)
class RecoveryStarted(_Origin):
    """A recovery cycle began for a component."""

    component: str
    error: str | None
    #: When it happened (``time.time()``); not part of equality.
    timestamp: float = field(default_factory=time.time, compare=False)


@dataclass(frozen=True)
class RecoveryAttempt(_Origin):
    """An attempt is about to wait ``backoff`` seconds and then act."""

    component: str
    attempt: int
    backoff: float
    #: When it happened (``time.time()``); not part of equality.
    timestamp: float = field(default_factory=time.time, compare=False)


@dataclass(frozen=True)
class RecoverySucceeded(_Origin):
    """The component passed its health check after an attempt."""

    component: str
    attempts: int
    downtime: float
    #: When it happened (``time.time()``); not part of equality.
    timestamp: float = field(default_factory=time.time, compare=False)


@dataclass(frozen=True)
class RecoveryFailed(_Origin):
    """Every attempt failed; the component is marked failed."""

    component: str
    attempts: int
    error: str | None
    #: When it happened (``time.time()``); not part of equality.
    timestamp: float = field(default_factory=time.time, compare=False)


@dataclass(frozen=True)
class BreakerStateChanged(_Origin):
    """The circuit breaker moved from ``from_state`` to ``to_state``.

    The names match the metrics' ``from_state``/``to_state`` labels and the webhook details;
    ``old`` and ``new`` remain as read-only aliases.
    """

    from_state: str
    to_state: str
    #: When it happened (``time.time()``); not part of equality.
    timestamp: float = field(default_factory=time.time, compare=False)

    @property
    def old(self) -> str:
        """Alias of ``from_state``, its earlier name."""
        return self.from_state

    @property
    def new(self) -> str:
        """Alias of ``to_state``, its earlier name."""
        return self.to_state


@dataclass(frozen=True)
class SendRejected(_Origin):
    """A send was refused by the open (or busy half-open) breaker."""

    state: str
    #: When it happened (``time.time()``); not part of equality.
    timestamp: float = field(default_factory=time.time, compare=False)


@dataclass(frozen=True)
class NodeLost(_Origin):
    """Another cluster node stopped being heard from (``reason`` "silent") or left cleanly
    ("left"); ``silent_for`` is the age of its last heartbeat, ``bound`` its lost bound."""

    node: str
    silent_for: float
    bound: float
    reason: str = "silent"
    #: When it happened (``time.time()``); not part of equality.
    timestamp: float = field(default_factory=time.time, compare=False)


@dataclass(frozen=True)
class NodeBack(_Origin):
    """A cluster node reported lost (or gone) is heard from again, ``down_for`` seconds later."""

    node: str
    down_for: float
    #: When it happened (``time.time()``); not part of equality.
    timestamp: float = field(default_factory=time.time, compare=False)


Event = (
    ComponentUnhealthy
    | ComponentSuspected
    | ComponentEscalated
    | RecoveryStarted
    | RecoveryAttempt
    | RecoverySucceeded
    | RecoveryFailed
    | BreakerStateChanged
    | SendRejected
    | NodeLost
    | NodeBack
)
Listener = Callable[[Event], None]

_STOP = object()


class _Dispatcher:
    """Delivers events to listeners from one named thread, so no listener runs under a lock,
    on the send path, or in the monitor; a full queue drops the event and counts it."""

    def __init__(self, maxsize: int = 10_000, *, manager: str = "", peer: str = "") -> None:
        #: Stamped on every delivered event that does not name its manager (or peer) itself;
        #: done on the delivery thread, so publishers pay nothing for it.
        self.manager = manager
        self.peer = peer
        self._listeners: tuple[Listener, ...] = ()
        self._lock = threading.Lock()
        self._maxsize = maxsize
        self._queue: queue.Queue[object] = queue.Queue(maxsize)
        self._abandon = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.listener_errors = 0

    @property
    def active(self) -> bool:
        """Whether anyone listens; publishers skip building events when nobody does."""
        return bool(self._listeners)

    def add(self, listener: Listener) -> None:
        if not callable(listener):
            raise TypeError(f"listener must be callable, got {type(listener).__name__}")
        with self._lock:
            self._listeners = (*self._listeners, listener)

    def open(self) -> None:
        """Start the delivery thread; events published before this are not kept."""
        with self._lock:
            if self._thread is None:
                # A fresh queue per run: a thread abandoned by close() (a hung listener)
                # keeps the old one and can never take this run's events.
                self._queue = queue.Queue(self._maxsize)
                self._abandon = threading.Event()
                self._thread = threading.Thread(
                    target=self._run,
                    args=(self._queue, self._abandon),
                    name="dwcp-events",
                    daemon=True,
                )
                self._thread.start()

    def remove(self, listener: Listener) -> None:
        with self._lock:
            listeners = list(self._listeners)
            try:
                listeners.remove(listener)
            except ValueError:
                raise ValueError("listener is not registered") from None
            self._listeners = tuple(listeners)

    def breaker_changed(self, old: str, new: str) -> None:
        """Log a breaker transition and publish it (``Breaker``'s ``on_transition`` hook)."""
        bound = logger.bind(state=new, previous=old)
        (bound.warning if new == OPEN else bound.info)(
            "Circuit breaker state changed: {} -> {} ({})", old, new, self.manager
        )
        self.publish(BreakerStateChanged(old, new))

    def publish(self, event: Event) -> None:
        if not self._listeners or self._thread is None:
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued, then stop and join the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
            events, abandon = self._queue, self._abandon
        if thread is None:
            return
        deadline = time.monotonic() + timeout
        if thread is threading.current_thread():
            # close() from a listener: this thread is the one that would drain the queue,
            # so never wait for room; it ends once that listener returns.
            try:
                events.put_nowait(_STOP)
            except queue.Full:
                abandon.set()
            return
        try:
            # Blocks only while the queue is full, that is while a listener is stuck.
            events.put(_STOP, timeout=timeout)
        except queue.Full:
            # No room for the sentinel: the thread ends after the event it is stuck in.
            abandon.set()
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            logger.warning("Event listener thread did not stop in time; a listener is hung")

    def _stamped(self, event: Event) -> Event:
        manager, peer = self.manager, self.peer
        if (event.manager or not manager) and (event.peer or not peer):
            return event
        return dataclasses.replace(event, manager=event.manager or manager, peer=event.peer or peer)

    def _run(self, events: queue.Queue[object], abandon: threading.Event) -> None:
        while not abandon.is_set():
            event = events.get()
            if event is _STOP:
                return
            event = self._stamped(event)  # type: ignore[arg-type]
            for listener in self._listeners:
                try:
                    listener(event)
                except Exception as exc:  # noqa: BLE001 - one bad listener must not starve the rest
                    self.listener_errors += 1
                    logger.opt(exception=exc).bind(listener=repr(listener)).error(
                        "Event listener raised {} on {}: {}",
                        type(exc).__name__,
                        type(event).__name__,
                        exc,
                    )


def peer_of(transport: object) -> str:
    """``host:port`` of the transport's peer, for events and alerts, when it tells."""
    address = getattr(transport, "address", None)
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return ""
