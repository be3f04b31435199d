"""Reading the cluster from Redis: the client, one read (two round trips), and
``cluster_health()``, the one-shot reader behind ``python -m dwcp status --cluster``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import Any

from loguru import logger

from dwcp import _validation as check
from dwcp._cluster_schema import (
    ClusterError,
    ClusterView,
    _check_namespace,
    _Keys,
    node_health,
    parse_record,
)

__all__ = ["cluster_health"]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _connect(target: object, timeout: float, parameter: str = "cluster") -> Any:
    from dwcp._shared import connect

    client = connect(target, timeout=timeout, parameter=parameter)
    for method in ("pipeline", "mget", "register_script", "close"):
        if not callable(getattr(client, method, None)):
            raise TypeError(
                f"{parameter} must be a redis.Redis client or a redis:// URL, got "
                f"{type(target).__name__} (no {method}())"
            )
    return client


def _redis_errors() -> tuple[type[BaseException], ...]:
    try:
        from redis.exceptions import RedisError
    except ImportError:  # pragma: no cover - without the extra there is no client to fail
        return (OSError,)
    return (RedisError, OSError)


@dataclass
class _Raw:
    """One read: the Redis time (ms), the data set's epoch, every usable node's heartbeat (ms)
    and record, and how many records could not be used."""

    now_ms: int
    epoch: str | None
    nodes: dict[str, tuple[int, dict[str, Any]]]
    skipped: int


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
            if record is not None and record["node"] != node_id:
                record = None  # filed under another node's id: not what a publisher writes
            if record is None:
                skipped += 1
                logger.bind(node=node_id).warning(
                    "Unreadable cluster record (not JSON, another version, a wrong field or "
                    "another node's id); skipped"
                )
                continue
            nodes[node_id] = (beats[node_id], record)
    return _Raw(now_ms, None if epoch is None else _text(epoch), nodes, skipped)


def cluster_health(
    target: object, *, namespace: str = "dwcp", timeout: float | timedelta = 2.0
) -> ClusterView:
    """Read every node's last snapshot once, from a Redis URL or ``redis.Redis`` client.

    A node is ``alive`` when its last heartbeat is no older than its bound, ``lost`` when it
    is, ``left`` when it said goodbye: the same rule as a watching ``ClusterMember`` that has
    read Redis without a failure (see its docstring).  Records this version cannot read are
    skipped and counted in ``ClusterView.skipped``.  Raises ``ClusterError`` when Redis cannot
    be reached or answers with something unreadable, ``ValueError``/``TypeError`` for a bad
    ``target``, ``namespace`` or ``timeout`` (seconds or a ``timedelta``, bounding each socket
    operation).
    """
    keys = _Keys(_check_namespace(namespace))
    client = _connect(target, check.seconds("timeout", timeout), "target")
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
        node_id: node_health(node_id, record, age, age)
        for node_id, (beat, record) in raw.nodes.items()
        for age in ((raw.now_ms - beat) / 1000.0,)
    }
    return ClusterView(MappingProxyType(nodes), False, None, 0.0, namespace, raw.skipped)
