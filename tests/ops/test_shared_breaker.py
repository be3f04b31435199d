"""One breaker shared through a real redis-server by several manager processes."""

from __future__ import annotations

import multiprocessing
import os
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
