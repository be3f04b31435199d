"""Cluster health on Redis: every node publishes its health snapshot with a heartbeat, and
every node (or a one-shot reader) reads the whole cluster back.

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
A record carries ``"v"`` (the record version, 1); a reader skips records of other versions
or that do not parse, and counts them.

Under ``<namespace>:history:`` (see ``dwcp._shared_history``), ``<manager>:<component>`` is a
list of the last outages a predictive component recovered from, capped at ``WINDOW``: read
once when the member starts (one round trip for all components), appended to by the pass
that follows an outage (one round trip).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from loguru import logger

from dwcp._errors import DWCPError
from dwcp._events import NodeBack, NodeLost
from dwcp._health import HealthSnapshot
from dwcp._prediction import WINDOW
from dwcp._shared_history import SharedHistory, encode_outage, history_key

__all__ = [
    "ClusterError",
    "ClusterMember",
    "ClusterView",
    "NodeHealth",
    "NodeState",
    "cluster_document",
    "cluster_health",
    "cluster_member",
    "default_node_id",
    "render_cluster",
    "snapshot_document",
]

NodeState = Literal["alive", "lost", "left"]
ClusterListener = Callable[["NodeLost | NodeBack"], None]

_THREAD_NAME = "dwcp-cluster"
_RECORD_VERSION = 1
_MAX_NODE_ID = 200
# Nodes remembered as lost after they are no longer listed; the oldest are forgotten first.
_REMEMBERED = 1024

# KEYS: record, owner lease, index, epoch.  ARGV: token, record, lease ms, retention ms, node
# id.  Returns {published (1/0), the other owner's token or '', Redis time in ms}.  The epoch
# (a random token, written once and never expiring) tells readers whether Redis lost the
# data set since they last read it (restarted empty or flushed): the first publish after that
# writes a new one.
_PUBLISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] then return {0, owner, now} end
redis.call('SET', KEYS[4], ARGV[1] .. ':' .. now, 'NX')
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[4])
redis.call('ZADD', KEYS[3], now, ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[4]))
return {1, '', now}
"""

# KEYS: owner lease.  ARGV: token.  Frees the id at once on a clean close, if still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


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


