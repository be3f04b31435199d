"""Learned outage timing shared through the cluster's Redis: a new process starts warm."""

from __future__ import annotations

import pytest
import redis

import dwcp
from dwcp._learning import DelayGuard
from dwcp._prediction import WINDOW, Outage, RecoveryHistory
from dwcp._shared_history import decode_outage, encode_outage, history_key
from dwcp.cluster import ClusterMember
from dwcp.testing import FakeClock, FakeLayer
from tests._outage import OutagePeer, run_outage
from tests._redis import RedisServer, free_port, redis_server
from tests.conftest import wait_until

__all__ = ["redis_server"]  # the fixture, imported for pytest


@pytest.fixture(autouse=True)
def guard_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The delay guard lets learned schedules run: these tests share outages of one constant
    length, whose identical delays leave the guard's median-room check no room
    (tests/unit/test_prediction_safety.py tests the guard)."""
    monkeypatch.setattr(DelayGuard, "allows", property(lambda self: True))


KEY = history_key("dwcp", "shared", "transport")


def make_manager(url: str, node: str) -> tuple[dwcp.Manager, FakeClock, OutagePeer]:
    clock = FakeClock()
    peer = OutagePeer(clock)
    manager = dwcp.Manager(
        peer,
        health_interval=3600.0,  # passes are run by the test, on the fake clock
        recovery={"transport": dwcp.RecoveryPolicy(predictive=True)},
        clock=clock,
        breaker_name="shared",
        cluster=url,
        node_id=node,
    )
    return manager, clock, peer


def test_a_second_manager_starts_with_the_history_the_first_learned(
    redis_server: RedisServer,
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    first, clock, peer = make_manager(redis_server.url, "first")
    first.start()
    try:
        for _ in range(8):
            run_outage(first, clock, peer, 6.0)
        # Each outage is written by the pass after it (the cluster thread's, not the
        # recovery's); the last one by the pass that follows.
        first.check_component_health()
        wait_until(lambda: client.llen(KEY) == 8)
    finally:
        first.stop()
    stored = [decode_outage(raw) for raw in client.lrange(KEY, 0, -1)]
    assert all(o is not None and 6.0 <= o.recovered_after <= 7.0 for o in stored)
    learned = RecoveryHistory()
    learned.preload([o for o in stored if o is not None])
    expected = learned.schedule([1.0, 2.0, 4.0], 0.0, 60.0)
    assert expected is not None and list(expected) != [1.0, 2.0, 4.0]

    second, clock2, peer2 = make_manager(redis_server.url, "second")
    second.start()
    try:
        # Its very first outage is recovered on the learned schedule, not 1 s/2 s/4 s.
        waits = run_outage(second, clock2, peer2, 6.0)
        assert waits == list(expected)[: len(waits)]
        second.check_component_health()
        wait_until(lambda: client.llen(KEY) == 9)  # and it shares its own
    finally:
        second.stop()
        client.close()


def test_the_shared_list_is_capped_and_foreign_entries_are_skipped(
    redis_server: RedisServer,
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.rpush(KEY, "not json", encode_outage(Outage(3.0, 1.0, 2, 3.0)))
    member = ClusterMember(redis_server.url, "capped", interval=0.05)
    shared = member.outage_history("shared", "transport")
    member.start()  # the one read
    try:
        assert shared.take() == [Outage(3.0, 1.0, 2, 3.0)]
        for n in range(WINDOW + 10):
            shared.push(Outage(7.0, 3.0, 3, 7.0 - n / 1000))
        member.publish({"status": "healthy"})  # the next pass writes them
        wait_until(lambda: not shared.pending())
        assert client.llen(KEY) == WINDOW
        newest = decode_outage(client.lindex(KEY, -1))
        assert newest == Outage(7.0, 3.0, 3, 7.0 - (WINDOW + 9) / 1000)
    finally:
        member.close()
        client.close()


def test_an_unreachable_redis_leaves_recovery_learning_locally() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens
    manager, clock, peer = make_manager(url, "alone")
    manager.start()
    try:
        schedules = [run_outage(manager, clock, peer, 6.0) for _ in range(7)]
    finally:
        manager.stop()
    # The configured schedule until enough outages are known here, then a learned one.
    assert schedules[:5] == [[1.0, 2.0, 4.0]] * 5
    assert schedules[5] != [1.0, 2.0, 4.0]


@pytest.mark.parametrize(
    "raw",
    [b"{}", b"[]", b'{"r": 1, "n": 2, "a": null, "b": 1}', b'{"r": 1, "n": 0, "a": true, "b": 1}'],
)
def test_entries_that_are_not_outages_decode_to_none(raw: bytes) -> None:
    assert decode_outage(raw) is None


def test_an_outage_survives_its_encoding() -> None:
    for outage in (Outage(7.11, 3.06, 3, 7.06), Outage(12.0, 1.0, None, 12.0)):
        assert decode_outage(encode_outage(outage).encode()) == outage


def test_only_components_that_learn_get_a_shared_history() -> None:
    # Constructed, never started: no Redis I/O. The transport is predictive, the protocol
    # layer is not; only the transport's list is read at start and written after outages.
    clock = FakeClock()
    manager = dwcp.Manager(
        OutagePeer(clock),
        layers={"protocol": FakeLayer()},
        health_interval=3600.0,
        recovery={"transport": dwcp.RecoveryPolicy(predictive=True)},
        clock=clock,
        breaker_name="shared",
        cluster=f"redis://127.0.0.1:{free_port()}",
        node_id="solo",
    )
    member = manager._cluster
    assert member is not None
    assert list(member._histories) == [KEY]
