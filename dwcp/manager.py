"""The Manager: starts the components, monitors them, recovers them, and guards every send."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any

from loguru import logger

from dwcp._cluster import ClusterView, cluster_member
from dwcp.breaker import NOT_INITIALIZED, OPEN, Breaker
from dwcp.errors import DWCPError, TransportError
from dwcp.events import (
    BreakerStateChanged,
    ComponentEscalated,
    ComponentUnhealthy,
    Listener,
    RecoveryAttempt,
    RecoveryFailed,
    RecoveryStarted,
    RecoverySucceeded,
    SendRejected,
    _Dispatcher,
)
from dwcp.health import (
    ComponentHealth,
    ComponentMetrics,
    ComponentStatus,
    HealthSnapshot,
    MetricsSnapshot,
)
from dwcp.http import HealthServer
from dwcp.recovery import Admission, RecoveryPolicy, RestartSupervisor, run_recovery
from dwcp.shared import FailoverStorage, connect

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Manager"]

_LAYER_SLOTS = ("compression", "prediction", "sync", "consensus")
_TRANSPORT_METHODS = ("start", "close", "send", "health_check")
_LAYER_METHODS = ("start", "stop", "is_healthy")
_BYTES_LIKE = (bytes, bytearray, memoryview)
# What counts against the breaker: the peer or the network failed.  Caller errors
# (TypeError, ValueError), interrupts and our own "not started" never do.
_PEER_FAILURES = (OSError, TransportError)


def _seconds(name: str, value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    seconds = float(value)
    if (
        math.isnan(seconds)
        or math.isinf(seconds)
        or seconds < 0
        or (seconds == 0 and not allow_zero)
    ):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {bound} number of seconds, got {value!r}")
    return seconds


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def _require_methods(slot: str, obj: object, methods: tuple[str, ...]) -> None:
    missing = [m for m in methods if not callable(getattr(obj, m, None))]
    if missing:
        raise TypeError(
            f"{slot} {type(obj).__name__} lacks the method(s) {', '.join(missing)} "
            f"(a {slot} needs {', '.join(methods)})"
        )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Waiter:
    """Wakes whoever waits on a batch of checks when the last one ends, or on shutdown."""

    def __init__(self, outstanding: int) -> None:
        self.event = threading.Event()
        self._outstanding = outstanding
        self._lock = threading.Lock()
        if outstanding == 0:
            self.event.set()

    def one_done(self) -> None:
        with self._lock:
            self._outstanding -= 1
            if self._outstanding <= 0:
                self.event.set()


@dataclass(eq=False)
class _Check:
    waiters: list[_Waiter]
    done: bool = False
    error: str | None = None


@dataclass(eq=False)
class _Cycle:
    policy: RecoveryPolicy
    done: threading.Event = field(default_factory=threading.Event)
    recovered: bool = False


@dataclass(eq=False)
class _Component:
    name: str
    obj: Any
    is_transport: bool
    since: float
    supervisor: RestartSupervisor
    status: ComponentStatus = "healthy"
    last_error: str | None = None
    down_since: float | None = None
    downtime: float = 0.0
    check: _Check | None = None
    cycle: _Cycle | None = None
    checks: int = 0
    check_failures: int = 0
    attempts: int = 0
    succeeded: int = 0
    failed: int = 0


@dataclass
class _Counters:
    health_checks: int = 0
    component_checks: int = 0
    recovery_attempts: int = 0
    recoveries_succeeded: int = 0
    recoveries_failed: int = 0
    sends: int = 0  # summed from the per-thread tallies when a snapshot is taken
    sent_bytes: int = 0
    send_errors: int = 0


class Manager:
    """Supervises a transport and optional layers: health monitoring, recovery, circuit breaker.

    Configure it with constructor arguments, then ``start()`` it (or use it as a context
    manager) and send through ``send_with_circuit_breaker``.  Times are seconds.  Besides the
    four phase slots, ``layers`` registers further named layers, checked and recovered the
    same way after them.
    """

    def __init__(
        self,
        transport: Any = None,
        *,
        compression: Any = None,
        prediction: Any = None,
        sync: Any = None,
        consensus: Any = None,
        layers: Mapping[str, Any] | None = None,
        enabled: bool = True,
        health_interval: float = 10.0,
        health_check_timeout: float = 5.0,
        max_retries: int = 3,
        initial_backoff: float = 1.0,
        max_failures: int = 5,
        reset_timeout: float = 30.0,
        recovery: Mapping[str, RecoveryPolicy] | None = None,
        breaker_storage: object = None,
        breaker_name: str = "dwcp",
        health_port: int | None = None,
        health_host: str = "127.0.0.1",
        fail_fast: bool = False,
        cluster: object = None,
        node_id: str | None = None,
    ) -> None:
        self._interval = _seconds("health_interval", health_interval, allow_zero=False)
        self._check_timeout = _seconds(
            "health_check_timeout", health_check_timeout, allow_zero=False
        )
        self._policy = RecoveryPolicy(
            attempts=_count("max_retries", max_retries),
            initial_backoff=_seconds("initial_backoff", initial_backoff, allow_zero=True),
        )
        self._enabled = bool(enabled)
        if not isinstance(fail_fast, bool):
            raise TypeError(f"fail_fast must be a bool, got {fail_fast!r}")
        self._fail_fast = fail_fast
        self._clock: Callable[[], float] = time.monotonic

        objects: dict[str, tuple[Any, bool]] = {}
        if transport is not None:
            _require_methods("transport", transport, _TRANSPORT_METHODS)
            objects["transport"] = (transport, True)
        slots = {
            "compression": compression,
            "prediction": prediction,
            "sync": sync,
            "consensus": consensus,
        }
        for slot in _LAYER_SLOTS:
            layer = slots[slot]
            if layer is not None:
                _require_methods(slot, layer, _LAYER_METHODS)
                objects[slot] = (layer, False)
        for name, layer in (layers or {}).items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"layers keys must be non-empty strings, got {name!r}")
            if name in objects or name in ("transport", *_LAYER_SLOTS):
                raise ValueError(f"layers name {name!r} clashes with a built-in component slot")
            _require_methods(f"layer {name!r}", layer, _LAYER_METHODS)
            objects[name] = (layer, False)
        policies = self._policies(recovery, objects)
        now = self._clock()
        self._components: dict[str, _Component] = {
            name: _Component(name, obj, is_transport, now, RestartSupervisor(policies[name]))
            for name, (obj, is_transport) in objects.items()
        }
        self._transport = transport

        self._events = _Dispatcher()
        # Validated now (HealthServer checks the port), bound in start().
        self._health_server = (
            HealthServer(self, health_host, health_port) if health_port is not None else None
        )
        max_failures = _count("max_failures", max_failures)
        reset_timeout = _seconds("reset_timeout", reset_timeout, allow_zero=False)
        if not isinstance(breaker_name, str) or not breaker_name:
            raise ValueError(f"breaker_name must be a non-empty string, got {breaker_name!r}")
        self._shared_storage: FailoverStorage | None = None
        if breaker_storage is not None:
            self._shared_storage = FailoverStorage(connect(breaker_storage), breaker_name)
        self._breaker = Breaker(
            max_failures=max_failures,
            reset_timeout=reset_timeout,
            storage=self._shared_storage,
            name=breaker_name,
            on_transition=self._on_breaker_transition,
        )

        # Cluster health (issue #12): the longest gap between two passes is one interval
        # plus one check timeout, so that is the heartbeat interval announced.
        self._cluster = cluster_member(
            cluster,
            node_id,
            interval=self._interval + self._check_timeout,
            on_event=self._events.publish,
        )

        self._lock = threading.RLock()
        self._stats_lock = threading.Lock()
        self._counters = _Counters()
        # Successful sends and their bytes, one [sends, bytes] list per sending thread.
        self._thread_tally = threading.local()
        self._tallies: list[list[int]] = []
        # "idle" -> "starting" -> "started" -> "stopping" -> "idle"; a manager can be restarted.
        self._phase = "idle"
        # Read without the lock on the send path; only ever replaced as a whole.
        self._started = False
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._monitor: threading.Thread | None = None
        self._recoveries: set[threading.Thread] = set()
        self._waiters: set[_Waiter] = set()

    def _policies(
        self, recovery: Mapping[str, RecoveryPolicy] | None, objects: Mapping[str, object]
    ) -> dict[str, RecoveryPolicy]:
        overrides = dict(recovery or {})
        for name, policy in overrides.items():
            if name not in objects:
                known = ", ".join(objects) or "none"
                raise ValueError(f"recovery names unknown component {name!r} (configured: {known})")
            if not isinstance(policy, RecoveryPolicy):
                raise TypeError(
                    f"recovery[{name!r}] must be a RecoveryPolicy, got {type(policy).__name__}"
                )
        return {name: overrides.get(name, self._policy) for name in objects}

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def is_started(self) -> bool:
        """Whether ``start()`` completed and ``stop()`` has not begun."""
        return self._started

    @property
    def health_url(self) -> str | None:
        """Base URL of the built-in health server while it runs (``health_port`` set), else None."""
        server = self._health_server
        if server is None or not self._started:
            return None
        return server.url

    @property
    def monitor_alive(self) -> bool:
        """Whether the health-monitoring thread is running."""
        monitor = self._monitor
        return monitor is not None and monitor.is_alive()

    def start(self) -> None:
        """Start the transport and layers in order, then the monitoring thread.

        A component that fails to start (its peer is down, say) does not make ``start()``
        fail: it starts degraded, in recovery with the usual backoff, and sends fail fast
        meanwhile. With ``fail_fast=True`` the error is raised instead, after stopping what
        had started.
        """
        if not self._enabled:
            return
        with self._lock:
            if self._phase != "idle":
                raise DWCPError(f"manager is already {self._phase}", code="ALREADY_STARTED")
            self._phase = "starting"
            self._stopped.clear()
        started: list[_Component] = []
        # Components that failed to start, and why: they start degraded, in recovery.
        failed: dict[str, DWCPError] = {}
        try:
            if self._health_server is not None:
                try:
                    self._health_server.start()
                except OSError as exc:
                    raise DWCPError(
                        f"health server could not listen: {_describe(exc)}",
                        code="HEALTH_SERVER_FAILED",
                    ) from exc
            for component in self._components.values():
                try:
                    self._start_component(component)
                except DWCPError as exc:
                    # A peer that is down at start is what this library recovers from;
                    # only fail_fast makes it the caller's problem.
                    if self._fail_fast:
                        raise
                    failed[component.name] = exc
                    continue
                started.append(component)
        except BaseException:
            for component in reversed(started):
                self._shutdown_component(component)
            if self._health_server is not None:
                self._health_server.stop()
            with self._lock:
                self._phase = "idle"
                self._stopped.set()
            raise
        to_recover: list[tuple[_Component, _Cycle]] = []
        with self._lock:
            now = self._clock()
            for component in self._components.values():
                component.status, component.last_error, component.since = "healthy", None, now
                component.down_since = None
                if component.name in failed:
                    cycle, _ = self._begin_cycle(component, str(failed[component.name]))
                    if cycle is not None:
                        to_recover.append((component, cycle))
            self._events.open()
            self._monitor = threading.Thread(
                target=self._monitor_loop, args=(self._stop,), name="dwcp-monitor", daemon=True
            )
            self._phase = "started"
            self._started = True
            self._monitor.start()
            stop = self._stop
        if self._cluster is not None:
            self._cluster.start()
            self._cluster.publish(self.health())
        logger.bind(components=list(self._components), degraded=sorted(failed)).info(
            "DWCP manager started"
        )
        for component, cycle in to_recover:
            error = str(failed[component.name])
            logger.bind(component=component.name, error=error).warning(
                "Component failed to start; recovering"
            )
            self._events.publish(ComponentUnhealthy(component.name, error))
            self._spawn_recovery(component, cycle, stop)

    def stop(self) -> None:
        """Stop monitoring and recovery, join their threads, stop layers, close the transport.

        Idempotent; a second concurrent call waits for the first to finish.
        """
        with self._lock:
            phase = self._phase
            stopped = self._stopped
            if phase == "started":
                self._phase = "stopping"
                self._started = False
                self._stop.set()
                for waiter in self._waiters:
                    waiter.event.set()
                threads = [t for t in (self._monitor, *self._recoveries) if t is not None]
                # Cycles run by attempt_component_recovery() live in callers' threads.
                cycles = [c.cycle for c in self._components.values() if c.cycle is not None]
        if phase == "stopping":
            stopped.wait()
        if phase != "started":
            return
        # Joined without the lock: these threads take it on their way out. One deadline for
        # all of them, so many hung threads cost one timeout, not one each.
        deadline = time.monotonic() + self._check_timeout + 1.0
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                logger.bind(thread=thread.name).warning(
                    "Thread did not stop in time; a component call is hung and was abandoned"
                )
        # No cycle may restart a component after we close it.
        for cycle in cycles:
            if not cycle.done.wait(max(deadline - time.monotonic(), 0.0)):
                logger.warning("Recovery cycle did not end in time; a component call is hung")
        for component in reversed(list(self._components.values())):
            self._shutdown_component(component)
        if self._health_server is not None:
            self._health_server.stop()
        if self._cluster is not None:
            self._cluster.close()
        self._events.close()
        with self._lock:
            self._monitor = None
            self._stop = threading.Event()
            self._phase = "idle"
            self._stopped.set()
        logger.info("DWCP manager stopped")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the send path --------------------------------------------------------------------------

    def send_with_circuit_breaker(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` through the transport, guarded by the circuit breaker.

        Raises ``CircuitOpenError`` when the breaker rejects the call, ``TransportError`` when
        the transport fails (counted by the breaker), ``DWCPError`` (``NOT_STARTED``,
        ``NO_TRANSPORT``) and ``TypeError`` for calls that never reach the transport.
        """
        if not self._started:
            raise DWCPError("manager is not started", code="NOT_STARTED")
        transport = self._transport
        if transport is None:
            raise DWCPError("manager has no transport to send through", code="NO_TRANSPORT")
        if not isinstance(data, _BYTES_LIKE):
            raise TypeError(
                f"data must be bytes, bytearray or memoryview, got {type(data).__name__} "
                "(wrap other buffers in memoryview())"
            )
        breaker = self._breaker
        try:
            ticket = breaker.admit()
        except DWCPError:
            if self._events.active:
                self._events.publish(SendRejected(breaker.state))
            raise
        try:
            transport.send(data)
        except _PEER_FAILURES as exc:
            # A transport that recovery closed and could not restart fails too: while the
            # manager runs, that is the peer being down, so it counts like any other failure.
            breaker.record_failure(ticket)
            with self._stats_lock:
                self._counters.send_errors += 1
            if isinstance(exc, TransportError):
                raise
            raise TransportError(f"send failed: {_describe(exc)}") from exc
        except BaseException:
            breaker.release(ticket)
            raise
        breaker.record_success(ticket)
        # Per-thread tallies: each has a single writer, so no lock on the send path.
        try:
            tally = self._thread_tally.value
        except AttributeError:
            tally = self._new_tally()
        tally[0] += 1
        tally[1] += data.nbytes if type(data) is memoryview else len(data)

    def _new_tally(self) -> list[int]:
        tally = [0, 0]
        with self._stats_lock:
            self._tallies.append(tally)
        self._thread_tally.value = tally
        return tally

    @property
    def circuit_breaker_state(self) -> str:
        """``closed``, ``open``, ``half-open``, or ``not_initialized`` without a transport."""
        if self._transport is None:
            return NOT_INITIALIZED
        return self._breaker.state

    # -- health ---------------------------------------------------------------------------------

    def check_component_health(self) -> Mapping[str, ComponentHealth]:
        """Run one check pass now, hand unhealthy components to recovery, return their health."""
        self._run_pass(self._stop)
        return self.health().components

    def attempt_component_recovery(self, name: str, error: BaseException | None = None) -> bool:
        """Run one recovery cycle for ``name`` here (or wait for the one in flight).

        Returns whether the component ended healthy.
        """
        with self._lock:
            component = self._component(name)
            if not self._started:
                raise DWCPError("manager is not started", code="NOT_STARTED")
            cycle = component.cycle
            owner = cycle is None
            admission: Admission = "run"
            if cycle is None:
                cycle, admission = self._begin_cycle(component, _describe(error) if error else None)
            stop = self._stop
        if cycle is None:
            self._announce_escalation(component, admission)
            return False
        if owner:
            self._recover(component, cycle, stop)
        else:
            cycle.done.wait()
        return cycle.recovered

    def reset_component(self, name: str) -> None:
        """Clear a component's escalation and restart history so recovery may run again."""
        with self._lock:
            component = self._component(name)
            component.supervisor.reset()
            if component.status == "failed":
                self._set_status(component, "unhealthy", self._clock())
        logger.bind(component=name).info("Component reset")

    def health(self) -> HealthSnapshot:
        """A snapshot of every component's status and the breaker state."""
        breaker_state = self.circuit_breaker_state  # outside our lock: it may notify listeners
        now = self._clock()
        with self._lock:
            components = {
                c.name: ComponentHealth(c.name, c.status, c.last_error, now - c.since)
                for c in self._components.values()
            }
        return HealthSnapshot(MappingProxyType(components), breaker_state, self._storage_mode())

    def _storage_mode(self) -> str:
        shared = self._shared_storage
        if shared is None:
            return "local"
        return "shared" if shared.shared else "fallback"

    def metrics(self) -> MetricsSnapshot:
        """A snapshot of the counters, downtime per component and current statuses."""
        now = self._clock()
        with self._lock:
            downtime = {
                c.name: c.downtime + (now - c.down_since if c.down_since is not None else 0.0)
                for c in self._components.values()
            }
            statuses = {c.name: c.status for c in self._components.values()}
            per_component = {
                c.name: ComponentMetrics(
                    status=c.status,
                    checks=c.checks,
                    check_failures=c.check_failures,
                    recovery_attempts=c.attempts,
                    recoveries_succeeded=c.succeeded,
                    recoveries_failed=c.failed,
                    downtime_seconds=downtime[c.name],
                )
                for c in self._components.values()
            }
            transitions = dict(self._breaker.transition_counts)
            with self._stats_lock:
                counters = _Counters(**vars(self._counters))
                counters.sends = sum(tally[0] for tally in self._tallies)
                counters.sent_bytes = sum(tally[1] for tally in self._tallies)
        return MetricsSnapshot(
            health_checks=counters.health_checks,
            component_checks=counters.component_checks,
            recovery_attempts=counters.recovery_attempts,
            recoveries_succeeded=counters.recoveries_succeeded,
            recoveries_failed=counters.recoveries_failed,
            breaker_state_changes=sum(transitions.values()),
            breaker_rejections=self._breaker.rejections,
            sends=counters.sends,
            sent_bytes=counters.sent_bytes,
            send_errors=counters.send_errors,
            downtime_seconds=MappingProxyType(downtime),
            component_status=MappingProxyType(statuses),
            breaker_storage=self._storage_mode(),
            breaker_storage_errors=self._shared_storage.errors if self._shared_storage else 0,
            breaker_transitions=MappingProxyType(transitions),
            components=MappingProxyType(per_component),
            events_dropped=self._events.dropped,
        )

    def cluster_health(self) -> ClusterView:
        """Every cluster node's last snapshot, age and state, as last read (no I/O here).

        Raises ``DWCPError`` (``NO_CLUSTER``) when the manager has no ``cluster``.
        """
        if self._cluster is None:
            raise DWCPError("manager has no cluster configured", code="NO_CLUSTER")
        return self._cluster.view()

    # -- events ---------------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event)`` for every event, from the manager's event thread."""
        self._events.add(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``; raises ``ValueError`` if it was not added."""
        self._events.remove(listener)

    # -- internals: monitoring ------------------------------------------------------------------

    def _component(self, name: str) -> _Component:
        try:
            return self._components[name]
        except KeyError:
            known = ", ".join(self._components) or "none"
            raise ValueError(f"unknown component {name!r} (configured: {known})") from None

    def _monitor_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self._interval):
            try:
                self._run_pass(stop)
            except Exception as exc:  # noqa: BLE001
                # The loop must outlive any bug in a pass; log it and go on.
                logger.opt(exception=exc).error("Health monitoring pass failed")

    def _run_pass(self, stop: threading.Event) -> None:
        """Check every component (in parallel, each bounded by the timeout), then recover."""
        with self._lock:
            # A component in a recovery cycle is verified by that cycle, not by the monitor.
            components = [c for c in self._components.values() if c.cycle is None]
            self._counters.health_checks += 1
        results = self._run_checks(components, stop)
        to_recover: list[tuple[_Component, _Cycle]] = []
        escalated: list[_Component] = []
        unhealthy: list[tuple[str, str, ComponentStatus]] = []
        with self._lock:
            now = self._clock()
            recover = self._started and not stop.is_set()
            for component in components:
                error = results[component.name]
                if error is None:
                    if component.cycle is None and component.status != "healthy":
                        self._mark_healthy(component, now)
                    continue
                component.last_error = error
                if component.down_since is None:
                    component.down_since = now
                if component.cycle is not None:
                    continue  # its recovery cycle decides what happens next
                if recover:
                    cycle, admission = self._begin_cycle(component, error)
                    if cycle is not None:
                        to_recover.append((component, cycle))
                    elif admission == "escalate":
                        escalated.append(component)
                elif component.status == "healthy":
                    self._set_status(component, "unhealthy", now)
                unhealthy.append((component.name, error, component.status))
            stop_for_recovery = self._stop
        for name, error, _status in unhealthy:
            text = (
                "Transport layer unhealthy"
                if name == "transport"
                else "Component health check failed"
            )
            bound = logger.bind(component=name, error=error)
            (bound.warning if name == "transport" else bound.error)(text)
            self._events.publish(ComponentUnhealthy(name, error))
        for component in escalated:
            self._announce_escalation(component, "escalate")
        for component, cycle in to_recover:
            self._spawn_recovery(component, cycle, stop_for_recovery)
        if self._cluster is not None:
            self._cluster.publish(self.health())

    def _run_checks(
        self, components: list[_Component], stop: threading.Event
    ) -> dict[str, str | None]:
        """Run each component's check on its own thread; give up on those past the timeout.

        A component whose previous check is still hung is not checked again in parallel.
        """
        if stop.is_set():
            # Shutting down: touch no component (stop() is about to close them).
            return {c.name: "health check interrupted by shutdown" for c in components}
        results: dict[str, str | None] = {}
        jobs: list[tuple[_Component, _Check]] = []
        # The timeout bounds the whole batch, starting threads included.
        deadline = time.monotonic() + self._check_timeout
        shared: list[tuple[_Component, _Check]] = []
        with self._lock:
            waiter = _Waiter(len(components))
            self._waiters.add(waiter)
            if stop.is_set():
                waiter.event.set()
            for component in components:
                if component.check is not None:
                    # A check already running (another pass, or check_component_health())
                    # is shared, not repeated: its result is this pass's too. Only one still
                    # running at this pass's deadline is hung.
                    component.check.waiters.append(waiter)
                    shared.append((component, component.check))
                    continue
                job = _Check([waiter])
                component.check = job
                jobs.append((component, job))
            self._counters.component_checks += len(jobs)
        try:
            for component, job in jobs:
                # Daemon: a check that never returns is abandoned, never joined, and must not
                # keep the interpreter alive.
                threading.Thread(
                    target=self._check_thread,
                    args=(component, job),
                    name=f"dwcp-health-{component.name}",
                    daemon=True,
                ).start()
            waiter.event.wait(max(0.0, deadline - time.monotonic()))
        finally:
            with self._lock:
                self._waiters.discard(waiter)
                for component, job in shared:
                    if waiter in job.waiters:
                        job.waiters.remove(waiter)  # a hung check must not collect them
                    results[component.name] = (
                        job.error
                        if job.done
                        else "previous health check is still running past the timeout"
                    )
                for component, job in jobs:
                    component.checks += 1
                    if job.done:
                        results[component.name] = job.error
                    elif stop.is_set():
                        results[component.name] = "health check interrupted by shutdown"
                    else:
                        results[component.name] = (
                            f"health check timed out after {self._check_timeout:g}s"
                        )
                    if results[component.name] is not None:
                        component.check_failures += 1
        return results

    def _check_thread(self, component: _Component, job: _Check) -> None:
        error: str | None
        try:
            if component.is_transport:
                component.obj.health_check()
                error = None
            else:
                healthy = component.obj.is_healthy()
                error = None if healthy else "is_healthy() returned False"
        except BaseException as exc:  # noqa: BLE001 - any failure of a check means unhealthy
            error = _describe(exc)
        with self._lock:
            job.error, job.done = error, True
            if component.check is job:
                component.check = None
            waiters = list(job.waiters)
        for waiter in waiters:
            waiter.one_done()

    def _await_check_in_flight(self, component: _Component, stop: threading.Event) -> None:
        """Wait (at most the check timeout) for a check started before us to end."""
        with self._lock:
            job = component.check
            if job is None:
                return
            waiter = _Waiter(1)
            job.waiters.append(waiter)
            self._waiters.add(waiter)
            if stop.is_set():
                waiter.event.set()
        waiter.event.wait(self._check_timeout)
        with self._lock:
            self._waiters.discard(waiter)

    # -- internals: recovery --------------------------------------------------------------------

    def _begin_cycle(
        self, component: _Component, error: str | None
    ) -> tuple[_Cycle | None, Admission]:
        """Register a cycle unless restart intensity forbids it (caller holds the lock).

        Registering here, under the lock, is what prevents overlapping cycles.
        """
        now = self._clock()
        if component.down_since is None:
            component.down_since = now
        if error is not None:
            component.last_error = error
        admission = component.supervisor.admit(now)
        if admission != "run":
            self._set_status(component, "failed", now)
            return None, admission
        cycle = _Cycle(component.supervisor.cycle_policy())
        component.cycle = cycle
        self._set_status(component, "recovering", now)
        return cycle, admission

    def _announce_escalation(self, component: _Component, admission: Admission) -> None:
        if admission != "escalate":
            return
        policy = component.supervisor.policy
        logger.bind(
            component=component.name, cycles=policy.max_cycles, window=policy.cycle_window
        ).error("Component restart intensity exceeded; escalating")
        self._events.publish(
            ComponentEscalated(component.name, policy.max_cycles or 0, policy.cycle_window)
        )

    def _spawn_recovery(self, component: _Component, cycle: _Cycle, stop: threading.Event) -> None:
        thread = threading.Thread(
            target=self._recover,
            args=(component, cycle, stop),
            name=f"dwcp-recovery-{component.name}",
            daemon=True,
        )
        with self._lock:
            if stop.is_set():
                self._end_cycle(component, cycle, recovered=False, cancelled=True)
                return
            self._recoveries.add(thread)
        thread.start()

    def _recover(self, component: _Component, cycle: _Cycle, stop: threading.Event) -> None:
        name = component.name
        log = logger.bind(component=name)
        log.bind(error=component.last_error).info("Attempting component recovery")
        self._events.publish(RecoveryStarted(name, component.last_error))

        def sleep(seconds: float) -> bool:
            return not stop.wait(seconds)

        def action() -> None:
            if stop.is_set():
                raise DWCPError("manager is stopping", code="NOT_STARTED")
            with self._lock:
                self._counters.recovery_attempts += 1
                component.attempts += 1
            obj = component.obj
            if component.is_transport:
                try:
                    obj.close()
                except Exception as exc:  # noqa: BLE001
                    # A transport that fails to close may still start; the start decides.
                    log.bind(error=_describe(exc)).debug("Transport close failed during recovery")
                obj.start()
            else:
                obj.stop()
                obj.start()

        def verify() -> None:
            # A monitor check that began before the restart says nothing about it: let it
            # end, then check afresh.
            self._await_check_in_flight(component, stop)
            error = self._run_checks([component], stop)[name]
            if error is not None:
                raise RuntimeError(f"health check after restart failed: {error}")

        def on_attempt(attempt: int, backoff: float) -> None:
            log.bind(attempt=attempt, backoff=backoff).info("Recovery attempt")
            self._events.publish(RecoveryAttempt(name, attempt, backoff))

        def on_failure(attempt: int, exc: BaseException) -> None:
            log.bind(attempt=attempt, error=_describe(exc)).warning("Recovery attempt failed")

        outcome = None
        try:
            outcome = run_recovery(
                action,
                verify,
                cycle.policy,
                sleep=sleep,
                on_attempt=on_attempt,
                on_failure=on_failure,
            )
        finally:
            recovered = outcome is not None and outcome.recovered
            cancelled = outcome is None or outcome.cancelled or stop.is_set()
            with self._lock:
                downtime = self._end_cycle(
                    component,
                    cycle,
                    recovered=recovered,
                    cancelled=cancelled,
                    error=outcome.error if outcome is not None else None,
                )
                self._recoveries.discard(threading.current_thread())
        assert outcome is not None
        if recovered:
            if component.is_transport:
                # The peer is back: let the next send be the trial instead of waiting out
                # the reset timeout.
                self._breaker.half_open()
            log.bind(attempt=outcome.attempts, downtime=downtime).info(
                "Component recovered successfully"
            )
            self._events.publish(RecoverySucceeded(name, outcome.attempts, downtime))
        elif not cancelled:
            error = _describe(outcome.error) if outcome.error else None
            log.bind(attempt=outcome.attempts, error=error).error(
                "Component recovery failed after all attempts"
            )
            self._events.publish(RecoveryFailed(name, outcome.attempts, error))

    def _end_cycle(
        self,
        component: _Component,
        cycle: _Cycle,
        *,
        recovered: bool,
        cancelled: bool,
        error: BaseException | None = None,
    ) -> float:
        # Caller holds the lock.  Returns the downtime this outage lasted (0 if still down).
        now = self._clock()
        downtime = 0.0
        if recovered:
            downtime = self._mark_healthy(component, now)
            component.supervisor.recovered(now)
            self._counters.recoveries_succeeded += 1
            component.succeeded += 1
        elif cancelled:
            self._set_status(component, "unhealthy", now)
        else:
            self._set_status(component, "failed", now)
            self._counters.recoveries_failed += 1
            component.failed += 1
        if error is not None and not recovered:
            component.last_error = _describe(error)
        component.cycle = None
        cycle.recovered = recovered
        cycle.done.set()
        return downtime

    def _mark_healthy(self, component: _Component, now: float) -> float:
        downtime = 0.0
        if component.down_since is not None:
            downtime = now - component.down_since
            component.downtime += downtime
            component.down_since = None
        component.last_error = None
        self._set_status(component, "healthy", now)
        return downtime

    @staticmethod
    def _set_status(component: _Component, status: ComponentStatus, now: float) -> None:
        if component.status != status:
            component.status, component.since = status, now

    # -- internals: components and breaker ------------------------------------------------------

    @staticmethod
    def _start_component(component: _Component) -> None:
        try:
            component.obj.start()
        except DWCPError:
            raise
        except OSError as exc:
            raise TransportError(f"{component.name} failed to start: {_describe(exc)}") from exc
        except Exception as exc:
            raise DWCPError(
                f"{component.name} failed to start: {_describe(exc)}", code="START_FAILED"
            ) from exc

    @staticmethod
    def _shutdown_component(component: _Component) -> None:
        try:
            if component.is_transport:
                component.obj.close()
            else:
                component.obj.stop()
        except Exception as exc:  # noqa: BLE001 - shutdown goes on through every component
            logger.bind(component=component.name, error=_describe(exc)).warning(
                "Component failed to stop cleanly"
            )

    def _on_breaker_transition(self, old: str, new: str) -> None:
        bound = logger.bind(state=new, previous=old)
        (bound.warning if new == OPEN else bound.info)("Circuit breaker state changed")
        self._events.publish(BreakerStateChanged(old, new))
