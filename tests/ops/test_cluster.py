"""Cluster health on a real redis-server: publishing, reading, lost/back, clashes, outages."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import dwcp
from dwcp.cluster import ClusterError, ClusterMember, cluster_health
from dwcp.prometheus import register_metrics
from dwcp.testing import FakeTransport
from tests._redis import RedisServer, free_port, redis_server
from tests.conftest import wait_until

__all__ = ["redis_server"]  # the fixture, imported for pytest

MakeMember = Callable[..., ClusterMember]


@pytest.fixture
def make_member(redis_server: RedisServer) -> Iterator[MakeMember]:
    """Cluster members on the test's Redis with short intervals; all closed at teardown."""
    made: list[ClusterMember] = []

    def make(node_id: str, **options: Any) -> ClusterMember:
        options.setdefault("interval", 0.1)
        member = ClusterMember(redis_server.url, node_id, **options)
        made.append(member)
        member.start()
        return member

    yield make
    for member in made:
        member.close()


class Heartbeat:
    """Publishes a member's snapshot every ``period`` seconds on a thread, until stopped."""

    def __init__(self, member: ClusterMember, period: float = 0.05, status: str = "healthy"):
        self.member = member
        self.status = status
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), name="test-heartbeat")
        self._thread.start()

    def _run(self, period: float) -> None:
        while True:
            self.member.publish({"status": self.status, "breaker": "closed"})
            if self._stop.wait(period):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def heartbeats() -> Iterator[Callable[..., Heartbeat]]:
    started: list[Heartbeat] = []

    def start(member: ClusterMember, **options: Any) -> Heartbeat:
        beat = Heartbeat(member, **options)
        started.append(beat)
        return beat

    yield start
    for beat in started:
        beat.stop()


def test_every_node_is_read_back_with_its_snapshot_and_age(
    redis_server: RedisServer, make_member: MakeMember, heartbeats: Callable[..., Heartbeat]
) -> None:
    a, b = make_member("a"), make_member("b")
    heartbeats(a)
    heartbeats(b, status="unhealthy")
    wait_until(lambda: set(a.view().nodes) == {"a", "b"})
    view = cluster_health(redis_server.url)
    assert not view.stale and set(view.nodes) == {"a", "b"}
    assert view.nodes["a"].alive and view.nodes["a"].healthy
    assert view.nodes["b"].alive and not view.nodes["b"].healthy
    assert not view.healthy  # b says it is unhealthy
    assert view.nodes["a"].snapshot["breaker"] == "closed"
    assert 0 <= view.nodes["a"].age < view.nodes["a"].bound
    assert view.nodes["a"].bound == pytest.approx(0.3)  # lost_after 3 x interval 0.1
    first = view.nodes["a"].heartbeats
    wait_until(lambda: cluster_health(redis_server.url).nodes["a"].heartbeats > first)


def test_a_silent_node_is_lost_within_its_bound_and_back_when_heard_again(
    make_member: MakeMember, heartbeats: Callable[..., Heartbeat]
) -> None:
    events: list[object] = []
    watcher = make_member("watcher", on_event=events.append)
    silent = make_member("silent", interval=0.1, lost_after=3)
    heartbeats(watcher)
    beat = heartbeats(silent)
    wait_until(lambda: watcher.view().nodes.get("silent", None) is not None)
    wait_until(lambda: watcher.view().nodes["silent"].alive)
    beat.stop()
    wait_until(lambda: any(isinstance(e, dwcp.NodeLost) for e in events), timeout=5)
    lost = next(e for e in events if isinstance(e, dwcp.NodeLost))
    assert lost.node == "silent" and lost.reason == "silent"
    assert lost.silent_for >= lost.bound == pytest.approx(0.3)  # never declared early
    assert watcher.view().lost == ("silent",)
    heartbeats(silent)
    wait_until(lambda: any(isinstance(e, dwcp.NodeBack) for e in events), timeout=5)
    back = next(e for e in events if isinstance(e, dwcp.NodeBack))
    assert back.node == "silent" and back.down_for >= 0
    # Polled, not read once: on a loaded machine the 0.1 s heartbeats can lapse past the
    # 0.3 s bound again right after NodeBack.
    wait_until(lambda: watcher.view().nodes["silent"].alive)
    assert all(getattr(e, "node", None) != "watcher" for e in events)  # never about itself


