"""This process's place in a cluster: ``ClusterMember`` publishes its health snapshots with
a heartbeat and watches every node's, on a thread named ``dwcp-cluster``.

The key layout and record format are ``dwcp._cluster_schema``'s, a read is
``dwcp._cluster_read``'s, the documents and table ``dwcp._cluster_render``'s; this module
re-exports their public names.  Under ``<namespace>:history:`` (see
``dwcp._shared_history``), ``<manager>:<component>`` is a list of the last outages a
predictive component recovered from, capped at ``WINDOW``: read once when the member starts
(one round trip for all components), appended to by the pass that follows an outage (one
round trip)."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import Any

from loguru import logger

from dwcp import _validation as check
from dwcp._cluster_read import (
    _connect,
    _describe,
    _Raw,
    _read,
    _redis_errors,
    _text,
    cluster_health,
)
from dwcp._cluster_render import cluster_document, render_cluster, snapshot_document
from dwcp._cluster_schema import (
    BOUND_MAX,
    INTERVAL_MAX,
    INTERVAL_MIN,
    ClusterError,
    ClusterView,
    NodeHealth,
    NodeState,
    _check_namespace,
    _Keys,
    check_health,
    make_record,
    node_health,
)
from dwcp._errors import DWCPError
from dwcp._events import NodeBack, NodeLost
from dwcp._health import HealthSnapshot
from dwcp._lifecycle import StartStop
from dwcp._shared_history import SharedHistory, history_key, read_histories, write_histories

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

ClusterListener = Callable[["NodeLost | NodeBack"], None]

_THREAD_NAME = "dwcp-cluster"
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


def default_node_id() -> str:
    """Host name and process id, such as ``web-3-12345``."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _check_node_id(node_id: object) -> str:
    check.name("node_id", node_id)  # TypeError for a non-string
    assert isinstance(node_id, str)
    if len(node_id) > _MAX_NODE_ID or not node_id.isprintable() or " " in node_id:
        raise ValueError(
            f"node_id must be 1 to {_MAX_NODE_ID} printable characters without spaces, "
            f"got {node_id!r}"
        )
    return node_id


