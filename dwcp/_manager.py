"""The Manager: a facade that wires the monitor, the supervisor, the breaker and the send path."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from functools import partial

from loguru import logger

from dwcp import _validation as check
from dwcp._breaker import Breaker
from dwcp._clock import Clock, SystemClock
from dwcp._cluster import ClusterView, cluster_member
from dwcp._components import Layer, Transport
from dwcp._delivery import DeliveryCalls
from dwcp._errors import DWCPError
from dwcp._events import Listener, _Dispatcher, peer_of
from dwcp._guard import CallFailures, Guard, GuardedCalls, failure_test
from dwcp._health import ComponentHealth, HealthSnapshot, MetricsSnapshot
from dwcp._latency import LatencyRecorder
from dwcp._lifecycle import StartStop
from dwcp._monitor import Monitor
from dwcp._outbox import Outbox
from dwcp._recovery import RecoveryPolicy, RestartSupervisor
from dwcp._slots import build_slots, policies, start_slots
from dwcp._status import ComponentState, Counters, health_snapshot, metrics_snapshot
from dwcp._supervisor import Supervisor

__all__ = ["Manager"]


class Manager(GuardedCalls, DeliveryCalls, StartStop):
    """Supervises a transport and optional layers: health monitoring, recovery, circuit breaker.

    Configure it with keyword arguments, then ``start()`` it (or use it as a context manager)
    and send through ``send_with_circuit_breaker``. Seconds are numbers or ``timedelta``.

    Args:
        transport: what sends go through (``dwcp.Transport``); optional.
        compression, prediction, sync, consensus: the four protocol-layer slots
            (``dwcp.Layer``), checked and recovered after the transport, in this order.
        layers: further named layers, checked and recovered after the slots.
        enabled: with False, ``start()`` does nothing and sends fail with ``NOT_STARTED``.
        health_interval: seconds between monitoring passes.
        health_check_timeout: how long one pass waits for its checks.
        max_retries: recovery attempts per cycle (the default policy's ``attempts``).
        initial_backoff: the wait before the first attempt; it doubles each attempt.
        max_failures: consecutive send failures that open the breaker.
        reset_timeout: seconds the breaker stays open before a trial; also how long a trial
            may take before it counts as failed (a hung trial never keeps the breaker shut).
        call_failures: what counts as a failure of ``call()`` and ``@guard``: an exception
            class, a tuple of them, or a predicate called with the exception (true: it
            counts). Default ``(OSError, TransportError)``; sends always use that default.
            ``KeyboardInterrupt`` and ``SystemExit`` never count.
        recovery: a ``RecoveryPolicy`` per component name, replacing the default one.
        breaker_storage: a Redis URL or ``redis.Redis`` client to share the breaker.
        breaker_name: the breaker's name (its Redis key); also names this manager.
        health_port: serve ``/livez /readyz /healthz /metrics`` on this port (0: any free).
        health_host: the address the health server binds.
        fail_fast: raise from ``start()`` when a component fails to start, instead of
            starting it degraded and in recovery.
        clock: where time is read and recovery backoffs wait (``dwcp.testing.FakeClock``).
        cluster: a Redis URL, ``redis.Redis`` client or ``dwcp.cluster.ClusterMember``:
            publish this manager's health on every pass and watch the cluster's nodes.
        node_id: this manager's id in the cluster (default: host name and process id).
        delivery_buffer_bytes: ``deliver()``: the bytes of accepted messages not yet
            confirmed or failed, at most; ``deliver()`` blocks while they would exceed it.
        delivery_timeout: ``deliver()``: a message's default deadline, in seconds.
        delivery_max_block: ``deliver()``: how long it blocks for room in the budget.
    """

    def __init__(
        self,
        transport: Transport | None = None,
        *,
        compression: Layer | None = None,
        prediction: Layer | None = None,
        sync: Layer | None = None,
        consensus: Layer | None = None,
        layers: Mapping[str, Layer] | None = None,
        enabled: bool = True,
        health_interval: float | timedelta = 10.0,
        health_check_timeout: float | timedelta = 5.0,
        max_retries: int = 3,
        initial_backoff: float | timedelta = 1.0,
        max_failures: int = 5,
        reset_timeout: float | timedelta = 30.0,
        call_failures: CallFailures | None = None,
        recovery: Mapping[str, RecoveryPolicy] | None = None,
        breaker_storage: object = None,
        breaker_name: str = "dwcp",
        health_port: int | None = None,
        health_host: str = "127.0.0.1",
        fail_fast: bool = False,
        clock: Clock | None = None,
        cluster: object = None,
        node_id: str | None = None,
        delivery_buffer_bytes: int = 32 * 1024 * 1024,
        delivery_timeout: float | timedelta = 120.0,
        delivery_max_block: float | timedelta = 60.0,
    ) -> None:
        self._enabled = check.flag("enabled", enabled)
        self._fail_fast = check.flag("fail_fast", fail_fast)
        self._name = check.name("breaker_name", breaker_name)
        counts_as_failure = failure_test(call_failures)
        if clock is not None and not isinstance(clock, Clock):
            raise TypeError(f"clock must have now() and sleep(), got {type(clock).__name__}")
        self._clock: Clock = clock or SystemClock()
        default = RecoveryPolicy(
            attempts=check.count("max_retries", max_retries),
            initial_backoff=check.seconds(
                "initial_backoff", initial_backoff, allow_zero=True, maximum=check.WEEK
            ),
        )
        slots = build_slots(transport, (compression, prediction, sync, consensus), layers)
        chosen = policies(recovery, slots, default)
        self._lock = threading.RLock()
        self._counters = Counters()
        now = self._clock.now()
        self._states = {
            s.name: ComponentState(s, now, RestartSupervisor(chosen[s.name])) for s in slots
        }
        self._transport = transport
        self._latency = LatencyRecorder()
        self._monitor = Monitor(
            self._lock,
            self._counters,
            self._latency,
            interval=check.seconds("health_interval", health_interval, maximum=check.DAY),
            timeout=check.seconds("health_check_timeout", health_check_timeout, maximum=check.DAY),
            clock=self._clock,
        )
        self._events = _Dispatcher(manager=self._name, peer=peer_of(transport))
        self._breaker = Breaker.build(
            breaker_storage,
            self._name,
            max_failures=check.count("max_failures", max_failures),
            reset_timeout=check.seconds("reset_timeout", reset_timeout, maximum=check.WEEK),
            on_transition=self._events.breaker_changed,
        )
        self._supervisor = Supervisor(
            self._lock,
            self._states,
            self._counters,
            self._monitor,
            self._events,
            self._clock,
            self._latency,
            on_transport_recovered=self._breaker.half_open,
        )
        transport_state = self._states.get("transport")
        self._guard = Guard(
            self._breaker,
            self._events,
            self._lock,
            self._counters,
            None
            if transport_state is None
            else partial(self._monitor.send_finished, transport_state),
            counts_as_failure,
        )
        self._tally = self._guard.tallies.local  # .value: the calling thread's send tally
        # Cluster health (dwcp.cluster): the longest gap between two passes is one interval
        # plus one check timeout, so that is the heartbeat interval announced.
        self._cluster = cluster_member(
            cluster,
            node_id,
            interval=self._monitor.interval + self._monitor.timeout,
            on_event=self._events.publish,
        )
        if self._cluster is not None:  # learned outage timing shared through its Redis
            for state in self._states.values():
                if state.supervisor.history is not None:  # predictive: it learns
                    state.supervisor.share(self._cluster.outage_history(self._name, state.name))
        # deliver(): its own module; the thread starts with the first message.
        self._outbox = Outbox(
            self.send_with_circuit_breaker,
            lambda: self._breaker.state,
            transport,
            # Runs of queued messages in one call, where the transport can take them.
            send_run=self._send_run if hasattr(transport, "_queue_for_delivery") else None,
            budget=check.count("delivery_buffer_bytes", delivery_buffer_bytes),
            timeout=check.seconds("delivery_timeout", delivery_timeout, maximum=check.WEEK),
            max_block=check.seconds(
                "delivery_max_block", delivery_max_block, allow_zero=True, maximum=check.WEEK
            ),
            name=self._name,
        )
        self._health_server = None
        # Checked even when unused: a bad health_host must not wait for a health_port.
        health_host = check.host_name("health_host", check.name("health_host", health_host))
        if health_port is not None:  # validated now, bound in start()
            port = check.port("health_port", health_port)
            from dwcp.http import HealthServer

            self._health_server = HealthServer(self, health_host, port)
        # "idle" -> "starting" -> "started" -> "stopping" -> "idle"; a manager can be restarted.
        self._phase = "idle"
        # Read without the lock on the send path; only ever replaced as a whole.
        self._started = False
        self._sending: Transport | None = None  # the transport while started
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._start_ended = threading.Event()  # set when the latest start() returned

    def __repr__(self) -> str:
        return (
            f"<Manager {self._name!r} {self._phase} components={list(self._states)} "
            f"breaker={self.circuit_breaker_state}>"
        )

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """This manager's name: its breaker's name, used in logs and metrics labels."""
        return self._name

    @property
    def is_started(self) -> bool:
        """Whether ``start()`` completed and ``stop()`` has not begun."""
        return self._started

    @property
    def health_url(self) -> str | None:
        """Base URL of the built-in health server while it runs (``health_port`` set), else None."""
        server = self._health_server
        return server.url if server is not None and self._started else None

    @property
    def monitor_alive(self) -> bool:
        """Whether the health-monitoring thread is running."""
        thread = self._monitor.thread
        return thread is not None and thread.is_alive()

    def start(self) -> None:
        """Start the transport and layers in order, then the monitoring thread.

        A component that fails to start (its peer is down, say) starts degraded, in recovery
        with the usual backoff, and sends fail fast meanwhile. With ``fail_fast=True`` the
        error is raised instead, after stopping what had started. A ``stop()`` called while
        this runs waits for it to finish, then stops the manager.
        """
        if not self._enabled:
            return
        with self._lock:
            if self._phase != "idle":
                raise DWCPError(f"manager is already {self._phase}", code="ALREADY_STARTED")
            self._phase = "starting"
            self._stopped.clear()
            started = self._start_ended = threading.Event()
        try:
            self._start()
        except BaseException:
            # Past the components (the cluster member failed, say): undo what started.
            with self._lock:
                reached, self._phase = self._started, "started" if self._started else "idle"
            if reached:
                self.stop()
            raise
        finally:
            started.set()

    def _start(self) -> None:
        self._await_previous_run()
        failed = self._start_components()
        with self._lock:
            now = self._clock.now()
            for state in self._states.values():
                state.restart_clean(now)
            degraded = self._supervisor.begin_degraded(failed)
            self._events.open()
            stop = self._stop
            self._started, self._sending = True, self._transport
            self._monitor.start(self._pass, stop)
        if self._transport is not None:
            self._outbox.open()
        self._breaker.watch()
        if self._cluster is not None:
            self._cluster.start()
            self._cluster.publish(self.health())
        logger.bind(components=list(self._states), degraded=sorted(failed)).info(
            "DWCP manager started: {}", self._name
        )
        self._supervisor.launch_degraded(degraded, stop)
        # "started" only now: a stop() that came meanwhile waited for this, so it never
        # joins a thread or closes a member that start() had not reached yet.
        with self._lock:
            self._phase = "started"

    def _await_previous_run(self) -> None:
        """Wait for recoveries that outlived the last ``stop()``'s join (a component's
        ``start()`` that hung past the deadline), so that cycles of two runs never overlap
        on one component; raise ``DWCPError`` (``STILL_STOPPING``) if one still hangs after
        ``health_check_timeout + 1 s``."""
        with self._lock:
            leftovers = [t for t in self._supervisor.threads() if t.is_alive()]
        deadline = self._join_deadline()
        for thread in leftovers:
            thread.join(max(deadline - time.monotonic(), 0.0))
        hung = [t.name for t in leftovers if t.is_alive()]
        if hung:
            raise DWCPError(
                f"a recovery of the previous run is still inside a component call ({', '.join(hung)}); "
                "start() again once it returns",
                code="STILL_STOPPING",
            )

    def _join_deadline(self) -> float:
        """The monotonic deadline of a stop's joins: ``health_check_timeout + 1 s`` from now,
        never further than a thread can wait (the validator bounds the timeout already)."""
        return time.monotonic() + min(self._monitor.timeout + 1.0, threading.TIMEOUT_MAX / 2)

    def _start_components(self) -> dict[str, DWCPError]:
        """Start the server and each component; those that fail (and may not) are returned."""
        try:
            if self._health_server is not None:
                self._health_server.start()  # DWCPError(HEALTH_SERVER_FAILED) on a busy port
            return start_slots([state.slot for state in self._states.values()], self._fail_fast)
        except BaseException:
            if self._health_server is not None:
                self._health_server.stop()
            with self._lock:
                self._phase = "idle"
                self._stopped.set()
            raise

    def stop(self) -> None:
        """Stop monitoring and recovery, join their threads, stop layers, close the transport.

        Idempotent; a second concurrent call waits for the first to finish. Called while
        ``start()`` runs, it waits for the start to finish, then stops.
        """
        with self._lock:
            if self._phase == "starting":
                starting = self._start_ended
            else:
                starting = None
        if starting is not None:
            starting.wait()  # start() always ends: its set() is in a finally
        with self._lock:
            phase, stopped = self._phase, self._stopped
            if phase == "started":
                self._phase, self._started, self._sending = "stopping", False, None
                self._stop.set()
                self._monitor.wake_all()
                threads = [t for t in (self._monitor.thread, *self._supervisor.threads()) if t]
                cycles = self._supervisor.cycles()
        if phase == "stopping":
            stopped.wait()
        if phase != "started":
            return
        self._outbox.refuse()  # from stop()'s first moment, also deliver()s waiting for room
        # Whatever fails below, the manager ends idle: a stop never leaves it "stopping".
        try:
            # Joined without the lock: these threads take it on their way out.
            self._supervisor.join(threads, cycles, self._join_deadline())
            for state in reversed(list(self._states.values())):
                state.slot.shutdown()
            # After the transport's close, which waits for outstanding confirmations and ends
            # a blocked send: what is still unconfirmed then fails (STOPPED). Its thread has the
            # same allowance as the others, from here.
            self._outbox.close()
            self._outbox.join(self._join_deadline())
            if self._health_server is not None:
                self._health_server.stop()
            self._breaker.close()
            if self._cluster is not None:
                self._cluster.close()
            self._events.close()
        finally:
            with self._lock:
                self._monitor.forget_thread()
                self._stop = threading.Event()
                self._phase = "idle"
                self._stopped.set()
        logger.info("DWCP manager stopped: {}", self._name)

    def close(self) -> None:
        """Alias of ``stop()``: every dwcp class that starts has both names."""
        self.stop()

    @property
    def circuit_breaker_state(self) -> str:
        """``closed``, ``open`` or ``half-open``: the breaker guarding sends and ``call()``.

        A manager without a transport reports it too: its breaker guards ``call()`` and
        ``@guard``.
        """
        return self._breaker.state

    # -- health ---------------------------------------------------------------------------------

    def check_component_health(self) -> Mapping[str, ComponentHealth]:
        """Run one check pass now, hand unhealthy components to recovery, return their health."""
        self._pass(self._stop)
        return self.health().components

    def attempt_component_recovery(self, name: str, error: BaseException | None = None) -> bool:
        """Run one recovery cycle for ``name`` here (or wait for the one in flight).

        ``error`` is what the caller saw fail, recorded as the component's last error.
        Returns whether the component ended healthy.
        """
        with self._lock:
            self._supervisor.state(name)
            if not self._started:
                raise DWCPError("manager is not started", code="NOT_STARTED")
            stop = self._stop
        return self._supervisor.recover_now(name, error, stop)

    def reset_component(self, name: str) -> None:
        """Clear the escalation and restart history of component ``name``."""
        self._supervisor.reset(name)

    def health(self) -> HealthSnapshot:
        """A snapshot of every component's status and the breaker state."""
        # Outside our lock: reading the state may notify listeners of a transition.
        breaker_state = self.circuit_breaker_state
        storage = self._breaker.storage_mode
        with self._lock:
            return health_snapshot(self._states.values(), self._clock.now(), breaker_state, storage)

    def metrics(self) -> MetricsSnapshot:
        """A snapshot of the counters, downtime per component and current statuses."""
        storage = self._breaker.storage_mode
        with self._lock:
            return metrics_snapshot(
                self._states.values(),
                self._clock.now(),
                self._counters,
                self._guard.tallies,
                self._latency,
                transitions=self._breaker.transition_counts,
                rejections=self._breaker.rejections,
                storage=storage,
                storage_errors=self._breaker.storage_errors,
                events_dropped=self._events.dropped,
                calls=self._guard.calls.total(),
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

    def _pass(self, stop: threading.Event) -> None:
        self._supervisor.run_pass(stop, recover=lambda: self._started)
        if self._cluster is not None:
            self._cluster.publish(self.health())  # hands it over; the I/O is the member's
