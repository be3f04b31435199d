"""The shared breaker storage on a real redis-server: opened_at in milliseconds, and other
processes' changes heard through pub/sub instead of the next poll."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pybreaker
import pytest

from dwcp._shared import FailoverStorage, connect
from tests._redis import RedisServer, redis_server
from tests.conftest import wait_until

__all__ = ["redis_server"]  # the fixture, imported for pytest

MakeStorage = Callable[[str], FailoverStorage]


@pytest.fixture
def make_storage(redis_server: RedisServer) -> Iterator[MakeStorage]:
    made: list[FailoverStorage] = []

    def make(name: str) -> FailoverStorage:
        storage = FailoverStorage(connect(redis_server.url), name, retry_interval=0.1)
        made.append(storage)
        return storage

    yield make
    for storage in made:
        storage.close()


def _watcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dwcp-breaker-watch"]


def test_opened_at_keeps_milliseconds_across_processes(make_storage: MakeStorage) -> None:
    writer, reader = make_storage("ms-1"), make_storage("ms-1")
    moment = datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=timezone.utc)
    writer.opened_at = moment
    assert reader.opened_at == moment
    # Only later moments win, as in pybreaker's own set-if-greater.
    writer.opened_at = moment - timedelta(seconds=5)
    assert reader.opened_at == moment


def test_plain_pybreaker_still_reads_whole_seconds(
    redis_server: RedisServer, make_storage: MakeStorage
) -> None:
    make_storage("ms-2").opened_at = datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=timezone.utc)
    client: Any = connect(redis_server.url)
    try:
        plain = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, client, namespace="ms-2")
        assert plain.opened_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
        # And a later open written by plain pybreaker (seconds only) is seen by us.
        plain.opened_at = datetime(2026, 1, 2, 3, 5, 0, tzinfo=timezone.utc)
        assert make_storage("ms-2").opened_at == datetime(2026, 1, 2, 3, 5, 0, tzinfo=timezone.utc)
    finally:
        client.close()


def test_another_process_change_is_heard_at_once_and_our_own_is_not(
    make_storage: MakeStorage,
) -> None:
    watcher, changer = make_storage("notify-1"), make_storage("notify-1")
    heard = threading.Semaphore(0)
    count = [0]

    def on_change() -> None:
        count[0] += 1
        heard.release()

    watcher.on_remote_change(on_change)
    watcher.on_remote_change(on_change)  # the same callback once only
    assert heard.acquire(timeout=5)  # the first subscription calls back once
    changer.state = pybreaker.STATE_OPEN
    assert heard.acquire(timeout=5)
    assert watcher.state == pybreaker.STATE_OPEN
    before = count[0]
    watcher.state = pybreaker.STATE_HALF_OPEN  # our own change: nothing to hear
    changer.state = pybreaker.STATE_CLOSED  # a marker after it: messages arrive in order
    assert heard.acquire(timeout=5)
    assert count[0] == before + 1
    assert len(_watcher_threads()) == 1
    watcher.close()
    assert not _watcher_threads()


def test_the_subscriber_comes_back_after_an_empty_restart(
    redis_server: RedisServer, make_storage: MakeStorage
) -> None:
    watcher, changer = make_storage("notify-2"), make_storage("notify-2")
    heard = threading.Semaphore(0)
    watcher.on_remote_change(heard.release)
    assert heard.acquire(timeout=5)
    redis_server.kill()
    redis_server.start()
    # Resubscribed: it calls back once for what it may have missed...
    assert heard.acquire(timeout=10)
    # ...and hears changes again (the changer's first write may find Redis gone and fail
    # over, so keep changing until one is heard).
    wait_until(lambda: _change_heard(changer, heard), timeout=10)
    watcher.close()
    assert not _watcher_threads()


def _change_heard(changer: FailoverStorage, heard: threading.Semaphore) -> bool:
    changer.state = pybreaker.STATE_OPEN
    return heard.acquire(timeout=0.2)


def test_close_stops_the_subscriber_while_redis_is_down(
    redis_server: RedisServer, make_storage: MakeStorage
) -> None:
    watcher = make_storage("notify-3")
    heard = threading.Semaphore(0)
    watcher.on_remote_change(heard.release)
    assert heard.acquire(timeout=5)
    redis_server.kill()
    wait_until(lambda: _watcher_threads() != [])
    watcher.close(timeout=5)
    assert not _watcher_threads()
    with pytest.raises(TypeError, match="callback"):
        watcher.on_remote_change(42)  # type: ignore[arg-type]


def test_an_idle_manager_hears_another_open_the_breaker_at_once(
    redis_server: RedisServer,
) -> None:
    import dwcp
    from dwcp.testing import FakeTransport

    def make(transport: FakeTransport) -> dwcp.Manager:
        return dwcp.Manager(
            transport, breaker_storage=redis_server.url, breaker_name="notify-4",
            max_failures=1, reset_timeout=3600,
        )  # fmt: skip

    failing = FakeTransport()
    failing.fail_sends = OSError("peer down")
    opener, idle = make(failing), make(FakeTransport())
    opened = threading.Event()
    idle.add_listener(
        lambda e: (
            opened.set() if isinstance(e, dwcp.BreakerStateChanged) and e.new == "open" else None
        )
    )
    opener.start()
    idle.start()
    try:
        with pytest.raises(dwcp.TransportError):
            opener.send_with_circuit_breaker(b"x")
        # The idle manager sends nothing and reads nothing: only the change channel tells it.
        assert opened.wait(5)
    finally:
        opener.stop()
        idle.stop()
    assert not _watcher_threads()