def default_node_id() -> str:
    """Host name and process id, such as ``web-3-12345``."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _check_node_id(node_id: object) -> str:
    if not isinstance(node_id, str):
        raise TypeError(f"node_id must be a str, got {type(node_id).__name__}")
    if not node_id or len(node_id) > _MAX_NODE_ID or not node_id.isprintable() or " " in node_id:
        raise ValueError(
            f"node_id must be 1 to {_MAX_NODE_ID} printable characters without spaces, "
            f"got {node_id!r}"
        )
    return node_id


def _check_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or not namespace or not namespace.isprintable():
        raise ValueError(f"namespace must be a non-empty printable string, got {namespace!r}")
    return namespace


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def snapshot_document(snapshot: HealthSnapshot) -> dict[str, Any]:
    """The compact JSON-ready form of a ``HealthSnapshot`` that a node publishes."""
    return {
        "status": "healthy" if snapshot.healthy else "unhealthy",
        "breaker": snapshot.breaker_state,
        "breaker_storage": snapshot.breaker_storage,
        "components": {
            name: {
                "status": c.status,
                "last_error": c.last_error,
                "seconds_in_status": round(c.seconds_in_status, 3),
                "suspicion": round(c.suspicion, 3),
            }
            for name, c in snapshot.components.items()
        },
    }


def cluster_document(view: ClusterView) -> dict[str, Any]:
    """The ``/cluster`` JSON document for a view: a verdict, staleness, and every node."""
    return {
        "status": "healthy" if view.healthy else "unhealthy",
        "stale": view.stale,
        "error": view.error,
        "view_age": round(view.age, 3),
        "namespace": view.namespace,
        "lost": list(view.lost),
        "skipped": view.skipped,
        "nodes": {
            node.node: {
                "state": node.state,
                "alive": node.alive,
                "healthy": node.healthy,
                "age": round(node.age, 3),
                "bound": round(node.bound, 3),
                "interval": round(node.interval, 3),
                "heartbeats": node.heartbeats,
                "host": node.host,
                "pid": node.pid,
                "health": dict(node.snapshot),
            }
            for node in sorted(view.nodes.values(), key=lambda n: n.node)
        },
    }


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _connect(target: object, timeout: float) -> Any:
    from dwcp._shared import connect

    client = connect(target, timeout=timeout, parameter="cluster")
    for method in ("pipeline", "mget", "register_script", "close"):
        if not callable(getattr(client, method, None)):
            raise TypeError(
                f"cluster must be a redis.Redis client or a redis:// URL, got "
                f"{type(target).__name__} (no {method}())"
            )
    return client


def _redis_errors() -> tuple[type[BaseException], ...]:
    try:
        from redis.exceptions import RedisError
    except ImportError:  # pragma: no cover - without the extra there is no client to fail
        return (OSError,)
    return (RedisError, OSError)


class _Keys:
    def __init__(self, namespace: str) -> None:
        self.prefix = f"{namespace}:cluster:"
        self.index = self.prefix + "nodes"

        self.epoch = self.prefix + "epoch"

    def record(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}"

    def owner(self, node_id: str) -> str:
        return f"{self.prefix}owner:{node_id}"


@dataclass
class _Raw:
    """One read: the Redis time (ms), the data set's epoch, every usable node's heartbeat (ms)
    and record, and how many records could not be used."""

    now_ms: int
    epoch: str | None
    nodes: dict[str, tuple[int, dict[str, Any]]]
    skipped: int


def _number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# Every field of a record (see ClusterMember._record) and the check its value must pass.
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
    if type(version) is not int or version != _RECORD_VERSION:
        return None
    for name, check in _FIELDS.items():
        if name not in record or not check(record[name]):
            return None
    return record


def _read(client: Any, keys: _Keys) -> _Raw:
    """Two round trips: the server's time with the index and the epoch, then every record.

    A record that is not one this version writes is skipped (logged, counted in ``skipped``),
    never fatal; an answer that is not what Redis sends raises ``ValueError``/``TypeError``.
    """
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.zrange(keys.index, 0, -1, withscores=True)
    pipe.get(keys.epoch)
    (seconds, micros), members, epoch = pipe.execute()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    beats: dict[str, int] = {}
    skipped = 0
    for member, score in members:
        try:
            beats[_text(member)] = int(score)
        except UnicodeDecodeError:  # not an id any node writes
            skipped += 1
    ids = list(beats)
    nodes: dict[str, tuple[int, dict[str, Any]]] = {}
    if ids:
        for node_id, raw in zip(ids, client.mget([keys.record(i) for i in ids])):
            if raw is None:
                continue  # expired (or Redis lost it); the index entry is pruned later
            record = parse_record(raw)
            if record is None:
                skipped += 1
                logger.bind(node=node_id).warning(
                    "Unreadable cluster record (not JSON, another version or a wrong field); "
                    "skipped"
                )
                continue
            nodes[node_id] = (beats[node_id], record)
    return _Raw(now_ms, None if epoch is None else _text(epoch), nodes, skipped)


def _node(node_id: str, record: Mapping[str, Any], age: float, silent: float) -> NodeHealth:
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


def cluster_health(target: object, *, namespace: str = "dwcp", timeout: float = 2.0) -> ClusterView:
    """Read every node's last snapshot once, from a Redis URL or ``redis.Redis`` client.

    A node is ``alive`` when its last heartbeat is no older than its bound, ``lost`` when it
    is, ``left`` when it said goodbye: the same rule as a watching ``ClusterMember`` that has
    read Redis without a failure (see its docstring).  Records this version cannot read are
    skipped and counted in ``ClusterView.skipped``.  Raises ``ClusterError`` when Redis cannot
    be reached or answers with something unreadable, ``ValueError``/``TypeError`` for a bad
    ``target``, ``namespace`` or ``timeout`` (seconds, bounding each socket operation).
    """
    keys = _Keys(_check_namespace(namespace))
    client = _connect(target, _positive("timeout", timeout))
    try:
        raw = _read(client, keys)
    except _redis_errors() as exc:
        raise ClusterError(f"cannot read the cluster from Redis: {_describe(exc)}") from exc
    except (ValueError, TypeError) as exc:
        raise ClusterError(f"unreadable answer from the cluster's Redis: {_describe(exc)}") from exc
    finally:
        if isinstance(target, str):
            client.close()
    nodes = {
        node_id: _node(node_id, record, age, age)
        for node_id, (beat, record) in raw.nodes.items()
        for age in ((raw.now_ms - beat) / 1000.0,)
    }
    return ClusterView(MappingProxyType(nodes), False, None, 0.0, namespace, raw.skipped)


class ClusterMember:
    """This process's place in a cluster: publishes its snapshots, watches everyone's.

    ``publish(snapshot)`` only hands the snapshot over; a thread named ``dwcp-cluster`` sends
    it (one Redis round trip), then reads the cluster (two), so a slow or unreachable Redis
    never holds up the caller.  A node is lost when its last heartbeat is older than
    ``lost_after`` times its interval; the watcher reports a change within that bound plus
    one of its own intervals, through ``on_event`` (``NodeLost``/``NodeBack``, never for
    this node itself).  The first read judges every node by the age of its last heartbeat,
    as ``cluster_health()`` does: a node already dead is listed lost at once, without an
    event; its return is a ``NodeBack``.  So is the return of a node that was lost for so
    long that Redis dropped it (``retention``): the last ``1024`` nodes found lost are
    remembered after they are no longer listed.

    While Redis is unreachable ``view()`` keeps the last nodes read, marked ``stale``, and no
    node is declared lost.  Once it answers again, or when it lost its data (restarted
    empty: an epoch key that every publish writes if missing tells), every node that was
    alive gets a full bound from then to be heard from before it can be declared lost; a
    node lost before stays lost.  A node Redis no longer has is listed no more, as
    ``cluster_health()`` lists it no more: a node lost before a restart at once, one alive
    before it once that bound passes without news (a ``NodeLost`` then).  Records that this
    version cannot read are skipped and counted (``ClusterView.skipped``, ``skipped``);
    their nodes are not listed.

    Parameters: ``target`` a ``redis://`` URL or a ``redis.Redis`` client (it may be the one
    the shared breaker uses); ``node_id`` this node's id (default ``default_node_id()``);
    ``namespace`` the key prefix shared by the cluster; ``interval`` the longest expected gap
    between two publishes (seconds); ``lost_after`` the multiple of ``interval`` after which
    a silent node is lost; ``retention`` how long a dead node's entry stays listed (default
    the larger of 60 s and ten bounds); ``watch`` whether to read the cluster after each
    publish (in a large cluster a few watching nodes may do: each read carries every
    record); ``on_event`` a first event callback (more with ``add_listener``); ``timeout``
    each Redis operation's socket timeout.
    """

    def __init__(
        self,
        target: object,
        node_id: str | None = None,
        *,
        namespace: str = "dwcp",
        interval: float = 10.0,
        lost_after: float = 3.0,
        retention: float | None = None,
        watch: bool = True,
        on_event: ClusterListener | None = None,
        timeout: float = 0.5,
    ) -> None:
        self._node_id = _check_node_id(default_node_id() if node_id is None else node_id)
        self._namespace = _check_namespace(namespace)
        self._interval = _positive("interval", interval)
        lost_after = _positive("lost_after", lost_after)
        if lost_after < 1.5:
            raise ValueError(f"lost_after must be at least 1.5 intervals, got {lost_after!r}")
        self._bound = round(lost_after * self._interval, 6)
        self._retention = (
            max(60.0, 10 * self._bound) if retention is None else _positive("retention", retention)
        )
        if self._retention < self._bound:
            raise ValueError(
                f"retention ({self._retention}s) must not be shorter than the lost bound "
                f"({self._bound}s)"
            )
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be callable, got {type(on_event).__name__}")
        self._watch = bool(watch)
        self._listeners: tuple[ClusterListener, ...] = () if on_event is None else (on_event,)
        self._keys = _Keys(self._namespace)
        self._client = _connect(target, _positive("timeout", timeout))
        self._owns_client = isinstance(target, str)
        self._errors = _redis_errors()
        self._token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._script: Any = self._client.register_script(_PUBLISH)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: dict[str, Any] | None = None
        self._seq = 0
        self._view = ClusterView(MappingProxyType({}), True, "not read yet", 0.0, self._namespace)
        self._read_at: float | None = None  # monotonic time of the last successful read
        self._failing = False  # the last Redis operation failed
        self._gap = False  # a failure since the last successful read (see _refresh)
        # The data set's epoch as last read (see _PUBLISH); a change means Redis lost it.
        self._epoch: str | None = None
        # Redis time (ms) from which a node's silence counts, for the nodes that were alive
        # when an outage (ours or Redis's) or an empty restart began, see _refresh.
        self._grace: dict[str, int] = {}
        # What the watcher knows of each node listed: last heartbeat (ms) and record.
        self._known: dict[str, tuple[int, dict[str, Any]]] = {}
        self._states: dict[str, NodeState] = {}
        # Monotonic time each node was found lost or gone, kept after the node is no longer
        # listed (at most _REMEMBERED of them) so that its return is a NodeBack.
        self._lost_since: dict[str, float] = {}
        #: Records skipped since the member started (see ``ClusterView.skipped``).
        self.skipped = 0
        self._clash: str | None = None
        # Learned outage timing shared per component (see dwcp._shared_history).
        self._histories: dict[str, SharedHistory] = {}
        #: Redis round trips made, records published (and their bytes), failed operations.
        self.round_trips = 0
        self.published = 0
        self.published_bytes = 0
        self.errors = 0
        self.last_error: str | None = None

    # -- public ---------------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        """This node's id in the cluster."""
        return self._node_id

    @property
    def bound(self) -> float:
        """Seconds of silence after which this node is reported lost."""
        return self._bound

    @property
    def clash(self) -> str | None:
        """The other process publishing under this node id (its owner token), if any."""
        return self._clash

    def outage_history(self, manager: str, component: str) -> SharedHistory:
        """The shared outage history of ``component`` under managers named ``manager``.

        Read from Redis when the member starts (or at the thread's next pass, if it runs
        already); the outages pushed to it are written by the thread.  No I/O here.
        """
        key = history_key(self._namespace, manager, component)
        with self._lock:
            history = self._histories.get(key)
            if history is None:
                history = self._histories[key] = SharedHistory(key)
            running = self._thread is not None
        if running:
            self._wake.set()
        return history

    def add_listener(self, callback: ClusterListener) -> None:
        """Also call ``callback(event)`` for each ``NodeLost``/``NodeBack``, from the thread."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        with self._lock:
            self._listeners = (*self._listeners, callback)

    def start(self) -> None:
        """Check Redis once (a failure is logged, not raised) and start the thread."""
        with self._lock:
            if self._thread is not None:
                return
            self._stop.clear()
            thread = threading.Thread(target=self._run, name=_THREAD_NAME, daemon=True)
            self._thread = thread
        try:
            self._client.ping()
        except self._errors as exc:
            self._failed(exc)
        else:
            self._load_histories()
        if self._failing:
            self._load_histories(failed=True)
        thread.start()

    def publish(self, snapshot: HealthSnapshot | Mapping[str, Any]) -> None:
        """Hand the thread a snapshot to publish with the next heartbeat (no I/O here)."""
        document = (
            snapshot_document(snapshot) if isinstance(snapshot, HealthSnapshot) else dict(snapshot)
        )
        with self._lock:
            self._pending = document
        self._wake.set()

    def view(self) -> ClusterView:
        """The cluster as last read (no I/O); ``stale`` while Redis is unreachable."""
        with self._lock:
            view, read_at = self._view, self._read_at
        if view.stale and read_at is not None:
            age = time.monotonic() - read_at
            return ClusterView(view.nodes, True, view.error, age, view.namespace, view.skipped)
        return view

    def refresh(self) -> ClusterView:
        """Read the cluster now, on the caller's thread, and return the view."""
        self._refresh()
        return self.view()

    def close(self, timeout: float = 5.0) -> None:
        """Say goodbye (the node is listed as ``left``), stop the thread and join it."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            self._wake.set()
            thread.join(timeout)
            if thread.is_alive():
                logger.bind(node=self._node_id).warning("Cluster thread did not stop in time")
        if self._owns_client:
            self._client.close()

    # -- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            # Wakes on a publish; otherwise reads the cluster once per interval.
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._pass()
            except Exception as exc:  # noqa: BLE001 - the watcher outlives any bug in a pass
                logger.opt(exception=exc).error("Cluster pass failed")
        self._goodbye()

    def _pass(self) -> None:
        self._load_histories()
        self._write_histories()
        with self._lock:
            document, self._pending = self._pending, None
        if document is not None:
            self._publish(document)
        if self._watch:
            self._refresh()

    def _record(self, document: Mapping[str, Any], *, left: bool = False) -> str:
        return json.dumps(
            {
                "v": _RECORD_VERSION,
                "node": self._node_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "interval": self._interval,
                "bound": self._bound,
                "seq": self._seq,
                "left": left,
                "health": document,
            },
            separators=(",", ":"),
        )

    def _publish(self, document: Mapping[str, Any], *, left: bool = False) -> bool:
        self._seq += 1
        record = self._record(document, left=left)
        keys = [
            self._keys.record(self._node_id),
            self._keys.owner(self._node_id),
            self._keys.index,
            self._keys.epoch,
        ]
        lease = int(self._bound * 1000)
        args = [self._token, record, lease, int(self._retention * 1000), self._node_id]
        try:
            self.round_trips += 1
            ok, owner, _now = self._script(keys=keys, args=args)
        except self._errors as exc:
            self._failed(exc)
            return False
        if not int(ok):
            other = _text(owner)
            if self._clash != other:
                logger.bind(node=self._node_id, other=other).warning(
                    "Cluster node id already in use by another live process; not publishing"
                )
            self._clash = other
            return False
        self._answered()
        if self._clash is not None:
            logger.bind(node=self._node_id).info("Cluster node id free again; publishing")
            self._clash = None
        self.published += 1
        self.published_bytes += len(record)
        return True

    def _goodbye(self) -> None:
        with self._lock:
            document = self._pending
            last = self._known.get(self._node_id)
        if document is None and last is not None:
            document = last[1].get("health")
        if self._clash is not None or self._failing:
            return
        self._write_histories()
        if self._publish(document or {}, left=True):
            try:
                self._client.eval(_RELEASE, 1, self._keys.owner(self._node_id), self._token)
            except self._errors as exc:
                self._failed(exc)

    # -- shared outage history -----------------------------------------------------------------

    def _load_histories(self, *, failed: bool = False) -> None:
        """Read every history not read yet, in one round trip; on failure they go on with
        their local history (logged once)."""
        with self._lock:
            waiting = [h for h in self._histories.values() if h.needs_load]
        if not waiting:
            return
        if not failed:
            try:
                self.round_trips += 1
                pipe = self._client.pipeline(transaction=False)
                for history in waiting:
                    pipe.lrange(history.key, 0, -1)
                lists = pipe.execute()
            except self._errors as exc:
                self._failed(exc)
            else:
                for history, raw in zip(waiting, lists):
                    history.loaded(list(raw) if isinstance(raw, list) else None)
                logger.bind(node=self._node_id, outages=sum(h.read for h in waiting)).debug(
                    "Shared outage history read"
                )
                return
        logger.bind(node=self._node_id, error=self.last_error).warning(
            "Shared outage history not read; recovery learns from local outages only"
        )
        for history in waiting:
            history.loaded(None)

    def _write_histories(self) -> None:
        """Append the outages recovered from since the last pass (one round trip)."""
        with self._lock:
            histories = list(self._histories.values())
        batches = [(h, h.pending()) for h in histories]
        batches = [(h, outages) for h, outages in batches if outages]
        if not batches:
            return
        try:
            self.round_trips += 1
            pipe = self._client.pipeline(transaction=True)
            for history, outages in batches:
                pipe.rpush(history.key, *(encode_outage(o) for o in outages))
                pipe.ltrim(history.key, -WINDOW, -1)
            pipe.execute()
        except self._errors as exc:
            self._failed(exc)  # kept queued (at most WINDOW each) for the next pass
            return
        self._answered()
        for history, outages in batches:
            history.written(len(outages))

    # -- reading --------------------------------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = _describe(exc)
        with self._lock:
            first = not self._failing
            self._failing = self._gap = True
            view = self._view
            self._view = ClusterView(
                view.nodes, True, self.last_error, view.age, view.namespace, view.skipped
            )
        if first:
            logger.bind(node=self._node_id, error=self.last_error).warning(
                "Cluster Redis unreachable; the cluster view is stale until it answers"
            )

    def _answered(self) -> None:
        with self._lock:
            was_failing, self._failing = self._failing, False
        if was_failing:
            logger.bind(node=self._node_id).info("Cluster Redis reachable again")

    def _refresh(self) -> None:
        try:
            self.round_trips += 2
            raw = _read(self._client, self._keys)
        except self._errors as exc:
            self._failed(exc)
            return
        except (ValueError, TypeError) as exc:  # an answer that is not what Redis sends
            self._failed(exc)
            return
        self._answered()
        now_mono = time.monotonic()
        with self._lock:
            self.skipped += raw.skipped
            events = self._update(raw, now_mono)
            self._read_at = now_mono
        for event in events:
            for callback in self._listeners:
                try:
                    callback(event)
                except Exception as exc:  # noqa: BLE001 - a bad callback must not stop the watch
                    logger.opt(exception=exc).error("Cluster event callback raised")

    def _update(self, raw: _Raw, now_mono: float) -> list[NodeLost | NodeBack]:
        """The new view from one read, and the events it makes; the caller holds the lock.

        Without a failure since the last read, a node's silence is the age of its last
        heartbeat, as for ``cluster_health()``, the first read included: a node already dead
        then is lost at once.  After a failure (ours or Redis's), or when the epoch says Redis
        lost its data (restarted empty), the nodes alive before get a full bound from now to
        be heard from; a node lost before stays lost.  A node Redis no longer has (expired
        after ``retention``, or not republished after an empty restart within that bound)
        is listed no more, as ``cluster_health()`` lists it no more.
        """
        now = raw.now_ms
        restarted = self._epoch is not None and raw.epoch != self._epoch
        if raw.epoch is not None or restarted:
            self._epoch = raw.epoch
        if self._gap or restarted:
            # Silence during an outage says nothing about a node that was alive: count it
            # from now on.  (The first read has no "before": nothing to excuse.)
            for node_id, state in self._states.items():
                if state == "alive":
                    self._grace[node_id] = now
            self._gap = False
        for node_id, entry in raw.nodes.items():
            known = self._known.get(node_id)
            if known is None or entry[0] >= known[0]:
                self._known[node_id] = entry
        nodes: dict[str, NodeHealth] = {}
        dropped: dict[str, NodeHealth] = {}
        for node_id, (beat, record) in list(self._known.items()):
            age = (now - beat) / 1000.0
            grace = self._grace.get(node_id, beat)
            if grace <= beat:
                self._grace.pop(node_id, None)  # heard from since: the grace is spent
            silent = (now - max(beat, grace)) / 1000.0
            node = _node(node_id, record, age, silent)
            if node_id not in raw.nodes and (node.state != "alive" or node_id not in self._grace):
                del self._known[node_id]  # Redis has it no more: neither do we
                self._grace.pop(node_id, None)
                dropped[node_id] = node
                continue
            nodes[node_id] = node
        events: list[NodeLost | NodeBack] = []
        for node_id in [n for n in self._states if n not in nodes]:
            gone = dropped.get(node_id)
            if (
                self._states.pop(node_id) == "alive"
                and gone is not None
                and node_id != self._node_id
            ):
                # Gone without a word past its bound (not back after an empty restart) or
                # its record became unreadable: no longer heard from.
                self._remember_lost(node_id, now_mono)
                events.append(NodeLost(node_id, round(gone.age, 3), gone.bound, "silent"))
        for node_id, node in nodes.items():
            before = self._states.get(node_id)
            self._states[node_id] = node.state
            if before == node.state or node_id == self._node_id:
                continue
            if node.state == "alive":
                since = self._lost_since.pop(node_id, None)
                if before is not None or since is not None:
                    down = now_mono - (now_mono if since is None else since)
                    events.append(NodeBack(node_id, round(down, 3)))
            elif before is None:
                # First sight of a node already lost or gone: listed so, without an event,
                # but its return is news.
                self._remember_lost(node_id, now_mono - node.age)
            elif before == "alive":
                self._remember_lost(node_id, now_mono)
                reason = "left" if node.state == "left" else "silent"
                events.append(NodeLost(node_id, round(node.age, 3), node.bound, reason))
        self._view = ClusterView(
            MappingProxyType(nodes), False, None, 0.0, self._namespace, raw.skipped
        )
        return events

    def _remember_lost(self, node_id: str, since: float) -> None:
        self._lost_since.pop(node_id, None)
        self._lost_since[node_id] = since
        while len(self._lost_since) > _REMEMBERED:
            del self._lost_since[next(iter(self._lost_since))]


def cluster_member(
    cluster: object,
    node_id: str | None,
    *,
    interval: float,
    on_event: ClusterListener | None,
) -> ClusterMember | None:
    """The ``ClusterMember`` for a Manager's ``cluster``/``node_id`` arguments, or None.

    ``cluster`` is None (no cluster), a ``redis://`` URL, a ``redis.Redis`` client, or a
    ``ClusterMember`` configured by the caller (its own node id, interval, ``watch``...).
    """
    if cluster is None:
        if node_id is not None:
            raise ValueError("node_id needs cluster (a redis:// URL or a redis.Redis client)")
        return None
    if isinstance(cluster, ClusterMember):
        if node_id is not None:
            raise ValueError("node_id cannot be given with a ClusterMember (it has its own)")
        if on_event is not None:
            cluster.add_listener(on_event)
        return cluster
    return ClusterMember(cluster, node_id, interval=interval, on_event=on_event)


def render_cluster(view: ClusterView) -> str:
    """A table of every node in ``view``, for ``python -m dwcp status --cluster``."""
    verdict = "healthy" if view.healthy else "UNHEALTHY"
    alive = sum(1 for n in view.nodes.values() if n.alive)
    head = f"DWCP cluster {view.namespace!r} {verdict}: {alive}/{len(view.nodes)} nodes alive"
    if view.stale:
        head += f" (stale: {view.error})"
    if view.skipped:
        head += f" ({view.skipped} unreadable records skipped)"
    rows = [("NODE", "STATE", "HEALTH", "BREAKER", "LAST HEARTBEAT", "BOUND", "HOST", "PID")]
    for node in sorted(view.nodes.values(), key=lambda n: n.node):
        rows.append(
            (
                node.node,
                node.state,
                str(node.snapshot.get("status", "?")),
                str(node.snapshot.get("breaker", "?")),
                f"{node.age:.1f}s ago",
                f"{node.bound:g}s",
                node.host,
                str(node.pid),
            )
        )
    if len(rows) == 1:
        return head + "\n\n(no nodes have published)"
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([head, "", *lines])
