"""Four manager processes in one cluster on a real redis-server: a SIGKILLed node is reported
lost by the others within its bound; a frozen, then killed and emptied Redis makes every view
stale (never wrong) while the managers keep working, and the views converge once it is back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from dwcp.cluster import cluster_health
from tests._redis import RedisServer, redis_server
from tests.conftest import wait_until

__all__ = ["redis_server"]  # the fixture, imported for pytest

INTERVAL = 0.2
CHECK_TIMEOUT = 0.3
# What each node announces: lost_after (3) x (health_interval + health_check_timeout).
BOUND = 3 * (INTERVAL + CHECK_TIMEOUT)


@dataclass
class Node:
    name: str
    proc: subprocess.Popen[str]
    url: str

    def cluster(self) -> dict[str, Any]:
        return _document(self.url + "/cluster")

    def health(self) -> dict[str, Any]:
        return _document(self.url + "/healthz")


def _document(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:  # 503 still carries the document
        with exc:
            return json.load(exc)  # type: ignore[no-any-return]


class Cluster:
    """Manager processes on one Redis; ``spawn`` starts one more, stopped at teardown."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.nodes: list[Node] = []
        self._env = {
            **os.environ,
            "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }

    def spawn(self, name: str, lost_after: float | None = None) -> Node:
        extra = [] if lost_after is None else [str(lost_after)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.cluster_child", self.url, name,
             str(INTERVAL), str(CHECK_TIMEOUT), *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self._env,
        )  # fmt: skip
        assert proc.stdout is not None
        node = Node(name, proc, "")
        self.nodes.append(node)
        line = proc.stdout.readline()
        assert line, f"{name} exited before starting"
        node.url = json.loads(line)["url"]
        return node

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc.poll() is None:
                assert node.proc.stdin is not None
                node.proc.stdin.close()  # a clean stop
                try:
                    node.proc.wait(15)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait(10)


@pytest.fixture
def cluster(redis_server: RedisServer) -> Iterator[Cluster]:
    made = Cluster(redis_server.url)
    try:
        yield made
    finally:
        made.stop()


@pytest.fixture
def nodes(cluster: Cluster) -> list[Node]:
    for i in range(4):
        cluster.spawn(f"n{i}")
    return list(cluster.nodes)


def _all_alive(node: Node, names: set[str]) -> bool:
    document = node.cluster()
    return (
        document["stale"] is False
        and set(document["nodes"]) == names
        and all(n["alive"] and n["healthy"] for n in document["nodes"].values())
    )


def test_a_killed_node_is_reported_lost_by_every_other_within_its_bound(
    redis_server: RedisServer, nodes: list[Node]
) -> None:
    names = {n.name for n in nodes}
    wait_until(lambda: all(_all_alive(n, names) for n in nodes), timeout=30)
    victim, others = nodes[-1], nodes[:-1]
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)
    killed_at = time.monotonic()
    noticed: dict[str, float] = {}

    def all_noticed() -> bool:
        for node in others:
            if node.name not in noticed and node.cluster()["lost"] == [victim.name]:
                noticed[node.name] = time.monotonic() - killed_at
                entry = node.cluster()["nodes"][victim.name]
                # Lost only after a full bound of silence, never before.
                assert entry["state"] == "lost" and entry["age"] >= entry["bound"] == BOUND
        return len(noticed) == len(others)

    wait_until(all_noticed, timeout=BOUND + 10)
    # The documented bound: silence longer than BOUND, noticed by a watcher that reads once
    # per pass (INTERVAL + CHECK_TIMEOUT at most), plus slack for a loaded machine.
    assert max(noticed.values()) < BOUND + (INTERVAL + CHECK_TIMEOUT) + 1.5, noticed
    # The survivors are still alive in every survivor's view; the one-shot reader agrees.
    for node in others:
        survivors = node.cluster()["nodes"]
        assert all(survivors[o.name]["alive"] for o in others)
    view = cluster_health(redis_server.url)
    assert view.lost == (victim.name,)


def test_a_frozen_then_emptied_redis_is_stale_not_wrong_and_the_views_converge(
    redis_server: RedisServer, nodes: list[Node]
) -> None:
    names = {n.name for n in nodes}
    wait_until(lambda: all(_all_alive(n, names) for n in nodes), timeout=30)
    sends_before = {n.name: n.health()["metrics"]["sends"] for n in nodes}

    def never_wrong(document: dict[str, Any]) -> dict[str, Any]:
        # Whatever happens to Redis, no live node is ever reported lost or missing.
        assert document["lost"] == [], document
        assert set(document["nodes"]) == names, document
        return document

    redis_server.pause()  # SIGSTOP: connections hang, nothing answers
    frozen_at = time.monotonic()
    wait_until(lambda: all(never_wrong(n.cluster())["stale"] for n in nodes), timeout=20)
    # Frozen well past every bound; keep watching that no view turns wrong meanwhile.
    wait_until(
        lambda: (
            [never_wrong(n.cluster()) for n in nodes] and time.monotonic() - frozen_at > BOUND + 1.0
        ),
        timeout=20,
    )
    # The managers kept working on local state: sends went on, health served.
    for node in nodes:
        health = node.health()
        assert health["status"] == "healthy"
        assert health["metrics"]["sends"] > sends_before[node.name]
    redis_server.kill()  # SIGKILL while stopped: its data is gone
    redis_server.start()  # the same port, empty

    def converged() -> bool:
        for node in nodes:
            never_wrong(node.cluster())
        return all(_all_alive(n, names) for n in nodes)

    wait_until(converged, timeout=30)
    view = cluster_health(redis_server.url)
    assert set(view.nodes) == names and view.healthy


