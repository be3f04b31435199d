"""One breaker shared through a real redis-server by several manager processes."""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
import threading
import time
from typing import Any

import pytest

import dwcp
from dwcp.testing import FakeTransport
from tests._redis import RedisServer, redis_server
from tests.conftest import wait_until

__all__ = ["redis_server"]  # the fixture, imported for pytest


def _fail_in_process(url: str, name: str, failures: int, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """Runs in a child process: a manager of its own whose sends all fail."""
    transport = FakeTransport()
    manager = dwcp.Manager(
        transport, breaker_storage=url, breaker_name=name, max_failures=5, reset_timeout=3600
    )
    manager.start()
    transport.fail_sends = ConnectionRefusedError("peer down")
    outcomes = []
    try:
        for _ in range(failures):
            try:
                manager.send_with_circuit_breaker(b"x")
            except dwcp.CircuitOpenError:
                outcomes.append("rejected")
            except dwcp.TransportError:
                outcomes.append("failed")
    finally:
        manager.stop()
    results.put((outcomes, manager.circuit_breaker_state))


def _run_child(url: str, name: str, failures: int) -> tuple[list[str], str]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_fail_in_process, args=(url, name, failures, results))
    proc.start()
    outcome = results.get(timeout=60)
    proc.join(30)
    assert proc.exitcode == 0
    return outcome  # type: ignore[no-any-return]


def test_failures_from_several_processes_add_up_and_open_everywhere(
    redis_server: RedisServer,
) -> None:
    name = "shared-test-1"
    observer = dwcp.Manager(
        FakeTransport(), breaker_storage=redis_server.url, breaker_name=name, reset_timeout=3600
    )
    observer.start()
    try:
        assert observer.health().breaker_storage == "shared"
        assert _run_child(redis_server.url, name, 2) == (["failed", "failed"], "closed")
        assert _run_child(redis_server.url, name, 2) == (["failed", "failed"], "closed")
        assert observer.circuit_breaker_state == "closed"
        # The fifth failure overall, in a third process, opens the shared breaker.
        outcomes, state = _run_child(redis_server.url, name, 2)
        assert outcomes == ["failed", "rejected"] and state == "open"
        wait_until(lambda: observer.circuit_breaker_state == "open")
        with pytest.raises(dwcp.CircuitOpenError):
            observer.send_with_circuit_breaker(b"x")
    finally:
        observer.stop()


def test_reset_timeout_is_shared(redis_server: RedisServer) -> None:
    name = "shared-test-2"

    def make(transport: FakeTransport) -> dwcp.Manager:
        return dwcp.Manager(
            transport,
            breaker_storage=redis_server.url,
            breaker_name=name,
            max_failures=1,
            reset_timeout=1.0,
        )

    first_transport = FakeTransport()
    first, second = make(first_transport), make(FakeTransport())
    first.start()
    second.start()
    try:
        first_transport.fail_sends = OSError("down")
        with pytest.raises(dwcp.TransportError):
            first.send_with_circuit_breaker(b"x")
        wait_until(lambda: second.circuit_breaker_state == "open")
        # Both half-open once the shared reset timeout passes (Redis keeps whole seconds).
        wait_until(lambda: second.circuit_breaker_state == "half-open", timeout=5)
        second.send_with_circuit_breaker(b"trial")
        wait_until(lambda: first.circuit_breaker_state == "closed")
    finally:
        first.stop()
        second.stop()


def test_unreachable_redis_falls_back_to_local_state_and_returns(
    redis_server: RedisServer,
) -> None:
    transport = FakeTransport()
    manager = dwcp.Manager(
        transport,
        breaker_storage=redis_server.url,
        breaker_name="shared-test-3",
        max_failures=3,
        reset_timeout=3600,
    )
    manager.start()
    try:
        manager.send_with_circuit_breaker(b"before")
        redis_server.stop()
        # Sends keep working on local state while Redis is gone, and the breaker still works.
        wait_until(lambda: _send_ok(manager) and manager.health().breaker_storage == "fallback")
        assert manager.metrics().breaker_storage_errors > 0
        assert manager.metrics().breaker_storage == "fallback"
        transport.fail_sends = OSError("down")
        for _ in range(3):
            with pytest.raises(dwcp.TransportError):
                manager.send_with_circuit_breaker(b"x")
        with pytest.raises(dwcp.CircuitOpenError):
            manager.send_with_circuit_breaker(b"x")
        redis_server.start()
        wait_until(lambda: manager.health().breaker_storage == "shared", timeout=10)
    finally:
        manager.stop()


def _send_ok(manager: dwcp.Manager) -> bool:
    manager.send_with_circuit_breaker(b"during")
    return True


def test_bad_storage_arguments_are_clear() -> None:
    with pytest.raises(ValueError, match="redis://"):
        dwcp.Manager(FakeTransport(), breaker_storage="http://127.0.0.1:6379")
    with pytest.raises(TypeError, match="breaker_storage"):
        dwcp.Manager(FakeTransport(), breaker_storage=42)
    with pytest.raises(ValueError, match="breaker_name"):
        dwcp.Manager(FakeTransport(), breaker_storage="redis://127.0.0.1:1", breaker_name="")


def test_an_open_breaker_stays_open_through_a_redis_outage_and_an_empty_restart(
    redis_server: RedisServer,
) -> None:
    transport = FakeTransport()
    manager = dwcp.Manager(
        transport,
        breaker_storage=redis_server.url,
        breaker_name="shared-test-4",
        max_failures=3,
        reset_timeout=3600,
    )
    manager.start()
    try:
        transport.fail_sends = OSError("peer down")
        for _ in range(3):
            with pytest.raises(dwcp.TransportError):
                manager.send_with_circuit_breaker(b"x")
        assert manager.circuit_breaker_state == "open"
        calls = transport.send_calls
        redis_server.stop()
        wait_until(lambda: _rejected(manager) and manager.health().breaker_storage == "fallback")
        # Redis gone: the breaker stays open on the last state this process knew.
        assert manager.circuit_breaker_state == "open"
        redis_server.start()  # back, and empty (no persistence)
        wait_until(lambda: _rejected(manager) and manager.health().breaker_storage == "shared")
        import redis

        client = redis.Redis.from_url(redis_server.url, socket_timeout=0.5)
        try:
            # The next look at the shared state finds it missing and puts this one back.
            key = "shared-test-4:pybreaker:state"
            wait_until(lambda: _rejected(manager) and client.get(key) == b"open")
        finally:
            client.close()
        assert manager.circuit_breaker_state == "open"
        assert transport.send_calls == calls  # no send reached the peer without a trial
    finally:
        manager.stop()