def test_a_clean_close_is_reported_as_left(
    make_member: MakeMember, heartbeats: Callable[..., Heartbeat]
) -> None:
    events: list[object] = []
    watcher = make_member("watcher", on_event=events.append)
    leaver = make_member("leaver")
    heartbeats(watcher)
    beat = heartbeats(leaver)
    wait_until(lambda: "leaver" in watcher.view().nodes and watcher.view().nodes["leaver"].alive)
    beat.stop()
    leaver.close()
    wait_until(lambda: watcher.view().nodes["leaver"].state == "left")
    wait_until(lambda: dwcp.NodeLost("leaver", 0, 0, "left") in _normalised(events))


def _normalised(events: list[object]) -> list[object]:
    return [
        dwcp.NodeLost(e.node, 0, 0, e.reason) if isinstance(e, dwcp.NodeLost) else e for e in events
    ]


def test_records_expire_so_a_dead_node_cannot_live_forever(
    redis_server: RedisServer, make_member: MakeMember
) -> None:
    dead = make_member("dead", interval=0.1, retention=0.5, watch=False)
    dead.publish({"status": "healthy"})
    client: Any = redis_server.client()
    try:
        key = "dwcp:cluster:node:dead"
        wait_until(lambda: client.exists(key))
        assert 0 < client.pttl(key) <= 500
        # Never publishes again (its heartbeats stopped): the entry goes by itself.
        wait_until(lambda: not client.exists(key), timeout=5)
        assert "dead" not in cluster_health(redis_server.url).nodes
    finally:
        client.close()


def test_a_node_id_clash_is_warned_about_and_never_overwrites(
    make_member: MakeMember, heartbeats: Callable[..., Heartbeat]
) -> None:
    first = make_member("same")
    heartbeats(first)
    wait_until(lambda: "same" in first.view().nodes)
    second = make_member("same")
    beat = heartbeats(second, status="unhealthy")
    wait_until(lambda: second.clash is not None)
    assert first.clash is None
    assert first.view().nodes["same"].healthy  # the first one's snapshot, not the intruder's
    first.close()  # frees the id at once
    wait_until(lambda: second.clash is None and second.published > 0)
    wait_until(lambda: not second.view().nodes["same"].healthy)
    beat.stop()


