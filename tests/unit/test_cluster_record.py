"""The cluster record check (``parse_record``): the README's "records this version cannot read
(a field missing or of the wrong type) are skipped" holds inside the health document too, and
for an interval or bound no publisher can announce."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from typing import Any

import pytest

from dwcp._cluster_schema import (
    BOUND_MAX,
    INTERVAL_MAX,
    check_health,
    make_record,
    parse_record,
)
from dwcp._health import ComponentHealth, HealthSnapshot
from dwcp.cluster import ClusterMember, snapshot_document

SNAPSHOT = HealthSnapshot(
    components={"transport": ComponentHealth("transport", "recovering", "boom", 1.25, 0.5)},
    breaker_state="half-open",
    breaker_storage="shared",
)


def _good() -> dict[str, Any]:
    """A record exactly as a publisher writes it, from a real snapshot."""
    raw = make_record(
        "n1",
        host="h",
        pid=1,
        interval=0.5,
        bound=1.5,
        seq=3,
        left=False,
        health=snapshot_document(SNAPSHOT),
    )
    record: dict[str, Any] = json.loads(raw)
    return record


def _with_health(**fields: Any) -> str:
    record = _good()
    record["health"] = dict(record["health"], **fields)
    return json.dumps(record)


def _with_component(**fields: Any) -> str:
    record = _good()
    component = dict(record["health"]["components"]["transport"], **fields)
    record["health"]["components"] = {"transport": component}
    return json.dumps(record)


def _with(**fields: Any) -> str:
    return json.dumps(dict(_good(), **fields))


def test_a_record_as_a_publisher_writes_it_is_read_back_whole() -> None:
    record = parse_record(json.dumps(_good()))
    assert record is not None
    assert record["health"] == snapshot_document(SNAPSHOT)


@pytest.mark.parametrize(
    "health",
    [
        {},  # the goodbye of a node that never published a snapshot
        {"status": "healthy"},  # a partial document handed to publish()
        {"status": "unhealthy", "breaker": "open", "future_field": [1, 2]},  # extras ignored
        {"components": {"db": {"status": "failed", "last_error": None}}},
    ],
)
def test_a_partial_health_document_with_fields_of_the_right_type_is_read(
    health: dict[str, Any],
) -> None:
    assert parse_record(_with(health=health)) is not None


WRONG_HEALTH = {
    "status an int": _with_health(status=5),
    "status not a verdict": _with_health(status="fine"),
    "breaker a list": _with_health(breaker=[1]),
    "breaker_storage an int": _with_health(breaker_storage=1),
    "components a string": _with_health(components="x"),
    "component an int": _with_health(components={"transport": 5}),
    "component status an int": _with_component(status=5),
    "component status unknown": _with_component(status="ok"),
    "component last_error an int": _with_component(last_error=5),
    "component seconds_in_status a string": _with_component(seconds_in_status="1"),
    "component suspicion negative": _with_component(suspicion=-1),
    "component suspicion NaN": _with_component(suspicion=float("nan")),
    "health a list": _with(health=[1, 2]),
}


@pytest.mark.parametrize("raw", WRONG_HEALTH.values(), ids=WRONG_HEALTH.keys())
def test_a_health_document_with_a_field_of_the_wrong_type_is_skipped(raw: str) -> None:
    assert parse_record(raw) is None


WRONG_TIMING = {
    "bound 1e308": _with(bound=1e308),
    "interval and bound 1e308": _with(bound=1e308, interval=1e308),
    "bound Infinity": _with(bound=float("inf")),
    "interval NaN": _with(interval=float("nan")),
    "bound zero": _with(bound=0),
    "interval zero": _with(interval=0),
    "bound negative": _with(bound=-1),
    "bound past BOUND_MAX": _with(bound=BOUND_MAX * 1.01),
    "interval past INTERVAL_MAX": _with(interval=INTERVAL_MAX * 1.01),
    "bound null": _with(bound=None),
    "interval a string": _with(interval="0.5"),
}


@pytest.mark.parametrize("raw", WRONG_TIMING.values(), ids=WRONG_TIMING.keys())
def test_an_interval_or_bound_no_publisher_can_announce_is_skipped(raw: str) -> None:
    assert parse_record(raw) is None


def test_the_longest_interval_and_bound_a_publisher_can_announce_are_read() -> None:
    assert parse_record(_with(interval=INTERVAL_MAX, bound=BOUND_MAX)) is not None
    # ...and a member refuses to announce more (construction needs no Redis).
    ClusterMember("redis://127.0.0.1:9", "n1", interval=timedelta(days=1), lost_after=7)
    with pytest.raises(ValueError, match="interval must be at most 86400"):
        ClusterMember("redis://127.0.0.1:9", "n1", interval=INTERVAL_MAX * 1.01)
    with pytest.raises(ValueError, match="the bound"):
        ClusterMember("redis://127.0.0.1:9", "n1", interval=INTERVAL_MAX, lost_after=7.01)
    with pytest.raises(ValueError, match="interval must be at least 0.001"):
        ClusterMember("redis://127.0.0.1:9", "n1", interval=0.0005)


def test_publish_refuses_a_document_readers_would_skip() -> None:
    member = ClusterMember("redis://127.0.0.1:9", "n1")  # never started: no I/O
    try:
        with pytest.raises(ValueError, match="health.status"):
            member.publish({"status": "fine"})
        with pytest.raises(TypeError, match="health.components"):
            member.publish({"components": "x"})
        member.publish({"status": "healthy"})  # a partial document is fine
        member.publish(SNAPSHOT)
    finally:
        member.close()


def test_check_health_names_the_field() -> None:
    with pytest.raises(TypeError, match=r"health.components\['transport'\] must be an object"):
        check_health({"components": {"transport": 5}})
    with pytest.raises(TypeError, match="health.breaker must be a string"):
        check_health({"breaker": [1]})


def test_bad_member_and_reader_arguments_are_typed_errors() -> None:
    from dwcp.cluster import cluster_health

    with pytest.raises(TypeError, match="watch must be a bool"):
        ClusterMember("redis://127.0.0.1:9", "n1", watch="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="namespace must be a string"):
        cluster_health("redis://127.0.0.1:9", namespace=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="namespace must be a string"):
        ClusterMember("redis://127.0.0.1:9", "n1", namespace=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="namespace"):
        cluster_health("redis://127.0.0.1:9", namespace="")
    with pytest.raises(TypeError, match="lost_after must be a number"):
        ClusterMember("redis://127.0.0.1:9", "n1", lost_after="3")  # type: ignore[arg-type]


def test_every_duration_of_a_member_takes_a_timedelta() -> None:
    member = ClusterMember(
        "redis://127.0.0.1:9",
        "n1",
        interval=timedelta(seconds=1),
        retention=timedelta(minutes=1),
        timeout=timedelta(milliseconds=500),
    )
    assert member.bound == 3.0
    member.start()  # nobody listens on port 9: logged, and the thread runs
    member.close(timedelta(seconds=5))  # joins the thread (a TypeError before)
    assert not any(t.name == "dwcp-cluster" and t.is_alive() for t in threading.enumerate())