def _rejected(manager: dwcp.Manager) -> bool:
    try:
        manager.send_with_circuit_breaker(b"x")
    except dwcp.CircuitOpenError:
        return True
    return False


def test_pybreaker_keeps_the_redis_key_layout_the_failover_relies_on() -> None:
    # dwcp._shared restores a missing state key by name; this fails if pybreaker renames it.
    import pybreaker

    storage = object.__new__(pybreaker.CircuitRedisStorage)
    storage._namespace_name = "name"
    assert storage._namespace("state") == "name:pybreaker:state"


def _trial_in_process(url: str, name: str, ready: Any, go: Any, answer: Any, results: Any) -> None:
    """Runs in a child process: once ``go`` is set, try one send through a half-open breaker;
    the peer answers a trial only when ``answer`` is set. Report whether the send reached
    the transport."""
    transport = FakeTransport()
    transport.send_gate = answer  # the trial stays in flight until the parent says
    manager = dwcp.Manager(
        transport, breaker_storage=url, breaker_name=name, max_failures=1, reset_timeout=1
    )
    manager.start()
    ready.put(os.getpid())
    try:
        go.wait(30)
        try:
            manager.send_with_circuit_breaker(b"trial?")
            results.put("sent")
        except dwcp.CircuitOpenError:
            results.put("rejected")
    finally:
        manager.stop()


def test_half_open_admits_one_trial_across_processes(redis_server: RedisServer) -> None:
    name = "shared-test-5"
    opener = FakeTransport()
    opener.fail_sends = ConnectionRefusedError("peer down")
    manager = dwcp.Manager(
        opener, breaker_storage=redis_server.url, breaker_name=name, max_failures=1,
        reset_timeout=1,
    )  # fmt: skip
    manager.start()
    ctx = multiprocessing.get_context("spawn")
    ready, go, answer, results = ctx.Queue(), ctx.Event(), ctx.Event(), ctx.Queue()
    args = (redis_server.url, name, ready, go, answer, results)
    children = [ctx.Process(target=_trial_in_process, args=args) for _ in range(2)]
    try:
        with pytest.raises(dwcp.TransportError):
            manager.send_with_circuit_breaker(b"x")
        assert manager.circuit_breaker_state == "open"
        for child in children:
            child.start()
        for _ in children:
            ready.get(timeout=60)
        # Both children see the open breaker become half-open (the reset timeout is 1 s).
        wait_until(lambda: manager.circuit_breaker_state == "half-open", timeout=10)
        go.set()
        # The loser answers at once, while the winner's trial is still in flight.
        assert results.get(timeout=30) == "rejected"
        answer.set()
        assert results.get(timeout=30) == "sent"  # exactly one trial reached a peer
    finally:
        answer.set()
        for child in children:
            child.join(30)
            if child.is_alive():
                child.kill()
        manager.stop()


def test_a_timed_out_open_never_undoes_another_process_close(redis_server: RedisServer) -> None:
    """The open -> half-open move after the reset timeout stays local: written back from a
    stale view, it would overwrite the close another process's trial just wrote."""
    from freezegun import freeze_time

    from dwcp._breaker import Breaker
    from dwcp._shared import FailoverStorage, connect

    def breaker(sync_interval: float) -> Breaker:
        storage = FailoverStorage(connect(redis_server.url), "timed-half-open")
        return Breaker(
            max_failures=1, reset_timeout=30, storage=storage, sync_interval=sync_interval
        )

    with freeze_time("2026-01-01 00:00:00") as clock:
        stale = breaker(sync_interval=3600)  # reads Redis once, then never again
        fresh = breaker(sync_interval=0)
        stale.record_failure(stale.admit())
        assert stale.state == "open" and fresh.state == "open"
        clock.tick(31)
        trial = fresh.admit()  # fresh times out, claims the trial and closes the breaker
        fresh.record_success(trial)
        assert fresh.state == "closed"
        assert stale.state == "half-open"  # its own timed view, from the open it last read
        assert fresh.state == "closed"  # ...which did not reach Redis
        stale.remote_changed()  # told of the change: it adopts the close
        assert stale.state == "closed"


# -- one half-open trial per open period, across processes ------------------------------------

_PERIOD_KEY = "{name}:pybreaker:opened_at_ms"


