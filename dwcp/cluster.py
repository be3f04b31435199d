"""Health across a cluster of managers, on Redis.

Each ``Manager(cluster=...)`` publishes its health snapshot with a heartbeat on every health
pass; ``Manager.cluster_health()`` (or ``cluster_health(url)`` from anywhere) returns every
node's last snapshot, its age, and whether it is alive.  A node silent for longer than
``lost_after`` times its interval is reported lost (``NodeLost``), and ``NodeBack`` when it is
heard from again.  Needs the optional ``redis`` extra; see ``dwcp._cluster`` for the key
layout.
"""

from dwcp._cluster import (
    ClusterError,
    ClusterMember,
    ClusterView,
    NodeHealth,
    NodeState,
    cluster_document,
    cluster_health,
    default_node_id,
    render_cluster,
    snapshot_document,
)

__all__ = [
    "ClusterError",
    "ClusterMember",
    "ClusterView",
    "NodeHealth",
    "NodeState",
    "cluster_document",
    "cluster_health",
    "default_node_id",
    "render_cluster",
    "snapshot_document",
]