class ClusterMember(StartStop):
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
    empty: an epoch key that every publish writes if missing, stamped with Redis's time,
    tells), the deadline of every node that was alive moves by the time nobody could
    publish, and by no more: from this watcher's last read before the gap (or the node's
    last heartbeat, if that came later) to its first read after it, or to the first publish
    into the emptied Redis when that came earlier.  A node
    killed before a restart that left Redis unreachable for ``d`` seconds is lost about
    ``d`` after its own deadline (up to one read interval on each side later); after a quick
    restart, at its own deadline plus at most one read interval.  A node lost before stays
    lost.  A node Redis no longer has is listed no more, as ``cluster_health()`` lists it no
    more: a node lost before a restart at once, one alive before it once its moved deadline
    passes without news (a ``NodeLost`` then).  Records that this
    version cannot read are skipped and counted (``ClusterView.skipped``, ``skipped``);
    their nodes are not listed.

    Parameters: ``target`` a ``redis://`` URL or a ``redis.Redis`` client (it may be the one
    the shared breaker uses); ``node_id`` this node's id (default ``default_node_id()``);
    ``namespace`` the key prefix shared by the cluster; ``interval`` the longest expected gap
    between two publishes (seconds, from ``INTERVAL_MIN`` 1 ms to ``INTERVAL_MAX`` one day);
    ``lost_after`` the multiple of ``interval`` after which a silent node is lost (at least
    1.5, and the bound it makes at most ``BOUND_MAX``, one week: a reader skips a record
    announcing more); ``retention`` how long a dead node's entry stays listed (default the
    larger of 60 s and ten bounds); ``watch`` (a bool) whether to read the cluster after each
    publish (in a large cluster a few watching nodes may do: each read carries every
    record); ``on_event`` a first event callback (more with ``add_listener``); ``timeout``
    each Redis operation's socket timeout.  Durations are seconds or ``timedelta``s.

    ``start()`` on a running member raises ``DWCPError`` (``ALREADY_STARTED``); used as a
    context manager, ``with`` starts the member and closes it on the way out.
    """

    def __init__(
        self,
        target: object,
        node_id: str | None = None,
        *,
        namespace: str = "dwcp",
        interval: float | timedelta = 10.0,
        lost_after: float = 3.0,
        retention: float | timedelta | None = None,
        watch: bool = True,
        on_event: ClusterListener | None = None,
        timeout: float | timedelta = 0.5,
    ) -> None:
        self._node_id = _check_node_id(default_node_id() if node_id is None else node_id)
        self._namespace = _check_namespace(namespace)
        self._interval = check.seconds(
            "interval", interval, minimum=INTERVAL_MIN, maximum=INTERVAL_MAX
        )
        lost_after = check.number("lost_after", lost_after)
        if lost_after < 1.5:
            raise ValueError(f"lost_after must be at least 1.5 intervals, got {lost_after!r}")
        self._bound = round(lost_after * self._interval, 6)
        if self._bound > BOUND_MAX:
            raise ValueError(
                f"lost_after times interval (the bound, {self._bound:g}s) must be at most "
                f"{BOUND_MAX:g} seconds: readers skip a record announcing more"
            )
        self._retention = (
            max(60.0, 10 * self._bound)
            if retention is None
            else check.seconds("retention", retention)
        )
        if self._retention < self._bound:
            raise ValueError(
                f"retention ({self._retention}s) must not be shorter than the lost bound "
                f"({self._bound}s)"
            )
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be callable, got {type(on_event).__name__}")
        self._watch = check.flag("watch", watch)
        self._listeners: tuple[ClusterListener, ...] = () if on_event is None else (on_event,)
        self._keys = _Keys(self._namespace)
        self._client = _connect(target, check.seconds("timeout", timeout))
        self._owns_client = isinstance(target, str)
        self._errors = _redis_errors()
        self._token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._script: Any = self._client.register_script(_PUBLISH)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The thread of the last start() (joined by the next start() when a close() from
        # its own callback could not join it), the latest start's end of its Redis check,
        # and whether the thread closes the client on its way out (closed from itself).
        self._last_thread: threading.Thread | None = None
        self._starting: threading.Event | None = None
        self._close_on_exit = False
        self._pending: dict[str, Any] | None = None
        self._seq = 0
        self._view = ClusterView(MappingProxyType({}), True, "not read yet", 0.0, self._namespace)
        self._read_at: float | None = None  # monotonic time of the last successful read
        self._failing = False  # the last Redis operation failed
        self._gap = False  # a failure since the last successful read (see _refresh)
        # The data set's epoch as last read (see _PUBLISH); a change means Redis lost it.
        self._epoch: str | None = None
        # Redis time (ms) of the last successful read: where the next gap starts, see _update.
        self._read_ms: int | None = None
        # For the nodes that were alive when an outage (ours or Redis's) or an empty restart
        # began: (their heartbeat then, ms of silence excused), until they are heard from.
        self._excused: dict[str, tuple[int, int]] = {}
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
        """Check Redis once (a failure is logged, not raised) and start the thread.

        Raises ``DWCPError`` with code ``ALREADY_STARTED`` when it runs already (started and
        not closed since); a closed member may be started again.  A ``close()`` from another
        thread while this checks Redis waits for the check to end, and the thread then never
        starts.  After a ``close()`` called from the member's own thread (an ``on_event``
        callback), this first waits up to 5 s for that thread to say goodbye and end
        (``DWCPError``, ``STILL_STOPPING``, if it has not).
        """
        previous = self._last_thread
        if previous is not None and previous is not threading.current_thread():
            previous.join(5.0)  # a close() from the callback did not join it
        with self._lock:
            if self._thread is not None:
                raise DWCPError("cluster member is already started", code="ALREADY_STARTED")
            if previous is not None and previous.is_alive():
                raise DWCPError(
                    "the cluster thread closed from its own callback has not ended yet",
                    code="STILL_STOPPING",
                )
            self._stop.clear()
            thread = threading.Thread(target=self._run, name=_THREAD_NAME, daemon=True)
            self._thread = thread
            self._starting = checked = threading.Event()
        try:
            self._check()
        finally:
            checked.set()
        with self._lock:
            if self._thread is not thread:  # close() came during the check: stay closed
                return
            thread.start()
            self._last_thread = thread

    def _check(self) -> None:
        """The start's one look at Redis (the boundary of ``start()``: whatever the client
        raises is logged and makes the view stale, never raised)."""
        try:
            self._client.ping()
        except Exception as exc:  # noqa: BLE001 - start() logs a failed check, never raises
            self._failed(exc)
        else:
            self._load_histories()
        if self._failing:
            self._load_histories(failed=True)

    def publish(self, snapshot: HealthSnapshot | Mapping[str, Any]) -> None:
        """Hand the thread a snapshot to publish with the next heartbeat (no I/O here).

        A mapping is published as the health document; one that readers would skip (see
        ``check_health``: ``{"status": 5}``, say) raises ``TypeError``/``ValueError`` here.
        """
        if isinstance(snapshot, HealthSnapshot):
            document = snapshot_document(snapshot)
        else:
            check_health(snapshot)
            document = dict(snapshot)
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

    def close(self, timeout: float | timedelta = 5.0) -> None:
        """Say goodbye (the node is listed as ``left``), stop the thread and join it, waiting
        up to ``timeout`` (seconds or a ``timedelta``) for it.

        During a ``start()`` on another thread, it first waits (within ``timeout``) for the
        start's Redis check to end; that start then returns without starting the thread.
        Called from the member's own thread (an ``on_event`` callback), it does not join
        that thread: the thread says goodbye, closes the connection and ends once the
        callback returns.
        """
        wait = check.seconds("timeout", timeout, allow_zero=True)
        deadline = time.monotonic() + wait
        with self._lock:
            thread, self._thread = self._thread, None
            starting, last = self._starting, self._last_thread
            own = thread is not None and thread is threading.current_thread()
            if own:
                self._close_on_exit = self._owns_client
        if thread is not None:
            self._stop.set()
            self._wake.set()
        # A start() still at its Redis check has not started the thread, and now never will
        # (it checks under the lock); its check ends within the socket timeouts.
        if starting is not None:
            starting.wait(max(deadline - time.monotonic(), 0.0))
        if own:
            return  # _run says goodbye and closes the client once the callback returns
        # The thread this call stopped, or (a second close() while the first still joins,
        # or one after a close() from the callback) the one still saying goodbye: the
        # client is closed only once it is done with it.
        ending = thread if thread is not None else last
        if ending is not None and ending is not threading.current_thread():
            if ending.ident is not None:
                ending.join(max(deadline - time.monotonic(), 0.0))
            if ending.is_alive():
                logger.bind(node=self._node_id).warning("Cluster thread did not stop in time")
        if self._owns_client:
            self._client.close()

    def stop(self, timeout: float | timedelta = 5.0) -> None:
        """Alias of ``close()``: every dwcp class that starts has both names."""
        self.close(timeout)

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
        try:
            self._goodbye()
        except Exception as exc:  # noqa: BLE001 - the thread's boundary: logged, never raised
            self._failed(exc)
        with self._lock:
            close, self._close_on_exit = self._close_on_exit, False
        if close:  # close() came from this thread's own callback: it left the client to us
            self._client.close()

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
        return make_record(
            self._node_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            interval=self._interval,
            bound=self._bound,
            seq=self._seq,
            left=left,
            health=document,
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
                read_histories(self._client, waiting)
            except self._errors as exc:
                self._failed(exc)
            else:
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
            write_histories(self._client, batches)
        except self._errors as exc:
            self._failed(exc)  # kept queued (at most WINDOW each) for the next pass
            return
        self._answered()

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
        lost its data (restarted empty), the silence of each node alive before is excused by
        the time nobody could publish: from our last read (or the node's heartbeat this read
        brings, if later) to this one, or to the first publish into the emptied Redis if that
        came earlier; a node lost before stays lost.  A node
        Redis no longer has (expired after ``retention``, or not republished after an empty
        restart by its excused deadline) is listed no more, as ``cluster_health()`` lists it
        no more.
        """
        now = raw.now_ms
        restarted = self._epoch is not None and raw.epoch != self._epoch
        if raw.epoch is not None or restarted:
            self._epoch = raw.epoch
        window: tuple[int, int] | None = None
        if (self._gap or restarted) and self._read_ms is not None:
            # Silence while nobody could publish says nothing about a node that was alive:
            # its deadline moves by that time, and by no more.  We cannot see when Redis went
            # away or came back, only that it answered at our last read and again now, so the
            # gap is bounded by that span; after an empty restart, by the first publish into
            # the emptied Redis (the epoch's stamp), when publishing was possible again.  That
            # bound is never shorter than the outage (a node that republished promptly is
            # never lost for it) and longer by at most a read's distance on each side.  (The
            # first read has no "before": nothing to excuse.)
            end = now
            if restarted:
                end = min(end, _epoch_ms(raw.epoch, default=now))
            window = (self._read_ms, end)
        alive_before = [n for n, state in self._states.items() if state == "alive"]
        self._gap = False
        self._read_ms = now
        for node_id, entry in raw.nodes.items():
            known = self._known.get(node_id)
            if known is None or entry[0] >= known[0]:
                self._known[node_id] = entry
        if window is not None:
            start, end = window
            for node_id in alive_before:
                known = self._known.get(node_id)
                if known is None:
                    continue
                # A heartbeat this read brings that was published inside the span (after our
                # last read, before Redis went away) is news, but the outage still follows
                # it: its silence from that heartbeat to the span's end is excused too.  The
                # span starts at the later of our last read and the node's last heartbeat.
                beat, excused = self._excused.get(node_id, (known[0], 0))
                if beat != known[0]:
                    excused = 0  # heard from since: earlier excuses are spent
                gap = max(0, end - max(start, known[0]))
                self._excused[node_id] = (known[0], excused + gap)
        nodes: dict[str, NodeHealth] = {}
        dropped: dict[str, NodeHealth] = {}
        for node_id, (beat, record) in list(self._known.items()):
            age = (now - beat) / 1000.0
            excused_beat, excused = self._excused.get(node_id, (beat, 0))
            if excused_beat != beat:
                self._excused.pop(node_id, None)  # heard from since: the excuse is spent
                excused = 0
            silent = (now - beat - excused) / 1000.0
            node = node_health(node_id, record, age, silent)
            if node_id not in raw.nodes and (node.state != "alive" or node_id not in self._excused):
                del self._known[node_id]  # Redis has it no more: neither do we
                self._excused.pop(node_id, None)
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


def _epoch_ms(epoch: str | None, *, default: int) -> int:
    """The Redis time (ms) an epoch was written at (``<token>:<ms>``, see _PUBLISH)."""
    try:
        return int((epoch or "").rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return default


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
    if not INTERVAL_MIN <= interval <= INTERVAL_MAX:
        raise ValueError(
            f"health_interval + health_check_timeout (the interval a cluster node announces) "
            f"must be from {INTERVAL_MIN:g} to {INTERVAL_MAX:g} seconds with a cluster, "
            f"got {interval:g}"
        )
    return ClusterMember(cluster, node_id, interval=interval, on_event=on_event)