class _DeadPeer(FakeTransport):
    """A transport to a dead peer that logs every send reaching it: with the breaker open
    from the start, each one is a half-open trial.

    A line is ``<time> <pid> <mode> <period>``: ``mode`` is the breaker's storage mode when
    the trial ran (``shared``, or ``fallback`` while Redis is unreachable) and ``period`` the
    shared ``opened_at`` (epoch ms) the trial ran in.  A file ``hang-<n>`` in ``work`` makes
    the next trial (of any process) take ``hung-<n>`` and hang until ``release-<n>`` appears,
    then return a late success.
    """

    def __init__(self, work: str, client: Any, key: str) -> None:
        super().__init__()
        self.manager: dwcp.Manager | None = None
        self._work, self._client, self._key = work, client, key
        self._pause = threading.Event()

    def send(self, data: bytes | bytearray | memoryview) -> None:
        import redis

        assert self.manager is not None
        mode = self.manager.metrics().breaker_storage
        try:
            period = self._client.get(self._key)
        except redis.RedisError:
            period = None
        if period is None:
            mode = "fallback"
        line = f"{time.time():.3f} {os.getpid()} {mode} {int(period or 0)}\n"
        fd = os.open(os.path.join(self._work, "trials.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, line.encode())  # one write of a short line: appended whole
        finally:
            os.close(fd)
        for n in (1, 2):
            if self._take(f"hang-{n}", f"hung-{n}"):
                release = os.path.join(self._work, f"release-{n}")
                deadline = time.monotonic() + 120
                while not os.path.exists(release) and time.monotonic() < deadline:
                    self._pause.wait(0.01)
                return  # a late success
        raise ConnectionRefusedError("peer down")

    def _take(self, flag: str, taken: str) -> bool:
        if not os.path.exists(os.path.join(self._work, flag)):
            return False
        try:
            fd = os.open(os.path.join(self._work, taken), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True


def _trials_in_process(url: str, name: str, reset: float, work: str) -> None:
    """Runs in a child process: send through the shared breaker until ``work/stop`` exists."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    transport = _DeadPeer(work, client, _PERIOD_KEY.format(name=name))
    manager = dwcp.Manager(
        transport, breaker_storage=url, breaker_name=name, max_failures=1, reset_timeout=reset
    )
    transport.manager = manager
    manager.start()
    pace = threading.Event()
    deadline = time.monotonic() + 180
    with open(os.path.join(work, f"ready-{os.getpid()}"), "w"):
        pass
    try:
        while not os.path.exists(os.path.join(work, "stop")) and time.monotonic() < deadline:
            try:
                manager.send_with_circuit_breaker(b"x")
            except (dwcp.CircuitOpenError, dwcp.TransportError):
                pass
            pace.wait(0.002)  # pacing of a busy sender, not a synchronisation
    finally:
        manager.stop()


def _trials(work: str) -> list[tuple[float, int, str, int]]:
    try:
        with open(os.path.join(work, "trials.log")) as log:
            lines = log.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        at, pid, mode, period = line.split()
        out.append((float(at), int(pid), mode, int(period)))
    return out


def _shared_periods_since(work: str, since: float) -> set[int]:
    return {p for at, _, mode, p in _trials(work) if mode == "shared" and at >= since}


def test_one_half_open_trial_per_open_period_across_five_processes(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    """Exactly one trial per open period in total across 5 processes, through failed
    trials, a trial that hung past its deadline (a late success), a trial holder SIGKILLed
    and an empty Redis restart.  Trials while Redis is unreachable (each process decides
    alone) are counted apart."""
    import signal

    name, reset, work = "shared-periods", 0.5, str(tmp_path)
    opener = FakeTransport()
    opener.fail_sends = ConnectionRefusedError("peer down")
    manager = dwcp.Manager(
        opener, breaker_storage=redis_server.url, breaker_name=name, max_failures=1,
        reset_timeout=3600,
    )  # fmt: skip
    manager.start()
    with pytest.raises(dwcp.TransportError):
        manager.send_with_circuit_breaker(b"x")  # open before any child sends
    manager.stop()
    ctx = multiprocessing.get_context("spawn")
    children = [
        ctx.Process(target=_trials_in_process, args=(redis_server.url, name, reset, work))
        for _ in range(5)
    ]
    try:
        for child in children:
            child.start()
        wait_until(
            lambda: len([f for f in os.listdir(work) if f.startswith("ready-")]) == 5, timeout=120
        )
        # Failed trials: several periods.
        wait_until(lambda: len(_shared_periods_since(work, 0)) >= 4, timeout=60)

        # A trial that hangs past its deadline in a live process, then returns a success.
        open(os.path.join(work, "hang-1"), "w").close()
        wait_until(lambda: os.path.exists(os.path.join(work, "hung-1")), timeout=60)
        hung_at = time.time()
        wait_until(lambda: len(_shared_periods_since(work, hung_at)) >= 2, timeout=60)
        open(os.path.join(work, "release-1"), "w").close()
        released_at = time.time()
        wait_until(lambda: len(_shared_periods_since(work, released_at)) >= 2, timeout=60)

        # A trial holder SIGKILLed mid-trial.
        open(os.path.join(work, "hang-2"), "w").close()
        wait_until(lambda: os.path.exists(os.path.join(work, "hung-2")), timeout=60)
        victim = int(_text_of(os.path.join(work, "hung-2")))
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        wait_until(lambda: len(_shared_periods_since(work, killed_at)) >= 3, timeout=60)

        # Redis killed and started again, empty.
        redis_server.kill()
        redis_server.start()
        restarted_at = time.time()
        wait_until(lambda: len(_shared_periods_since(work, restarted_at)) >= 3, timeout=60)
    finally:
        open(os.path.join(work, "stop"), "w").close()
        open(os.path.join(work, "release-1"), "w").close()
        for child in children:
            child.join(30)
            if child.is_alive():
                child.kill()
                child.join(10)

    trials = _trials(work)
    per_period: dict[int, list[tuple[float, int]]] = {}
    for at, pid, mode, period in trials:
        if mode == "shared":
            per_period.setdefault(period, []).append((at, pid))
    repeated = {p: t for p, t in per_period.items() if len(t) != 1}
    assert not repeated, f"periods with more than one trial: {repeated}"
    # Had the hung trial's late success closed the breaker, every process would have sent
    # in the same period, which the count above rules out.
    assert len(per_period) >= 4 + 2 + 2 + 3 + 3


def _text_of(path: str) -> str:
    """The file's text once its writer has written some (created empty, then written)."""

    def read() -> str:
        with open(path) as handle:
            return handle.read()

    wait_until(lambda: read() != "", timeout=10)
    return read()


# -- a process that has not reconnected yet is no evidence against the peer -------------------


def _not_started() -> dwcp.TransportError:
    # What the built-in transport raises while its own recovery has it closed.
    return dwcp.TransportError("transport not started", code="NOT_STARTED")


def test_not_started_failures_never_count_against_the_shared_breaker(
    redis_server: RedisServer,
) -> None:
    """A manager whose transport is not started (its recovery has not reconnected yet) fails
    its sends with NOT_STARTED; those never open the breaker it shares with the others."""
    name = "shared-not-started"
    reconnecting, connected = FakeTransport(), FakeTransport()
    managers = [
        dwcp.Manager(t, breaker_storage=redis_server.url, breaker_name=name, max_failures=1)
        for t in (reconnecting, connected)
    ]
    for manager in managers:
        manager.start()
    try:
        reconnecting.fail_sends = _not_started()
        for _ in range(20):
            with pytest.raises(dwcp.TransportError) as info:
                managers[0].send_with_circuit_breaker(b"x")
            assert info.value.code == "NOT_STARTED"
        assert [m.circuit_breaker_state for m in managers] == ["closed", "closed"]
        managers[1].send_with_circuit_breaker(b"the peer is up")
        assert connected.sent == [b"the peer is up"]
        assert managers[1].metrics().breaker_transitions == {}
    finally:
        for manager in managers:
            manager.stop()


def test_a_not_started_trial_leaves_the_periods_trial_to_another_process(
    redis_server: RedisServer,
) -> None:
    """In a half-open shared breaker, a trial that fails NOT_STARTED neither re-opens the
    breaker nor uses up the period's trial: a connected process runs it and closes it."""
    name = "shared-not-started-trial"
    reconnecting, connected = FakeTransport(), FakeTransport()
    managers = [
        dwcp.Manager(
            t, breaker_storage=redis_server.url, breaker_name=name, max_failures=1,
            reset_timeout=0.5,
        )
        for t in (reconnecting, connected)
    ]  # fmt: skip
    for manager in managers:
        manager.start()
    try:
        connected.fail_sends = ConnectionRefusedError("peer down")
        with pytest.raises(dwcp.TransportError):
            managers[1].send_with_circuit_breaker(b"x")
        connected.fail_sends = None
        wait_until(lambda: managers[0].circuit_breaker_state == "open")
        wait_until(lambda: managers[0].circuit_breaker_state == "half-open", timeout=10)
        reconnecting.fail_sends = _not_started()
        with pytest.raises(dwcp.TransportError, match="NOT_STARTED"):
            managers[0].send_with_circuit_breaker(b"trial from a process still reconnecting")
        assert reconnecting.send_calls == 1  # it was admitted as the trial, and gave it back
        wait_until(lambda: managers[1].circuit_breaker_state == "half-open", timeout=10)
        managers[1].send_with_circuit_breaker(b"the period's trial")
        wait_until(lambda: managers[0].circuit_breaker_state == "closed")
        assert managers[1].circuit_breaker_state == "closed"
    finally:
        for manager in managers:
            manager.stop()


class _TimedPeer(FakeTransport):
    """A FakeTransport that notes when each send reached it (``time.monotonic()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def send(self, data: bytes | bytearray | memoryview) -> None:
        self.times.append(time.monotonic())
        super().send(data)


def test_while_redis_is_down_each_process_runs_its_own_trial_every_period_and_the_breaker_stays_open(
    redis_server: RedisServer,
) -> None:
    reset = 0.5
    peers = [_TimedPeer(), _TimedPeer()]
    managers = [
        dwcp.Manager(
            peer, breaker_storage=redis_server.url, breaker_name="shared-redis-down",
            max_failures=1, reset_timeout=reset,
        )
        for peer in peers
    ]  # fmt: skip
    for manager in managers:
        manager.start()
    try:
        for peer in peers:
            peer.fail_sends = ConnectionRefusedError("peer down")
        with pytest.raises(dwcp.TransportError):
            managers[0].send_with_circuit_breaker(b"x")
        wait_until(lambda: managers[1].circuit_breaker_state == "open")
        redis_server.stop()
        before = [len(peer.times) for peer in peers]

        def both_ran_three_trials() -> bool:
            for manager in managers:
                try:
                    manager.send_with_circuit_breaker(b"x")
                except (dwcp.CircuitOpenError, dwcp.TransportError):
                    pass
                assert manager.circuit_breaker_state != "closed"  # it stays open
            return all(len(p.times) - b >= 3 for p, b in zip(peers, before))

        wait_until(both_ran_three_trials, timeout=30)
        for manager in managers:
            assert manager.health().breaker_storage == "fallback"
            assert manager.circuit_breaker_state in ("open", "half-open")
        for peer, first in zip(peers, before):
            trials = peer.times[first:]
            # One trial per period in each process: each failed trial opens its own breaker
            # for another reset timeout.
            assert all(b - a >= reset for a, b in itertools.pairwise(trials))
        # Each process's breaker closes on its own trial's success, not on another's.
        peers[0].fail_sends = None
        wait_until(lambda: _sent(managers[0]), timeout=10)
        assert managers[0].circuit_breaker_state == "closed"
        assert managers[1].circuit_breaker_state in ("open", "half-open")
    finally:
        for manager in managers:
            manager.stop()


def _sent(manager: dwcp.Manager) -> bool:
    try:
        manager.send_with_circuit_breaker(b"x")
    except (dwcp.CircuitOpenError, dwcp.TransportError):
        return False
    return True


def _pair(url: str, name: str) -> tuple[Any, Any]:
    """Two breakers sharing ``name`` as two processes would: ``fresh`` re-reads Redis on
    every call, ``stale`` only once an hour (and no subscriber tells it of changes)."""
    from dwcp._breaker import Breaker
    from dwcp._shared import FailoverStorage, connect

    def breaker(sync_interval: float) -> Breaker:
        storage = FailoverStorage(connect(url), name)
        return Breaker(
            max_failures=1, reset_timeout=30, storage=storage, sync_interval=sync_interval
        )

    return breaker(0), breaker(3600)


def test_a_process_timing_out_after_anothers_trial_failed_gets_no_second_trial(
    redis_server: RedisServer,
) -> None:
    """The race issue 21 measured, made deterministic: the trial fails and frees nothing, so
    a process whose own timer fires before it heard of the re-open is refused."""
    from freezegun import freeze_time

    with freeze_time("2026-01-01 00:00:00") as clock:
        fresh, stale = _pair(redis_server.url, "period-race")
        fresh.record_failure(fresh.admit())
        assert stale.state == "open"  # its one read of Redis
        clock.tick(30)
        fresh.record_failure(fresh.admit())  # the period's trial fails: open again
        assert fresh.state == "open"
        assert stale.state == "half-open"  # its own timer, from the open it last read
        with pytest.raises(dwcp.CircuitOpenError, match="moved it on"):
            stale.admit()
        assert stale.state == "open"  # refused, it re-read the shared state at once
        clock.tick(30)
        trial = stale.admit()  # the next period's trial is its to take
        with pytest.raises(dwcp.CircuitOpenError):
            fresh.admit()
        stale.record_success(trial)
        assert stale.state == "closed" and fresh.state == "closed"


def test_a_later_open_brought_back_while_the_periods_trial_runs_gets_no_second_trial(
    redis_server: RedisServer,
) -> None:
    """After an empty restart each process brings back its own open, milliseconds apart.
    The CI run that failed: the first claim made its open the shared period, the second
    (2 ms later) made its own the shared one and got a trial too.  While the shared period's
    trial runs, a later open is refused; with no trial claimed it still becomes the period
    (its write was lost while Redis was away)."""
    from dwcp._shared import FailoverStorage, connect

    name = "period-brought-back"
    first, second, third = (FailoverStorage(connect(redis_server.url), name) for _ in range(3))
    now = int(time.time() * 1000)
    future = now + 60_000
    client = connect(redis_server.url)
    client.set(f"{name}:pybreaker:state", "open")
    client.set(f"{name}:pybreaker:opened_at_ms", now - 1000)

    assert first.claim_trial(now - 10, future) == "granted"  # a lost open: now the period
    assert second.claim_trial(now - 8, future) == "taken"  # later still: no second trial
    assert third.claim_trial(now - 10, future) == "taken"
    assert int(client.get(f"{name}:pybreaker:opened_at_ms")) == now - 10


class _ReturningPeer(FakeTransport):
    """A dead peer until ``work/up`` exists; then, for ``delay`` seconds more, this process's
    transport is still reconnecting (``NOT_STARTED``, as the built-in transport raises while
    its recovery has it closed); then sends succeed."""

    def __init__(self, work: str, delay: float) -> None:
        super().__init__()
        self._up = os.path.join(work, "up")
        self._delay = delay

    def send(self, data: bytes | bytearray | memoryview) -> None:
        try:
            up_since = os.stat(self._up).st_mtime
        except FileNotFoundError:
            raise ConnectionRefusedError("peer down") from None
        if time.time() - up_since < self._delay:
            raise dwcp.TransportError("transport not started", code="NOT_STARTED")
        super().send(data)


def _reconnecting_process(url: str, name: str, work: str, delay: float) -> None:
    """Runs in a child process: send until 200 sends succeeded after reconnecting, then
    write this process's breaker transitions to ``work/result-<pid>``."""
    import json

    transport = _ReturningPeer(work, delay)
    manager = dwcp.Manager(
        transport, breaker_storage=url, breaker_name=name, max_failures=2, reset_timeout=0.5
    )
    manager.start()
    pace = threading.Event()
    with open(os.path.join(work, f"ready-{os.getpid()}"), "w"):
        pass
    deadline = time.monotonic() + 120
    try:
        while len(transport.sent) < 200 and time.monotonic() < deadline:
            try:
                manager.send_with_circuit_breaker(b"x")
            except (dwcp.CircuitOpenError, dwcp.TransportError):
                pass
            pace.wait(0.005)  # pacing of a steady sender, not a synchronisation
        transitions = manager.metrics().breaker_transitions
    finally:
        manager.stop()
    with open(os.path.join(work, f"result-{os.getpid()}"), "w") as out:
        json.dump([[old, new, n] for (old, new), n in transitions.items()], out)


def test_processes_still_reconnecting_do_not_re_trip_the_shared_breaker(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    """After the peer returns, one trial closes the shared breaker, and processes whose
    own transport has not reconnected yet (NOT_STARTED for up to 1.6 s) never re-open it."""
    import json

    name, work = "shared-reconnecting", str(tmp_path)
    opener = FakeTransport()
    opener.fail_sends = ConnectionRefusedError("peer down")
    manager = dwcp.Manager(
        opener, breaker_storage=redis_server.url, breaker_name=name, max_failures=1,
        reset_timeout=0.5,
    )  # fmt: skip
    manager.start()
    with pytest.raises(dwcp.TransportError):
        manager.send_with_circuit_breaker(b"x")
    manager.stop()
    ctx = multiprocessing.get_context("spawn")
    children = [
        ctx.Process(target=_reconnecting_process, args=(redis_server.url, name, work, 0.4 * i))
        for i in range(5)
    ]
    try:
        for child in children:
            child.start()
        wait_until(
            lambda: len([f for f in os.listdir(work) if f.startswith("ready-")]) == 5, timeout=120
        )
        open(os.path.join(work, "up"), "w").close()  # the peer listens again
        for child in children:
            child.join(150)
            assert child.exitcode == 0
    finally:
        for child in children:
            if child.is_alive():
                child.kill()
                child.join(10)
    results = [f for f in os.listdir(work) if f.startswith("result-")]
    assert len(results) == 5
    for result in results:
        with open(os.path.join(work, result)) as handle:
            transitions = {(old, new): n for old, new, n in json.load(handle)}
        assert transitions.get(("closed", "open"), 0) == 0, transitions
        assert (
            transitions.get(("half-open", "closed"), 0) + transitions.get(("open", "closed"), 0)
            >= 1
        )


def test_after_an_empty_restart_an_open_breaker_starts_a_new_open_period(
    redis_server: RedisServer,
) -> None:
    """Whether the lost period's trial ran went with Redis: the process that puts the open
    state back stamps ``opened_at`` with the moment it found it missing."""
    import redis

    name = "shared-restart-period"
    transport = FakeTransport()
    manager = dwcp.Manager(
        transport, breaker_storage=redis_server.url, breaker_name=name, max_failures=1,
        reset_timeout=3600,
    )  # fmt: skip
    manager.start()
    try:
        transport.fail_sends = OSError("peer down")
        with pytest.raises(dwcp.TransportError):
            manager.send_with_circuit_breaker(b"x")
        redis_server.kill()
        redis_server.start()  # empty
        restarted_ms = int(time.time() * 1000)
        client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
        try:
            key = f"{name}:pybreaker:"
            wait_until(
                lambda: _rejected(manager) and client.get(key + "state") == b"open", timeout=10
            )
            assert int(client.get(key + "opened_at_ms") or 0) >= restarted_ms
        finally:
            client.close()
    finally:
        manager.stop()


def test_a_trial_claimed_right_after_a_redis_blip_is_decided_in_redis(
    redis_server: RedisServer,
) -> None:
    """Outside attack on #21: after a dropped connection (CLIENT KILL, or a restart of a few
    ms) every process stayed on its local state for the retry interval (about 1 s) after
    Redis answered again, and each ran its own trial in that second (2-5 in one period).
    A claim asks Redis first, so the period still gets one trial."""
    import redis

    from dwcp._shared import FailoverStorage, connect

    name = "blip-claim"
    first, second = (FailoverStorage(connect(redis_server.url), name) for _ in range(2))
    now = int(time.time() * 1000)
    client = connect(redis_server.url)
    client.set(f"{name}:pybreaker:state", "open")
    client.set(f"{name}:pybreaker:opened_at_ms", now - 1000)
    for storage in (first, second):
        storage._failed(redis.ConnectionError("connection dropped"))  # the blip
        assert not storage.shared
    assert first.claim_trial(now - 1000, now + 60_000) == "granted"
    assert second.claim_trial(now - 1000, now + 60_000) == "taken"
    assert first.shared and second.shared


def _other_clients(redis_server: RedisServer) -> int:
    """Connections the server has, but the one asking."""
    import redis

    admin = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    try:
        me = admin.client_id()
        return sum(1 for c in admin.client_list() if int(c["id"]) != me)
    finally:
        admin.close()


def test_stop_gives_back_the_redis_connections_it_opened_and_start_opens_them_again(
    redis_server: RedisServer,
) -> None:
    manager = dwcp.Manager(
        FakeTransport(), breaker_storage=redis_server.url, breaker_name="fd-after-stop"
    )
    for _ in range(2):
        manager.start()
        assert manager.call(lambda: 1) == 1
        wait_until(lambda: _other_clients(redis_server) >= 1)
        manager.stop()
        # Before: the pool's idle connection stayed open until the manager was collected.
        wait_until(lambda: _other_clients(redis_server) == 0)
    assert manager.circuit_breaker_state == "closed"  # read through Redis again, lazily


# -- the newer decision wins when processes that decided alone meet again ---------------------


def _outage_pair(url: str, name: str, reset: float) -> tuple[Any, Any]:
    """Two breakers sharing ``name`` as two processes would, re-reading Redis on every call
    and retrying an unreachable Redis at once (no retry interval to wait out)."""
    from dwcp._breaker import Breaker
    from dwcp._shared import FailoverStorage, connect

    def breaker() -> Breaker:
        storage = FailoverStorage(connect(url), name, retry_interval=0.0)
        return Breaker(max_failures=1, reset_timeout=reset, storage=storage, sync_interval=0)

    return breaker(), breaker()


def _alone_until(breaker: Any, state: str) -> bool:
    """Whether ``breaker`` reads ``state`` on its own (fallback) storage."""
    return bool(breaker.state == state and breaker.storage_mode == "fallback")


def test_a_close_decided_alone_during_an_outage_wins_over_an_older_open_written_back_first(
    redis_server: RedisServer,
) -> None:
    """The outside test's 20-40 ms re-open (4 of 12 restarts), made deterministic: while
    Redis is down ``closer`` runs its own trial and closes; Redis restarts empty; ``opener``,
    still open from before the outage, reaches Redis first and writes its (older) open back.
    ``closer`` then keeps its newer close, writes it back, and ``opener`` adopts it: no
    process re-opens without a failed call."""
    import redis

    name = "newer-close-wins"
    closer, opener = _outage_pair(redis_server.url, name, reset=0.3)
    opener.record_failure(opener.admit())  # open, shared
    assert closer.state == "open"
    redis_server.kill()
    wait_until(lambda: _alone_until(closer, "half-open"), timeout=30)
    closer.record_success(closer.admit())  # its own trial, decided alone: closed
    assert closer.state == "closed" and closer.storage_mode == "fallback"
    reopens = closer.transition_counts.get(("closed", "open"), 0)
    redis_server.start()  # empty
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    try:
        key = f"{name}:pybreaker:state"
        # The older open is written back first (the opener's state read finds it missing).
        wait_until(
            lambda: (
                opener.state != "closed"
                and opener.storage_mode == "shared"
                and client.get(key) == b"open"
            )
        )
        assert closer.state == "closed"  # before: "open" (it adopted the older open)
        assert closer.storage_mode == "shared"
        assert client.get(key) == b"closed"  # its newer close is the shared state now
        wait_until(lambda: opener.state == "closed")  # and the opener adopts it
    finally:
        client.close()
    assert closer.transition_counts.get(("closed", "open"), 0) == reopens
    closer.close()
    opener.close()


@pytest.mark.parametrize("closer_first", [True, False], ids=["older-first", "newer-first"])
def test_an_open_decided_alone_after_anothers_close_wins_over_that_close(
    redis_server: RedisServer, closer_first: bool
) -> None:
    """The same rule the other way round: ``closer`` closes alone, then ``opener``'s own
    trial fails, later.  The newer open (a failed call) wins whichever returns first: when
    ``closer`` writes its older close back first into the emptied Redis, ``opener`` stays open
    and writes its open over it; when ``opener`` is first, ``closer``'s older close is not
    written back.  Either way ``closer`` adopts the open."""
    import redis

    name = f"newer-open-wins-{closer_first}"
    closer, opener = _outage_pair(redis_server.url, name, reset=1.0)
    opener.record_failure(opener.admit())
    assert closer.state == "open"
    redis_server.kill()
    wait_until(lambda: _alone_until(closer, "half-open"), timeout=30)
    closer.record_success(closer.admit())
    assert closer.state == "closed"
    closed_at = time.time()
    # opener's own trial fails after closer's close was decided.
    wait_until(lambda: _alone_until(opener, "half-open") and time.time() > closed_at + 0.01)
    opener.record_failure(opener.admit())
    assert opener.state == "open"
    closes = opener.transition_counts.get(("open", "closed"), 0)
    redis_server.start()  # empty
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    try:
        key = f"{name}:pybreaker:state"
        if closer_first:
            wait_until(lambda: closer.state == "closed" and closer.storage_mode == "shared")
            assert client.get(key) == b"closed"  # the older close, written back first
            assert opener.state != "closed"  # before: "closed" (it adopted the older close)
            assert client.get(key) == b"open"
        else:
            wait_until(lambda: opener.state != "closed" and opener.storage_mode == "shared")
            assert client.get(key) == b"open"
        wait_until(lambda: closer.state != "closed" and closer.storage_mode == "shared")
        assert client.get(key) == b"open"
    finally:
        client.close()
    assert opener.transition_counts.get(("open", "closed"), 0) == closes
    closer.close()
    opener.close()


def test_processes_half_open_after_failing_alone_adopt_a_newer_close_without_re_opening(
    redis_server: RedisServer,
) -> None:
    """The outside test's re-open after an empty restart (15 of 21 runs), made deterministic:
    while Redis is down ``early`` and then ``late`` fail their own trials and go half-open on
    their own timers (idle); then ``closer``'s own trial succeeds: the newest decision.  Redis
    restarts empty; ``late`` reaches it first and writes its older open back, then ``early``
    (an even older period) reads it, then ``closer`` writes its close.  Neither half-open
    process passes through open on the way to closed (before: ``late`` went half-open -> open
    when its own write-back started a new period at Redis's return, as did ``early`` adopting
    it), so no call is rejected and no ``breaker_opened`` alert is raised."""
    import redis

    name = "half-open-adopt-close"
    reset = 0.3
    closer, early = _outage_pair(redis_server.url, name, reset=reset)
    late, spare = _outage_pair(redis_server.url, name, reset=reset)
    spare.close()
    early.record_failure(early.admit())  # open, shared
    assert closer.state == "open" and late.state == "open"
    redis_server.kill()
    for breaker in (early, late):  # each fails its own trial alone, one after the other
        wait_until(functools.partial(_alone_until, breaker, "half-open"), timeout=30)
        breaker.record_failure(breaker.admit())
        assert breaker.state == "open"
    for breaker in (early, late):  # idle: half-open on their own timers
        wait_until(functools.partial(_alone_until, breaker, "half-open"), timeout=30)
    wait_until(lambda: _alone_until(closer, "half-open"), timeout=30)
    closer.record_success(closer.admit())  # the newest decision, taken alone
    assert closer.state == "closed"
    reopens = {b: b.transition_counts.get(("half-open", "open"), 0) for b in (early, late)}
    redis_server.start()  # empty
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    try:
        key = f"{name}:pybreaker:state"
        wait_until(lambda: late.storage_mode == "shared" or late.state != "half-open")
        assert client.get(key) == b"open"  # late's older open, written back first
        assert late.state == "half-open"  # before: "open" (a new period from Redis's return)
        assert early.state == "half-open"  # adopts late's period, timed out too
        assert early.storage_mode == "shared"
        wait_until(lambda: closer.state == "closed" and closer.storage_mode == "shared")
        assert client.get(key) == b"closed"  # the newer close wins
        wait_until(lambda: early.state == "closed" and late.state == "closed")
    finally:
        client.close()
    for breaker in (early, late):
        assert breaker.transition_counts.get(("half-open", "open"), 0) == reopens[breaker]
        assert breaker.transition_counts.get(("open", "closed"), 0) == 0
    for breaker in (closer, early, late):
        breaker.close()


def test_a_newer_open_written_back_onto_an_older_open_keeps_its_stamp_against_a_close(
    redis_server: RedisServer,
) -> None:
    """While Redis is down ``early`` fails its own trial, then ``closer`` closes alone, then
    ``late`` fails its own trial: the newest decision is ``late``'s open.  Redis restarts
    empty; ``early`` writes its (oldest) open back first, ``late`` finds the same state there
    (left as it is), then ``closer`` returns.  Its close must not win: ``late``'s later open
    is the stored decision (before, the stamp stayed ``early``'s, the close was written over
    it, and every process adopted closed: the outside test's closed -> open flip)."""
    import redis

    name = "same-state-stamp"
    reset = 0.3
    closer, early = _outage_pair(redis_server.url, name, reset=reset)
    late, spare = _outage_pair(redis_server.url, name, reset=reset)
    spare.close()
    early.record_failure(early.admit())  # open, shared
    assert closer.state == "open" and late.state == "open"
    redis_server.kill()
    wait_until(functools.partial(_alone_until, early, "half-open"), timeout=30)
    early.record_failure(early.admit())
    wait_until(functools.partial(_alone_until, closer, "half-open"), timeout=30)
    closer.record_success(closer.admit())
    assert closer.state == "closed"
    closed_at = time.time()
    wait_until(lambda: _alone_until(late, "half-open") and time.time() > closed_at + 0.01)
    late.record_failure(late.admit())  # the newest decision
    assert late.state == "open"
    redis_server.start()  # empty
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    try:
        key = f"{name}:pybreaker:state"
        wait_until(lambda: early.storage_mode == "shared" or early.state == "closed")
        wait_until(lambda: late.storage_mode == "shared" or late.state == "closed")
        assert client.get(key) == b"open"
        wait_until(lambda: closer.storage_mode == "shared" or closer.state != "closed")
        assert client.get(key) == b"open"  # before: b"closed" (the older close won)
        wait_until(lambda: closer.state != "closed")
    finally:
        client.close()
    for breaker in (closer, early, late):
        breaker.close()


def test_every_state_change_records_when_it_was_decided(redis_server: RedisServer) -> None:
    """Plain writes and the trial script's re-open stamp ``decided_at_ms``; a write older
    than the stored stamp is refused."""
    from dwcp._shared import FailoverStorage, connect

    name = "decided-stamps"
    storage = FailoverStorage(connect(redis_server.url), name)
    client = connect(redis_server.url)
    key = f"{name}:pybreaker:"
    before = int(time.time() * 1000)
    storage.state = "open"
    stamp = int(client.get(key + "decided_at_ms"))
    assert stamp >= before
    # The trial script: a claim whose deadline passed re-opens, stamped with the deadline.
    now = int(time.time() * 1000)
    client.set(key + "opened_at_ms", now - 5000)
    assert storage.claim_trial(now - 5000, now - 1000) == "granted"
    storage.end_trial()
    assert storage.claim_trial(now - 1000, now + 60_000) == "granted"  # expired, then claimed
    assert int(client.get(key + "decided_at_ms")) == max(stamp, now - 1000)
    # A decision older than Redis's is refused.
    client.set(key + "decided_at_ms", int(time.time() * 1000) + 60_000)
    storage.state = "closed"
    assert client.get(key + "state") == b"open"
    assert storage.state == "open"  # it adopts Redis's newer decision
    storage.close()


class _PeerBackOnFlag(FakeTransport):
    """A dead peer until ``work/peer-up`` exists, then a live one."""

    def __init__(self, work: str) -> None:
        super().__init__()
        self._up = os.path.join(work, "peer-up")

    def send(self, data: bytes | bytearray | memoryview) -> None:
        if not os.path.exists(self._up):
            raise ConnectionRefusedError("peer down")
        super().send(data)


def _closing_alone_process(url: str, name: str, work: str) -> None:
    """Runs in a child process: sends through the shared breaker until ``work/stop`` exists.
    Writes ``closed-alone`` once its breaker closed while Redis was unreachable, then
    ``shared-again`` once it uses Redis again, and last ``result`` (JSON): the re-opens
    after closing alone and the final state."""
    import json

    transport = _PeerBackOnFlag(work)
    manager = dwcp.Manager(
        transport, breaker_storage=url, breaker_name=name, max_failures=1, reset_timeout=0.3
    )
    manager.start()
    pace = threading.Event()
    with open(os.path.join(work, "ready"), "w"):
        pass
    closed_alone: int | None = None
    deadline = time.monotonic() + 120
    try:
        while not os.path.exists(os.path.join(work, "stop")) and time.monotonic() < deadline:
            try:
                manager.send_with_circuit_breaker(b"x")
            except (dwcp.CircuitOpenError, dwcp.TransportError):
                pass
            metrics = manager.metrics()
            reopens = metrics.breaker_transitions.get(("closed", "open"), 0)
            if closed_alone is None:
                if manager.circuit_breaker_state == "closed" and (
                    metrics.breaker_storage == "fallback"
                ):
                    closed_alone = reopens
                    open(os.path.join(work, "closed-alone"), "w").close()
            elif metrics.breaker_storage == "shared":
                open(os.path.join(work, "shared-again"), "w").close()
            pace.wait(0.005)  # pacing of a steady sender, not a synchronisation
        reopened = None if closed_alone is None else reopens - closed_alone
        state = manager.circuit_breaker_state
    finally:
        manager.stop()
    with open(os.path.join(work, "result"), "w") as out:
        json.dump({"reopened": reopened, "state": state}, out)


def test_a_process_that_closed_alone_keeps_its_close_across_processes(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    """The outside test's re-open, across processes and made deterministic with SIGSTOP: a
    child process's own trial closes its breaker while Redis is down; the child is frozen
    while Redis restarts empty and this process (still open from before the outage) writes
    its older open back first; thawed, the child keeps its newer close (before: it adopted
    the open, one ``closed -> open`` with no failed call) and the close becomes the shared
    state, which this process adopts."""
    import json
    import signal

    import redis

    name, work = "closed-alone-processes", str(tmp_path)
    opener, spare = _outage_pair(redis_server.url, name, reset=3600)
    spare.close()
    opener.record_failure(opener.admit())
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_closing_alone_process, args=(redis_server.url, name, work))
    child.start()
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    try:
        wait_until(lambda: os.path.exists(os.path.join(work, "ready")), timeout=120)
        redis_server.kill()
        open(os.path.join(work, "peer-up"), "w").close()
        wait_until(lambda: os.path.exists(os.path.join(work, "closed-alone")), timeout=60)
        assert child.pid is not None
        os.kill(child.pid, signal.SIGSTOP)
        try:
            redis_server.start()  # empty
            key = f"{name}:pybreaker:state"
            # This process's open, decided before the child's close, is written back first.
            wait_until(lambda: opener.state == "open" and client.get(key) == b"open")
        finally:
            os.kill(child.pid, signal.SIGCONT)
        wait_until(lambda: os.path.exists(os.path.join(work, "shared-again")), timeout=60)
        wait_until(lambda: client.get(key) == b"closed", timeout=30)
        wait_until(lambda: opener.state == "closed")
    finally:
        open(os.path.join(work, "stop"), "w").close()
        child.join(60)
        if child.is_alive():
            child.kill()
            child.join(10)
        client.close()
        opener.close()
    assert child.exitcode == 0
    with open(os.path.join(work, "result")) as handle:
        result = json.load(handle)
    assert result == {"reopened": 0, "state": "closed"}, result
