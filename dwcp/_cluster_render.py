"""The cluster in words: the health document a node publishes, the ``/cluster`` JSON
document, and the table ``python -m dwcp status --cluster`` prints."""

from __future__ import annotations

from typing import Any

from dwcp._cluster_schema import ClusterView
from dwcp._health import HealthSnapshot, component_documents

__all__ = ["cluster_document", "render_cluster", "snapshot_document"]


def snapshot_document(snapshot: HealthSnapshot) -> dict[str, Any]:
    """The compact JSON-ready form of a ``HealthSnapshot`` that a node publishes."""
    return {
        "status": "healthy" if snapshot.healthy else "unhealthy",
        "breaker": snapshot.breaker_state,
        "breaker_storage": snapshot.breaker_storage,
        "components": component_documents(snapshot.components),
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