def _kill(node: Node) -> None:
    os.kill(node.proc.pid, signal.SIGKILL)
    node.proc.wait(10)


def _cli(url: str) -> tuple[int, dict[str, Any]]:
    """``python -m dwcp status --cluster URL --json``: exit code and document."""
    result = subprocess.run(
        [sys.executable, "-m", "dwcp", "status", "--cluster", url, "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return result.returncode, json.loads(result.stdout) if result.stdout else {}


def test_a_watcher_started_after_a_node_died_lists_it_lost_from_its_first_read(
    redis_server: RedisServer, cluster: Cluster, nodes: list[Node]
) -> None:
    names = {n.name for n in nodes}
    wait_until(lambda: all(_all_alive(n, names) for n in nodes), timeout=30)
    victim = nodes[-1]
    _kill(victim)
    wait_until(lambda: cluster_health(redis_server.url).lost == (victim.name,), timeout=20)
    late = cluster.spawn("late")
    documents: list[dict[str, Any]] = []

    def read() -> bool:
        document = late.cluster()
        if not document["stale"]:
            documents.append(document)
        return len(documents) >= 5

    wait_until(read, timeout=20)
    # From its first read on: lost, the cluster unhealthy (/cluster 503), never alive.
    for document in documents:
        assert document["nodes"][victim.name]["state"] == "lost", document
        assert document["status"] == "unhealthy" and victim.name in document["lost"]
    code, cli = _cli(redis_server.url)
    assert code == 1 and cli["lost"] == [victim.name]
    assert cluster_health(redis_server.url).lost == (victim.name,)


def test_after_an_empty_redis_restart_the_cli_and_every_watcher_agree(
    redis_server: RedisServer, nodes: list[Node]
) -> None:
    names = {n.name for n in nodes}
    wait_until(lambda: all(_all_alive(n, names) for n in nodes), timeout=30)
    victim, others = nodes[-1], nodes[:-1]
    _kill(victim)
    wait_until(lambda: all(n.cluster()["lost"] == [victim.name] for n in others), timeout=20)
    redis_server.kill()  # its data is gone
    redis_server.start()  # the same port, empty

    def never_alive(document: dict[str, Any]) -> dict[str, Any]:
        # The dead node is never called alive again, whatever Redis went through.
        entry = document["nodes"].get(victim.name)
        assert entry is None or entry["state"] == "lost", document
        return document

    def agree() -> bool:
        code, cli = _cli(redis_server.url)
        views = [never_alive(n.cluster()) for n in others]
        return all(
            not v["stale"]
            and set(v["nodes"]) == set(cli.get("nodes", ()))
            and v["status"] == cli.get("status")
            and (code == 0) == (v["status"] == "healthy")
            for v in views
        )

    wait_until(agree, timeout=30)
    # Redis forgot the dead node, and so did every view: the survivors, healthy.
    view = cluster_health(redis_server.url)
    assert set(view.nodes) == {n.name for n in others} and view.healthy


def test_a_node_killed_before_a_quick_empty_restart_is_lost_at_its_own_deadline(
    redis_server: RedisServer, cluster: Cluster
) -> None:
    """Issue 21: after an empty restart a node that died just before it was listed alive for
    one more full bound.  Its deadline now moves only by the time nobody could publish (here,
    a restart of a moment): the watchers list it alive no longer than its own bound plus that
    time, and never call a survivor lost.  A bound of 12 passes keeps the two rules apart by
    seconds: the old one listed it alive until an age of at least 5 + 6 - 0.5 s."""
    lost_after = 12
    bound = lost_after * (INTERVAL + CHECK_TIMEOUT)  # 6 s
    nodes = [cluster.spawn(f"q{i}", lost_after) for i in range(3)]
    names = {n.name for n in nodes}
    wait_until(lambda: all(_all_alive(n, names) for n in nodes), timeout=30)
    victim, others = nodes[-1], nodes[:-1]
    _kill(victim)

    def victim_entries() -> list[dict[str, Any]]:
        return [n.cluster()["nodes"][victim.name] for n in others]

    # Silent for most of its bound in every watcher's view, and still alive.
    wait_until(lambda: all(e["age"] >= bound - 1.0 for e in victim_entries()), timeout=30)
    assert all(e["alive"] for e in victim_entries())
    redis_server.kill()
    redis_server.start()  # empty, after a moment
    alive_ages: list[float] = []

    def gone() -> bool:
        views = [n.cluster() for n in others]
        for view in views:
            # The survivors are never called lost, across the restart.
            assert all(view["nodes"][o.name]["alive"] for o in others), view
            entry = view["nodes"].get(victim.name)
            if entry is not None and entry["alive"]:
                alive_ages.append(entry["age"])
        return all(victim.name not in view["nodes"] for view in views)

    wait_until(gone, timeout=60)
    print(f"listed alive up to an age of {max(alive_ages):.2f} s (bound {bound:g} s)")
    # Its own bound plus the restart and a pass on each side of it, with room for a busy
    # machine; the old rule could not go below bound - 1.0 + bound - 0.5 = 10.5 s.
    assert max(alive_ages) < bound + 3.5, max(alive_ages)
    # Redis forgot the dead node, and so did every view; the one-shot reader and the CLI agree.
    view = cluster_health(redis_server.url)
    assert set(view.nodes) == {o.name for o in others} and view.healthy
    code, cli = _cli(redis_server.url)
    assert code == 0 and set(cli["nodes"]) == {o.name for o in others}
    for node in others:
        document = node.cluster()
        assert document["status"] == "healthy" and set(document["nodes"]) == set(cli["nodes"])
