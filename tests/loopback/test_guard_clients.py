"""The breaker around a real client whose errors are its own: redis-py, on loopback."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import dwcp
from dwcp.testing import FakeTransport

MakeManager = Callable[..., dwcp.Manager]


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it), not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def redis_client(port: int) -> redis.Redis:
    # No client-side retries: each ping is one attempt, so the breaker sees every failure.
    return redis.Redis(
        host="127.0.0.1", port=port, socket_connect_timeout=5, retry=Retry(NoBackoff(), 0)
    )


def test_redis_connection_errors_are_not_oserrors_so_by_default_they_do_not_count(
    make_manager: MakeManager, refusing_port: int
) -> None:
    client = redis_client(refusing_port)
    manager = make_manager(FakeTransport(), max_failures=3)
    manager.start()
    for _ in range(5):
        with pytest.raises(redis.ConnectionError):
            manager.call(client.ping)
    assert manager.circuit_breaker_state == "closed"


def test_naming_redis_errors_opens_the_breaker_around_a_dead_redis(
    make_manager: MakeManager, refusing_port: int
) -> None:
    client = redis_client(refusing_port)
    pings: list[int] = []

    def ping() -> bool:
        pings.append(1)
        return bool(client.ping())

    manager = make_manager(
        FakeTransport(), call_failures=(redis.ConnectionError, redis.TimeoutError), max_failures=3
    )
    manager.start()
    for _ in range(3):
        with pytest.raises(redis.ConnectionError, match="Connection refused"):
            manager.call(ping)
    assert manager.circuit_breaker_state == "open"
    with pytest.raises(dwcp.CircuitOpenError):
        manager.call(ping)
    assert len(pings) == 3  # the rejected call never reached the client
