"""Learned outage timing shared through the cluster's Redis, so a new process starts warm.

With ``predictive`` recovery and a cluster, every outage a component recovers from is
appended to a capped Redis list, ``<namespace>:history:<manager>:<component>`` (the last
``WINDOW`` outages, as compact JSON).  A process reads those lists once, when its cluster
member starts, and its ``RestartSupervisor`` takes them in before its first schedule.

No Redis I/O happens under the manager's lock or on a recovery thread: ``push`` and
``take`` only move outages through this object, and the cluster member's thread does the
writes (one round trip per pass that has outages to write: ``RPUSH`` and ``LTRIM`` in one
``MULTI``), the read at start (one round trip for every component) and the logging.  When
Redis fails, the component goes on with its local history: a failed read is logged once
and not retried; a failed write is logged and retried with the next pass, at most
``WINDOW`` outages kept waiting.
"""

from __future__ import annotations

import json
import math
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

from loguru import logger

from dwcp._prediction import WINDOW, Outage

__all__ = [
    "SharedHistory",
    "decode_outage",
    "encode_outage",
    "history_key",
    "read_histories",
    "write_histories",
]


def history_key(namespace: str, manager: str, component: str) -> str:
    """The Redis list holding ``component``'s outages for managers named ``manager``."""
    return f"{namespace}:history:{manager}:{component}"


def encode_outage(outage: Outage) -> str:
    """One outage as the compact JSON stored in the list."""
    return json.dumps(
        {
            "r": outage.recovered_after,
            "n": outage.not_before,
            "a": outage.attempt,
            "b": outage.until,
        },
        separators=(",", ":"),
    )


def decode_outage(raw: object) -> Outage | None:
    """An outage from its stored JSON, or None when it is not one (a foreign entry)."""
    try:
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        record = json.loads(text)
        attempt = record.get("a")
        if attempt is not None and (isinstance(attempt, bool) or not isinstance(attempt, int)):
            return None
        values = [record["r"], record["n"], record["b"]]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            return None
        return Outage(float(values[0]), float(values[1]), attempt, float(values[2]))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


class SharedHistory:
    """One component's outages on their way to and from Redis (no I/O here).

    The recovery side calls ``push`` for each outage it learns and ``take`` for the outages
    read from Redis; the cluster member's thread calls ``pending``/``written``/``loaded``.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self._lock = threading.Lock()
        self._outgoing: deque[Outage] = deque(maxlen=WINDOW)
        self._incoming: list[Outage] = []
        self._loaded = False
        #: Outages read at start and written since, for tests and diagnostics.
        self.read = 0
        self.written_count = 0

    # -- the recovery side (under the manager's lock; never blocks on I/O) --------------------

    def push(self, outage: Outage) -> None:
        """Queue ``outage`` to be appended to the shared list by the cluster thread."""
        with self._lock:
            self._outgoing.append(outage)

    def take(self) -> list[Outage]:
        """The outages read from Redis not taken yet, oldest first."""
        with self._lock:
            taken, self._incoming = self._incoming, []
        return taken

    # -- the cluster thread's side ------------------------------------------------------------

    @property
    def needs_load(self) -> bool:
        with self._lock:
            return not self._loaded

    def loaded(self, raw: list[Any] | None) -> None:
        """The list as read at start (None: the read failed, go on with local history)."""
        outages = [] if raw is None else [o for o in map(decode_outage, raw) if o is not None]
        with self._lock:
            self._loaded = True
            self._incoming = outages + self._incoming
            self.read = len(outages)
        if raw is not None and len(outages) < len(raw):
            logger.bind(key=self.key, skipped=len(raw) - len(outages)).warning(
                "Unreadable entries in the shared outage history; skipped"
            )

    def pending(self) -> list[Outage]:
        """The outages waiting to be written (they stay queued until ``written``)."""
        with self._lock:
            return list(self._outgoing)

    def written(self, count: int) -> None:
        """The first ``count`` pending outages reached Redis."""
        with self._lock:
            for _ in range(min(count, len(self._outgoing))):
                self._outgoing.popleft()
            self.written_count += count


# -- the I/O, run by the cluster member's thread (which maps and logs the client's errors) --


def read_histories(client: Any, histories: Sequence[SharedHistory]) -> None:
    """Read every one of ``histories`` in one round trip and hand each its list."""
    pipe = client.pipeline(transaction=False)
    for history in histories:
        pipe.lrange(history.key, 0, -1)
    for history, raw in zip(histories, pipe.execute()):
        history.loaded(list(raw) if isinstance(raw, list) else None)


def write_histories(client: Any, batches: Sequence[tuple[SharedHistory, Sequence[Outage]]]) -> None:
    """Append each batch's outages to its history's list, capped at ``WINDOW``, in one
    round trip (``RPUSH`` and ``LTRIM`` in one ``MULTI``), then mark them written."""
    pipe = client.pipeline(transaction=True)
    for history, outages in batches:
        pipe.rpush(history.key, *(encode_outage(o) for o in outages))
        pipe.ltrim(history.key, -WINDOW, -1)
    pipe.execute()
    for history, outages in batches:
        history.written(len(outages))
