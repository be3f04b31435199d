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
document, see ``check_health``); a reader skips a record of another version, or one that does
not parse or has a field missing or of the wrong type, inside ``health`` too, or an
``interval``/``bound`` out of range (``parse_record``), or one whose ``node`` is not the id
it is filed under, and counts it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, get_args

from dwcp import _validation as check
from dwcp._errors import DWCPError
from dwcp._health import ComponentStatus

__all__ = [
    "BOUND_MAX",
    "INTERVAL_MAX",
    "INTERVAL_MIN",
    "RECORD_VERSION",
    "ClusterError",
    "ClusterView",
    "NodeHealth",
    "NodeState",
    "check_health",
    "make_record",
    "node_health",
    "parse_record",
]

NodeState = Literal["alive", "lost", "left"]

#: The version of the record format (``"v"``) this code writes and reads.
RECORD_VERSION = 1

#: The range of the interval a node may announce, in seconds: from 1 ms (heartbeats are
#: stamped in milliseconds) to one day.  ``ClusterMember`` refuses an interval outside it and
#: a reader skips a record announcing one, so a record cannot keep a silent node alive for
#: longer than a publisher could.
INTERVAL_MIN = 0.001
INTERVAL_MAX = 86400.0
#: The longest bound (``lost_after`` times the interval) a node may announce: one week.
BOUND_MAX = 604800.0


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
    #: record version ``"v"``, a field missing or of the wrong type, in ``health`` too, an
    #: interval or bound out of range, another node's id); their nodes are not listed.
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
    check.name("namespace", namespace)  # TypeError for a non-string
    assert isinstance(namespace, str)
    if not namespace.isprintable():
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


def _seconds(low: float, high: float) -> Callable[[object], bool]:
    def within(value: object) -> bool:
        return (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and low <= value <= high  # NaN compares false: refused too
        )

    return within


def _health(value: object) -> bool:
    try:
        check_health(value)
    except (TypeError, ValueError):
        return False
    return True


# Every field of a record (see make_record) and the check its value must pass.
_FIELDS: dict[str, Callable[[object], bool]] = {
    "node": lambda v: isinstance(v, str),
    "host": lambda v: isinstance(v, str),
    "pid": _integer,
    "interval": _seconds(INTERVAL_MIN, INTERVAL_MAX),
    # A publisher's bound is at least 1.5 intervals of at least 1 ms (rounded to 1 us).
    "bound": _seconds(INTERVAL_MIN, BOUND_MAX),
    "seq": _integer,
    "left": lambda v: isinstance(v, bool),
    "health": _health,
}

_HEALTH_STATUSES = ("healthy", "unhealthy")
_COMPONENT_STATUSES: tuple[str, ...] = get_args(ComponentStatus)


def _one_of(field_name: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{field_name} must be a string, got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{field_name} must be one of {', '.join(allowed)}, got {value!r}")


def _text_field(field_name: str, value: object, *, optional: bool = False) -> None:
    if not (isinstance(value, str) or (optional and value is None)):
        kind = "a string or None" if optional else "a string"
        raise TypeError(f"{field_name} must be {kind}, got {type(value).__name__}")


def check_health(document: object) -> None:
    """Raise ``TypeError``/``ValueError`` naming the field unless ``document`` is a health
    document as ``snapshot_document`` writes it.

    Each field may be absent (an older or a partial document; the table prints ``?``), but
    one present has its type: ``status`` "healthy" or "unhealthy"; ``breaker`` and
    ``breaker_storage`` strings; ``components`` an object of component name to an object
    whose ``status`` is one of "healthy", "unhealthy", "recovering", "failed", ``last_error``
    a string or null, ``seconds_in_status`` and ``suspicion`` finite non-negative numbers.
    Other fields are ignored.
    """
    if not isinstance(document, Mapping):
        raise TypeError(f"health must be an object, got {type(document).__name__}")
    if "status" in document:
        _one_of("health.status", document["status"], _HEALTH_STATUSES)
    for key in ("breaker", "breaker_storage"):
        if key in document:
            _text_field(f"health.{key}", document[key])
    components = document.get("components", {})
    if not isinstance(components, Mapping):
        raise TypeError(f"health.components must be an object, got {type(components).__name__}")
    for name, component in components.items():
        where = f"health.components[{name!r}]"
        if not isinstance(name, str):
            raise TypeError(f"{where}: component names must be strings")
        if not isinstance(component, Mapping):
            raise TypeError(f"{where} must be an object, got {type(component).__name__}")
        if "status" in component:
            _one_of(f"{where}.status", component["status"], _COMPONENT_STATUSES)
        if "last_error" in component:
            _text_field(f"{where}.last_error", component["last_error"], optional=True)
        for key in ("seconds_in_status", "suspicion"):
            if key in component:
                check.number(f"{where}.{key}", component[key])


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
    for name, valid in _FIELDS.items():
        if name not in record or not valid(record[name]):
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