def test_bad_arguments_are_clear(redis_server: RedisServer) -> None:
    with pytest.raises(ValueError, match="cluster URL must start with redis://"):
        dwcp.Manager(FakeTransport(), cluster="http://127.0.0.1:6379")
    with pytest.raises(TypeError, match="cluster must be a redis.Redis client"):
        dwcp.Manager(FakeTransport(), cluster=42)
    with pytest.raises(TypeError, match="^target must be a redis.Redis client"):
        cluster_health(5)  # named "cluster" before the outside attack on #21
    with pytest.raises(ValueError, match="node_id needs cluster"):
        dwcp.Manager(FakeTransport(), node_id="x")
    with pytest.raises(ValueError, match="node_id"):
        dwcp.Manager(FakeTransport(), cluster=redis_server.url, node_id="has space")
    with pytest.raises(TypeError, match="node_id"):
        ClusterMember(redis_server.url, 7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lost_after"):
        ClusterMember(redis_server.url, "x", lost_after=1)
    with pytest.raises(ValueError, match="interval"):
        ClusterMember(redis_server.url, "x", interval=-1)
    with pytest.raises(ValueError, match="retention"):
        ClusterMember(redis_server.url, "x", interval=1, retention=2)
    with pytest.raises(ValueError, match="namespace"):
        cluster_health(redis_server.url, namespace="")


def test_unreachable_redis_at_start_is_logged_and_reported_stale_not_raised() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    manager = dwcp.Manager(FakeTransport(), cluster=url, node_id="alone", health_interval=0.05)
    manager.start()
    try:
        view = manager.cluster_health()
        assert view.stale and view.error is not None
        manager.send_with_circuit_breaker(b"still works")
        wait_until(lambda: manager.metrics().health_checks >= 2)  # the monitor goes on
        assert manager.monitor_alive
    finally:
        manager.stop()
    with pytest.raises(ClusterError, match="cannot read the cluster"):
        cluster_health(url, timeout=0.2)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def test_manager_publishes_each_pass_and_serves_the_cluster(
    redis_server: RedisServer, make_member: MakeMember, heartbeats: Callable[..., Heartbeat]
) -> None:
    events: list[object] = []
    other = make_member("other")
    beat = heartbeats(other)
    manager = dwcp.Manager(
        FakeTransport(),
        cluster=redis_server.url,
        node_id="m1",
        health_interval=0.05,
        health_check_timeout=0.1,
        health_port=0,
    )
    manager.add_listener(events.append)
    manager.start()
    try:
        wait_until(lambda: set(manager.cluster_health().nodes) == {"m1", "other"})
        wait_until(lambda: manager.cluster_health().healthy)
        seen = cluster_health(redis_server.url).nodes["m1"]
        assert seen.snapshot["components"]["transport"]["status"] == "healthy"
        assert seen.interval == pytest.approx(0.15)  # health_interval + health_check_timeout
        wait_until(lambda: cluster_health(redis_server.url).nodes["m1"].heartbeats > 3)

        assert manager.health_url is not None
        code, body = _get(manager.health_url + "/cluster")
        document = json.loads(body)
        assert code == 200 and document["status"] == "healthy"
        assert set(document["nodes"]) == {"m1", "other"} and document["stale"] is False

        registry = CollectorRegistry()
        register_metrics(manager, registry)
        text = generate_latest(registry).decode()
        assert 'dwcp_cluster_node_up{manager="dwcp",node="m1"} 1.0' in text
        assert 'dwcp_cluster_view_stale{manager="dwcp"} 0.0' in text

        beat.stop()
        wait_until(lambda: any(isinstance(e, dwcp.NodeLost) for e in events), timeout=5)
        code, body = _get(manager.health_url + "/cluster")
        assert code == 503 and json.loads(body)["lost"] == ["other"]
        wait_until(
            lambda: 'dwcp_cluster_node_up{manager="dwcp",node="other"} 0.0' in _scrape(registry)
        )
    finally:
        manager.stop()
    assert cluster_health(redis_server.url).nodes["m1"].state == "left"


def _scrape(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_without_a_cluster_nothing_changes(make_manager: Callable[..., dwcp.Manager]) -> None:
    manager = make_manager(FakeTransport(), health_port=0)
    manager.start()
    with pytest.raises(dwcp.DWCPError, match="no cluster"):
        manager.cluster_health()
    assert manager.health_url is not None
    assert _get(manager.health_url + "/cluster")[0] == 404
    registry = CollectorRegistry()
    register_metrics(manager, registry)
    assert "dwcp_cluster" not in _scrape(registry)


def test_a_paused_redis_makes_the_view_stale_not_wrong(
    redis_server: RedisServer, make_member: MakeMember, heartbeats: Callable[..., Heartbeat]
) -> None:
    events: list[object] = []
    watcher = make_member("watcher", on_event=events.append)
    heartbeats(watcher)
    heartbeats(make_member("peer"))
    wait_until(lambda: len(watcher.view().nodes) == 2 and watcher.view().healthy)
    redis_server.pause()
    try:
        wait_until(lambda: watcher.view().stale, timeout=5)
        view = watcher.view()
        # What was known, marked stale: nobody is declared lost for Redis's silence.
        assert set(view.nodes) == {"watcher", "peer"} and not view.lost
        assert not view.healthy and view.error is not None
        wait_until(lambda: watcher.view().age > 3 * 0.1 * 2)  # well past every bound
        assert not watcher.view().lost
    finally:
        redis_server.resume()
    wait_until(lambda: not watcher.view().stale and watcher.view().healthy, timeout=10)
    assert not any(isinstance(e, dwcp.NodeLost) for e in events)


def test_status_cluster_exit_codes(
    redis_server: RedisServer,
    make_member: MakeMember,
    heartbeats: Callable[..., Heartbeat],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dwcp._cli import main

    beat = heartbeats(make_member("n1"))
    heartbeats(make_member("n2"))
    wait_until(lambda: len(cluster_health(redis_server.url).nodes) == 2)
    wait_until(lambda: main(["status", "--cluster", redis_server.url]) == 0)
    out = capsys.readouterr().out
    assert "2/2 nodes alive" in out and "n1" in out and "alive" in out
    beat.status = "unhealthy"
    wait_until(lambda: main(["status", "--cluster", redis_server.url]) == 1)
    assert "UNHEALTHY" in capsys.readouterr().out
    assert main(["status", "--cluster", redis_server.url, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["nodes"]["n1"]["healthy"] is False
    down = f"redis://127.0.0.1:{free_port()}/0"
    assert main(["status", "--cluster", down, "--timeout", "0.2"]) == 2
    assert "cannot read the cluster" in capsys.readouterr().err
    result = subprocess.run(
        [sys.executable, "-m", "dwcp", "status", "--cluster", redis_server.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1 and "n2" in result.stdout


def test_importing_dwcp_and_the_cluster_module_needs_no_redis() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "import dwcp, dwcp.cluster\n"
        "try:\n"
        "    dwcp.Manager(cluster='redis://127.0.0.1:1')\n"
        "except ImportError as exc:\n"
        "    print('needs', exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'dwcp[redis]'" in result.stdout


def test_a_configured_member_can_be_handed_to_the_manager(
    redis_server: RedisServer, make_member: MakeMember
) -> None:
    member = ClusterMember(redis_server.url, "quiet", interval=0.2, watch=False)
    with pytest.raises(ValueError, match="node_id cannot be given"):
        dwcp.Manager(FakeTransport(), cluster=member, node_id="other")
    manager = dwcp.Manager(FakeTransport(), cluster=member, health_interval=0.05)
    manager.start()
    try:
        wait_until(lambda: "quiet" in cluster_health(redis_server.url).nodes)
        assert cluster_health(redis_server.url).nodes["quiet"].interval == pytest.approx(0.2)
        assert manager.cluster_health().stale  # it never reads (watch=False)
    finally:
        manager.stop()
    # Restartable: the member closed with the manager and starts again with it.
    manager.start()
    try:
        wait_until(lambda: cluster_health(redis_server.url).nodes["quiet"].alive)
    finally:
        manager.stop()


def _node(name: str, state: str, healthy: bool = True) -> Any:
    from dwcp.cluster import NodeHealth

    return NodeHealth(name, state, healthy, 0.1, 3.0, 1.0, 5, "host", 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("states", "stale", "healthy"),
    [
        ({"a": ("alive", True), "b": ("alive", True)}, False, True),
        ({"a": ("alive", True), "b": ("alive", False)}, False, False),
        ({"a": ("alive", True), "b": ("lost", True)}, False, False),
        ({"a": ("alive", True), "b": ("left", False)}, False, True),  # left on purpose
        ({"b": ("left", True)}, False, False),  # nobody is left
        ({}, False, False),
        ({"a": ("alive", True)}, True, False),  # stale: not news
    ],
)
def test_the_cluster_verdict(
    states: dict[str, tuple[str, bool]], stale: bool, healthy: bool
) -> None:
    from types import MappingProxyType

    from dwcp.cluster import ClusterView, cluster_document, render_cluster

    nodes = {name: _node(name, state, ok) for name, (state, ok) in states.items()}
    view = ClusterView(MappingProxyType(nodes), stale, "boom" if stale else None, 0.0, "dwcp")
    assert view.healthy is healthy
    assert cluster_document(view)["status"] == ("healthy" if healthy else "unhealthy")
    assert render_cluster(view).startswith(
        "DWCP cluster 'dwcp' " + ("healthy" if healthy else "UNHEALTHY")
    )


def test_webhooks_deduplicate_node_events_per_node() -> None:
    from dwcp.webhook import WebhookNotifier

    notifier = WebhookNotifier("http://127.0.0.1:9/hook", events=("node_lost", "node_back"))
    try:
        notifier(dwcp.NodeLost("a", 1.0, 0.9, manager="m"))
        notifier(dwcp.NodeLost("b", 1.0, 0.9, manager="m"))  # another node: not a repeat
        notifier(dwcp.NodeLost("a", 1.2, 0.9, manager="m"))  # a repeat: suppressed
        assert notifier.pending == 2
        notifier(dwcp.NodeBack("a", 3.0, manager="m"))
        notifier(dwcp.NodeLost("a", 1.0, 0.9, manager="m"))  # back cleared it: posted again
        assert notifier.pending == 4
    finally:
        notifier.close(timeout=0.1)


def test_a_publisher_that_saw_an_outage_says_goodbye_once_redis_answers(
    redis_server: RedisServer, make_member: MakeMember
) -> None:
    member = make_member("blip", watch=False)

    def published_one_more(than: int) -> bool:
        member.publish({"status": "healthy"})
        return member.published > than

    wait_until(lambda: published_one_more(0))
    redis_server.pause()
    try:
        member.publish({"status": "healthy"})
        wait_until(lambda: member.errors >= 1, timeout=5)
    finally:
        redis_server.resume()
    count = member.published
    wait_until(lambda: published_one_more(count), timeout=10)
    member.close()
    assert cluster_health(redis_server.url).nodes["blip"].state == "left"


# -- issue 21: first sight, malformed records, outages past retention, restarts ---------------


def _silent_node(make_member: MakeMember, node_id: str, **options: Any) -> ClusterMember:
    """A member that publishes once and then never again (its process hung or died)."""
    member = make_member(node_id, watch=False, **options)
    member.publish({"status": "healthy", "breaker": "closed"})
    wait_until(lambda: member.published >= 1)
    return member


def test_a_node_already_dead_when_first_seen_is_listed_lost_at_once_without_an_event(
    redis_server: RedisServer, make_member: MakeMember
) -> None:
    _silent_node(make_member, "dead")
    wait_until(lambda: cluster_health(redis_server.url).lost == ("dead",))
    events: list[object] = []
    watcher = make_member("watcher", on_event=events.append)
    seen: list[str] = []

    def first_read() -> bool:
        view = watcher.view()
        if not view.stale and "dead" in view.nodes:
            seen.append(view.nodes["dead"].state)
        return bool(seen)

    wait_until(first_read)
    # From its very first read, as the one-shot reader and the CLI say: never alive.
    assert seen[0] == "lost" and watcher.view().lost == ("dead",)
    assert not watcher.view().healthy
    from dwcp._cli import main

    assert main(["status", "--cluster", redis_server.url]) == 1
    count = watcher.round_trips
    wait_until(lambda: watcher.round_trips > count + 10)  # several more reads
    assert watcher.view().nodes["dead"].state == "lost"
    assert events == []  # listed lost, without an event


def _plant(client: Any, node_id: str | bytes, record: str | bytes) -> None:
    """Put a record in the cluster as a (broken or foreign) node would."""
    import time as _time

    client.zadd("dwcp:cluster:nodes", {node_id: int(_time.time() * 1000)})
    key = b"dwcp:cluster:node:" + (node_id if isinstance(node_id, bytes) else node_id.encode())
    client.set(key, record, px=60_000)


def _record(**fields: Any) -> str:
    record = {
        "v": 1, "node": "x", "host": "h", "pid": 1, "interval": 0.1, "bound": 0.3, "seq": 1,
        "left": False, "health": {"status": "healthy"},
    }  # fmt: skip
    record.update(fields)
    return json.dumps(record)


def test_malformed_records_are_skipped_and_counted_never_fatal(
    redis_server: RedisServer,
    make_member: MakeMember,
    heartbeats: Callable[..., Heartbeat],
    capsys: pytest.CaptureFixture[str],
) -> None:
    client: Any = redis_server.client()
    try:
        _plant(client, "typed", _record(interval="ten"))  # a wrongly typed field
        _plant(client, "future", _record(v=2))  # another record version
        _plant(client, "boolean", _record(v=True))  # not the version 1 either
        _plant(client, "corrupt", b'{"v": 1, "node":')  # corrupt JSON
        _plant(client, "binary", b"\xff\xfe")  # not even text
        _plant(client, b"\xff-id", _record())  # an id no node writes
    finally:
        client.close()
    watcher = make_member("watcher")
    leaver = make_member("leaver")
    heartbeats(watcher)
    beat = heartbeats(leaver)
    wait_until(lambda: set(watcher.view().nodes) == {"watcher", "leaver"})
    view = watcher.view()
    assert not view.stale and view.skipped == 6 and view.healthy
    # Passes go on: a node that departs is seen to depart.
    beat.stop()
    leaver.close()
    wait_until(lambda: watcher.view().nodes["leaver"].state == "left")
    assert watcher.skipped >= 12 and watcher.errors == 0
    one_shot = cluster_health(redis_server.url)
    assert one_shot.skipped == 6 and set(one_shot.nodes) == {"watcher", "leaver"}
    from dwcp._cli import main

    assert main(["status", "--cluster", redis_server.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 6
    main(["status", "--cluster", redis_server.url])
    assert "6 unreadable records skipped" in capsys.readouterr().out


def test_an_unreadable_answer_is_a_cluster_error_not_a_value_error(
    redis_server: RedisServer,
) -> None:
    client: Any = redis_server.client()
    try:
        client.set("dwcp:cluster:nodes", "not a sorted set")
    finally:
        client.close()
    with pytest.raises(ClusterError) as caught:
        cluster_health(redis_server.url)
    assert caught.value.code == "CLUSTER_UNREACHABLE"


def test_a_node_back_after_an_outage_longer_than_retention_is_a_node_back_and_rearms_alerts(
    redis_server: RedisServer, make_member: MakeMember
) -> None:
    from dwcp.testing import FakeClock
    from dwcp.webhook import WebhookNotifier

    clock = FakeClock()  # never advanced: repeat_interval never runs out in this test
    notifier = WebhookNotifier(
        "http://127.0.0.1:9/hook", events=("node_lost", "node_back"), clock=clock
    )
    events: list[object] = []
    watcher = make_member("watcher", interval=0.1, on_event=events.append)
    watcher.add_listener(notifier)
    flappy = make_member("flappy", interval=0.1, retention=0.6, watch=False)
    try:
        beat = Heartbeat(flappy)
        wait_until(lambda: watcher.view().nodes.get("flappy") is not None)
        wait_until(lambda: watcher.view().nodes["flappy"].alive)
        beat.stop()
        wait_until(lambda: any(isinstance(e, dwcp.NodeLost) for e in events))
        # Silent past its retention: Redis, and so every view, lists it no more.
        wait_until(lambda: "flappy" not in watcher.view().nodes, timeout=10)
        assert "flappy" not in cluster_health(redis_server.url).nodes
        beat = Heartbeat(flappy)
        wait_until(lambda: any(isinstance(e, dwcp.NodeBack) for e in events), timeout=5)
        back = next(e for e in events if isinstance(e, dwcp.NodeBack))
        assert back.node == "flappy" and back.down_for > 0
        wait_until(lambda: watcher.view().nodes["flappy"].alive)
        beat.stop()
        wait_until(lambda: sum(isinstance(e, dwcp.NodeLost) for e in events) == 2)
        # lost, back, lost: the second loss is not a repeat of the first.
        assert [type(e).__name__ for e in events] == ["NodeLost", "NodeBack", "NodeLost"]
        assert notifier.pending == 3 and notifier.suppressed == 0
    finally:
        notifier.close(timeout=0.1)


def test_the_collector_describes_the_cluster_families() -> None:
    from dwcp.prometheus import DWCPCollector

    names = {family.name for family in DWCPCollector().describe()}
    assert {
        "dwcp_cluster_node_up",
        "dwcp_cluster_node_healthy",
        "dwcp_cluster_node_heartbeat_age_seconds",
        "dwcp_cluster_view_stale",
        "dwcp_cluster_records_skipped",
    } <= names


def test_records_with_a_wrong_health_field_an_absurd_bound_or_another_id_are_skipped(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    client: Any = redis_server.client()
    good = {"status": "healthy", "breaker": "closed", "breaker_storage": "local"}
    try:
        for node, record in {
            "status_int": _record(health=dict(good, status=5)),
            "components_str": _record(health=dict(good, components="x")),
            "component_int": _record(health=dict(good, components={"transport": 5})),
            "breaker_list": _record(health=dict(good, breaker=[1])),
            "immortal": _record(bound=1e308, interval=1e308),
            "fine": _record(health=good),
        }.items():
            _plant(client, node, json.dumps(dict(json.loads(record), node=node)))
        # A sound record filed under another node's id is not one a publisher writes either.
        _plant(client, "elsewhere", _record(node="someone-else", health=good))
    finally:
        client.close()
    view = cluster_health(redis_server.url)
    assert set(view.nodes) == {"fine"} and view.skipped == 6
    from dwcp._cli import main

    main(["status", "--cluster", redis_server.url])
    table = capsys.readouterr().out
    assert "6 unreadable records skipped" in table
    assert "[1]" not in table and "1e+308" not in table and "status_int" not in table


def test_a_second_start_raises_already_started_and_with_starts_and_closes(
    redis_server: RedisServer,
) -> None:
    with ClusterMember(redis_server.url, "ctx", interval=0.1) as member:
        with pytest.raises(dwcp.DWCPError) as caught:
            member.start()
        assert caught.value.code == "ALREADY_STARTED"
        member.publish({"status": "healthy"})
        wait_until(lambda: "ctx" in member.view().nodes)
    # Left the block: closed, said goodbye, and may be started again.
    assert cluster_health(redis_server.url).nodes["ctx"].state == "left"
    member.start()
    member.close()


def test_a_manager_announcing_an_interval_past_the_maximum_is_refused(
    redis_server: RedisServer,
) -> None:
    with pytest.raises(ValueError, match="health_interval \\+ health_check_timeout"):
        dwcp.Manager(FakeTransport(), cluster=redis_server.url, health_interval=86400)


def _close_on_first_loss(
    close: Callable[[], None],
) -> tuple[Callable[[object], None], dict[str, Any]]:
    """An on_event callback that calls ``close()`` on the first ``NodeLost`` and records
    the thread it ran on and what the call did."""
    seen: dict[str, Any] = {"done": threading.Event()}

    def on_event(event: object) -> None:
        if not isinstance(event, dwcp.NodeLost) or seen["done"].is_set():
            return
        seen["thread"] = threading.current_thread().name
        try:
            close()
            seen["close"] = "ok"
        except Exception as exc:  # noqa: BLE001 - the test reports what escaped
            seen["close"] = f"{type(exc).__name__}: {exc}"
        seen["done"].set()

    return on_event, seen


def _no_thread_named(name: str) -> bool:
    return not any(t.name == name for t in threading.enumerate())


def test_close_from_the_members_own_callback_ends_its_thread_and_it_starts_again(
    redis_server: RedisServer, heartbeats: Callable[..., Heartbeat]
) -> None:
    holder: list[ClusterMember] = []
    on_event, seen = _close_on_first_loss(lambda: holder[0].close())
    watcher = ClusterMember(redis_server.url, "watcher", interval=0.1, on_event=on_event)
    holder.append(watcher)
    leaver = ClusterMember(redis_server.url, "leaver", interval=0.1, watch=False)
    watcher.start()
    leaver.start()
    try:
        beat = heartbeats(leaver)
        heartbeats(watcher)
        wait_until(lambda: "leaver" in watcher.view().nodes)
        beat.stop()
        leaver.close()
        assert seen["done"].wait(10)
        assert seen["thread"] == "dwcp-cluster"
        assert seen["close"] == "ok"  # not "RuntimeError: cannot join current thread"
        wait_until(lambda: _no_thread_named("dwcp-cluster"))
        # It said goodbye on its way out, and starts again.
        wait_until(lambda: cluster_health(redis_server.url).nodes["watcher"].state == "left")
        watcher.start()
        watcher.publish({"status": "healthy"})
        wait_until(lambda: cluster_health(redis_server.url).nodes["watcher"].state == "alive")
    finally:
        watcher.close()
        leaver.close()
    assert _no_thread_named("dwcp-cluster")


def test_manager_stop_from_its_cluster_members_callback_stops_it_without_leaking_threads(
    redis_server: RedisServer,
) -> None:
    holder: list[dwcp.Manager] = []
    on_event, seen = _close_on_first_loss(lambda: holder[0].stop())
    member = ClusterMember(redis_server.url, "A", interval=0.1, on_event=on_event)
    manager = dwcp.Manager(cluster=member, health_interval=0.05, health_check_timeout=0.05)
    holder.append(manager)
    other = dwcp.Manager(
        cluster=ClusterMember(redis_server.url, "B", interval=0.1, watch=False),
        health_interval=0.05,
        health_check_timeout=0.05,
    )
    manager.start()
    other.start()
    try:
        wait_until(lambda: "B" in member.view().nodes and member.view().nodes["B"].alive)
        other.stop()
        assert seen["done"].wait(10)
        assert seen["thread"] == "dwcp-cluster"
        assert seen["close"] == "ok"  # not "RuntimeError: cannot join current thread"
        assert not manager.is_started
        wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("dwcp")])
        manager.start()  # and it starts again (waiting for the member's thread to end)
        assert manager.is_started
    finally:
        manager.stop()
        other.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("dwcp-")]
