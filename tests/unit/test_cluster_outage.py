"""How a watching ``ClusterMember`` excuses silence across a Redis outage or an empty restart,
fed synthetic reads (``_Raw``: Redis time, epoch, records) so every deadline is exact.

The rule (README, "Health across a cluster"): the deadline of a node alive before the gap
moves by the time nobody could publish, bounded by this watcher's last read before the gap and
its first read after it, or the first publish into the emptied Redis (the epoch's stamp) when
that came earlier, started at the node's heartbeat when that came after the last read; by no
more.  Bound 1500 ms, interval 500 ms throughout."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dwcp._cluster import ClusterMember
from dwcp._cluster_read import _Raw
from dwcp._cluster_schema import make_record
from dwcp._events import NodeBack, NodeLost

BOUND_MS = 1500


def _record(node: str) -> dict[str, Any]:
    raw = make_record(
        node, host="h", pid=1, interval=0.5, bound=1.5, seq=1, left=False,
        health={"status": "healthy", "components": {}},
    )  # fmt: skip
    return json.loads(raw)  # type: ignore[no-any-return]


class _Watcher:
    """A member that is never started: only its view logic, fed one read at a time."""

    def __init__(self) -> None:
        # A URL makes a client that connects lazily: nothing here touches a socket.
        self.member = ClusterMember("redis://127.0.0.1:1/0", "watcher", interval=0.5)
        self.events: list[NodeLost | NodeBack] = []

    def read(self, now: int, epoch: str, beats: dict[str, int]) -> dict[str, str]:
        nodes = {n: (beat, _record(n)) for n, beat in beats.items()}
        self.events += self.member._update(_Raw(now, epoch, nodes, 0), now / 1000.0)
        return {n: h.state for n, h in self.member.view().nodes.items()}

    def outage(self) -> None:
        """A failed Redis operation between two reads (what ``_failed`` records)."""
        self.member._gap = True


@pytest.fixture
def watcher() -> _Watcher:
    return _Watcher()


def test_after_a_quick_empty_restart_a_dead_node_is_lost_at_its_own_deadline(
    watcher: _Watcher,
) -> None:
    """No failure seen: Redis restarted empty between two reads (500 ms apart) and was
    publishable again at 1_200 (the epoch's stamp).  The dead node, last heard at 0, had its
    deadline at 1_500; it moves by at most the 200 ms between the last read and that first
    publish: lost after 1_700, not a full bound after the restart (2_500 before)."""
    assert watcher.read(0, "a:0", {"dead": 0, "live": 0}) == {"dead": "alive", "live": "alive"}
    assert watcher.read(1_000, "a:0", {"dead": 0, "live": 1_000})["dead"] == "alive"
    # Restart; the live node republishes at 1_200 (its publish writes the new epoch).
    assert watcher.read(1_500, "b:1200", {"live": 1_200}) == {"dead": "alive", "live": "alive"}
    assert watcher.read(1_700, "b:1200", {"live": 1_200}) == {"dead": "alive", "live": "alive"}
    assert watcher.events == []
    # 1_701: past 0 + 1_500 + 200.  Redis no longer has it, so it is listed no more.
    assert watcher.read(1_701, "b:1200", {"live": 1_700}) == {"live": "alive"}
    assert watcher.events == [NodeLost("dead", 1.701, 1.5, "silent")]


def test_a_dead_node_is_lost_about_the_outage_after_its_own_deadline(watcher: _Watcher) -> None:
    """Redis unreachable (data kept) between the reads at 1_000 and 5_000: the deadline of a
    node last heard at 500 moves from 2_000 by the 4_000 ms nobody could publish (the span
    this watcher saw), to 6_000; before, it got a full bound from 5_000 (6_500)."""
    watcher.read(500, "a:0", {"dead": 500})
    watcher.read(1_000, "a:0", {"dead": 500})
    watcher.outage()
    assert watcher.read(5_000, "a:0", {"dead": 500}) == {"dead": "alive"}
    assert watcher.read(6_000, "a:0", {"dead": 500}) == {"dead": "alive"}
    assert watcher.read(6_001, "a:0", {"dead": 500}) == {"dead": "lost"}
    assert watcher.events == [NodeLost("dead", 5.501, 1.5, "silent")]


def test_after_an_empty_restart_that_lasted_the_gap_ends_at_the_first_publish(
    watcher: _Watcher,
) -> None:
    """Unreachable from after the read at 1_000, restarted empty, first publish at 3_000,
    this watcher's first good read at 4_000: the excuse is 2_000 (to the publish), not
    3_000 (to the read), so the node last heard at 800 is lost after 4_300."""
    watcher.read(800, "a:0", {"dead": 800, "live": 800})
    watcher.read(1_000, "a:0", {"dead": 800, "live": 800})
    watcher.outage()
    assert watcher.read(4_000, "b:3000", {"live": 3_000}) == {"dead": "alive", "live": "alive"}
    assert watcher.read(4_300, "b:3000", {"live": 3_000})["dead"] == "alive"
    assert watcher.read(4_301, "b:3000", {"live": 3_000}) == {"live": "alive"}
    assert [e.node for e in watcher.events] == ["dead"]


def test_a_live_node_that_republishes_promptly_is_never_lost_across_an_outage(
    watcher: _Watcher,
) -> None:
    """A node publishing every 500 ms until Redis went away (after the read at 1_000, its last
    beat 900) and at its first pass after Redis came back (at 10_400, one interval after it
    answered at 9_900): never lost, whatever the outage's length."""
    watcher.read(900, "a:0", {"live": 900})
    watcher.read(1_000, "a:0", {"live": 900})
    watcher.outage()
    for now in (9_900, 10_000, 10_300):  # reads before the node's first publish
        watcher.outage()  # the watcher's own reads failed until 9_900
        assert watcher.read(now, "a:0", {"live": 900}) == {"live": "alive"}
    assert watcher.read(10_400, "a:0", {"live": 10_400}) == {"live": "alive"}
    assert watcher.events == []


def test_excuses_add_up_over_outages_until_the_node_is_heard_from(watcher: _Watcher) -> None:
    watcher.read(0, "a:0", {"n": 0})
    watcher.outage()
    watcher.read(1_000, "a:0", {"n": 0})  # 1_000 excused
    watcher.outage()
    watcher.read(2_000, "a:0", {"n": 0})  # 1_000 more
    assert watcher.read(3_500, "a:0", {"n": 0}) == {"n": "alive"}
    assert watcher.read(3_501, "a:0", {"n": 0}) == {"n": "lost"}
    # Heard from again: back, and the excuse is spent.
    assert watcher.read(3_600, "a:0", {"n": 3_600}) == {"n": "alive"}
    assert watcher.read(5_101, "a:0", {"n": 3_600}) == {"n": "lost"}


def test_a_node_lost_before_the_gap_stays_lost(watcher: _Watcher) -> None:
    watcher.read(0, "a:0", {"n": 0})
    assert watcher.read(1_600, "a:0", {"n": 0}) == {"n": "lost"}
    watcher.outage()
    assert watcher.read(5_000, "a:0", {"n": 0}) == {"n": "lost"}
    assert [type(e) for e in watcher.events] == [NodeLost]


def test_a_heartbeat_published_just_before_the_outage_is_excused_from_then(
    watcher: _Watcher,
) -> None:
    """The outside test's spurious NodeLost (3 of 50 SIGSTOP outages): the node published at
    1_100, after this watcher's last read at 1_000 and just before Redis stopped answering;
    the first read after the outage (5_000) brings that heartbeat.  It is news, but the outage
    followed it: its silence from 1_100 to 5_000 is excused (before, the excuse was dropped
    with the older heartbeat and the node was lost at once, silent_for 3.9 s).  A node that
    then stays silent is lost a bound after 5_000 (the moved deadline, as for the others)."""
    watcher.read(500, "a:0", {"node": 500})
    watcher.read(1_000, "a:0", {"node": 1_000})
    watcher.outage()
    assert watcher.read(5_000, "a:0", {"node": 1_100}) == {"node": "alive"}  # before: lost
    assert watcher.events == []
    assert watcher.read(6_500, "a:0", {"node": 1_100}) == {"node": "alive"}
    assert watcher.read(6_501, "a:0", {"node": 1_100}) == {"node": "lost"}
    assert watcher.events == [NodeLost("node", 5.401, 1.5, "silent")]
