"""The cluster's records in Redis and what a read makes of them: the key layout, the record
format and its check, and the ``NodeHealth``/``ClusterView`` a reader builds.

Key layout under ``<namespace>:cluster:`` (``namespace`` defaults to ``dwcp``):

``nodes``
    A sorted set: member = node id, score = the node's last heartbeat in milliseconds of the
    Redis server's clock (so ages never depend on the nodes' clocks agreeing).
``node:<id>``
    The node's last record (JSON: its health document, interval, bound, host, pid), with an
    expiry (``retention``), so a dead node's entry cannot live forever.
``epoch``
    A random token with the Redis time it was written, never expiring, written by a publish
    that finds it missing: when it changes, Redis lost the data set (restarted empty).
``owner:<id>``
    A lease held by the process publishing under that id (expires after the lost bound): a
    second live process using the same id is refused and warned about instead of
    overwriting the first one's heartbeats.

A publish is one round trip (one Lua script: heartbeat time, lease, record, index, pruning);
a read is two (``TIME`` with the index and the epoch, then one ``MGET`` of the records).

A record is JSON with ``"v"`` (the record version, ``RECORD_VERSION``), ``node``, ``host``,
``pid``, ``interval``, ``bound``, ``seq``, ``left`` and ``health`` (the node's health
document); a reader skips a record of another version, or one that does not parse or has a
field of the wrong type (``parse_record``), and counts it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from dwcp._errors import DWCPError

__all__ = [
    "RECORD_VERSION",
    "ClusterError",
    "ClusterView",
    "NodeHealth",
    "NodeState",
    "make_record",
    "node_health",
    "parse_record",
]

NodeState = Literal["alive", "lost", "left"]

#: The version of the record format (``"v"``) this code writes and reads.
RECORD_VERSION = 1


class ClusterError(DWCPError):
    """The cluster's Redis could not be reached or answered with something unreadable."""

    code = "CLUSTER_UNREACHABLE"


@dataclass(frozen=True)
class NodeHealth:
    """One node as the cluster last heard from it."""

    node: str
    #: ``alive``: heard from within its bound; ``lost``: silent for longer; ``left``: it said
    #: goodbye (closed cleanly).
    state: NodeState
    #: The node's own verdict in its last snapshot (all components healthy, breaker not open).
    healthy: bool
    #: Seconds since its last heartbeat, on the Redis server's clock.
    age: float
    #: Silence longer than this (``lost_after`` times the node's interval) makes it lost.
    bound: float
    #: The longest gap between two of its publishes it announced (seconds).
    interval: float
    #: Heartbeats it published since it started.
    heartbeats: int
    host: str
    pid: int
    #: Its last health document (see ``snapshot_document``).
    snapshot: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def alive(self) -> bool:
        """Whether the node was heard from within its bound."""
        return self.state == "alive"


@dataclass(frozen=True)
class ClusterView:
    """Every node's last snapshot, read at one moment, or the last one read if Redis is down."""

    nodes: Mapping[str, NodeHealth]
    #: True when the last read failed: the nodes are what was known before, not news.
    stale: bool
    #: Why the last read failed, when ``stale``.
    error: str | None
    #: Seconds since the nodes were last read successfully (0.0 for a fresh read).
    age: float
    namespace: str
    #: Records the read skipped because this version cannot use them (not JSON, another
    #: record version ``"v"``, a field missing or of the wrong type); their nodes are not
    #: listed.
    skipped: int = 0

    @property
    def healthy(self) -> bool:
        """Fresh, and every node alive and healthy; nodes that left cleanly do not count, and
        a cluster with no other node is not healthy."""
        members = [n for n in self.nodes.values() if n.state != "left"]
        return not self.stale and bool(members) and all(n.alive and n.healthy for n in members)

    @property
    def lost(self) -> tuple[str, ...]:
        """The ids of the nodes that are lost, sorted."""
        return tuple(sorted(n.node for n in self.nodes.values() if n.state == "lost"))


def _check_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or not namespace or not namespace.isprintable():
        raise ValueError(f"namespace must be a non-empty printable string, got {namespace!r}")
    return namespace


class _Keys:
    def __init__(self, namespace: str) -> None:
        self.prefix = f"{namespace}:cluster:"
        self.index = self.prefix + "nodes"

        self.epoch = self.prefix + "epoch"

    def record(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}"

    def owner(self, node_id: str) -> str:
        return f"{self.prefix}owner:{node_id}"


def _number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# Every field of a record (see make_record) and the check its value must pass.
_FIELDS: dict[str, Callable[[object], bool]] = {
    "node": lambda v: isinstance(v, str),
    "host": lambda v: isinstance(v, str),
    "pid": _integer,
    "interval": _number,
    "bound": _number,
    "seq": _integer,
    "left": lambda v: isinstance(v, bool),
    "health": lambda v: isinstance(v, dict),
}


def parse_record(raw: object) -> dict[str, Any] | None:
    """The record as written by a node of this record version, or None when it is not one:
    not JSON, another ``"v"``, a field missing or of the wrong type."""
    try:
        record = json.loads(raw)  # type: ignore[arg-type]
    except (ValueError, TypeError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(record, dict):
        return None
    version = record.get("v")
    if type(version) is not int or version != RECORD_VERSION:
        return None
    for name, check in _FIELDS.items():
        if name not in record or not check(record[name]):
            return None
    return record


def make_record(
    node: str,
    *,
    host: str,
    pid: int,
    interval: float,
    bound: float,
    seq: int,
    left: bool,
    health: Mapping[str, Any],
) -> str:
    """A node's record as JSON, in the format ``parse_record`` reads."""
    return json.dumps(
        {
            "v": RECORD_VERSION,
            "node": node,
            "host": host,
            "pid": pid,
            "interval": interval,
            "bound": bound,
            "seq": seq,
            "left": left,
            "health": health,
        },
        separators=(",", ":"),
    )


def node_health(node_id: str, record: Mapping[str, Any], age: float, silent: float) -> NodeHealth:
    """A node from its (checked) record; ``silent`` (seconds without news) decides alive or
    lost."""
    health = record["health"]
    bound = float(record["bound"])
    if record["left"]:
        state: NodeState = "left"
    else:
        state = "alive" if silent <= bound else "lost"
    return NodeHealth(
        node=node_id,
        state=state,
        healthy=health.get("status") == "healthy",
        age=max(age, 0.0),
        bound=bound,
        interval=float(record["interval"]),
        heartbeats=int(record["seq"]),
        host=record["host"],
        pid=int(record["pid"]),
        snapshot=MappingProxyType(dict(health)),
    )
