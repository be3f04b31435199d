"""A small HTTP server exposing a Manager's liveness, readiness, health and metrics.

Endpoints (GET, and HEAD for the same answer without a body; any other method gets 405,
any other path 404):

``/livez``
    200 while the manager's monitoring thread is alive, 503 otherwise.
``/readyz``
    200 when the manager is started, the transport (or, without one, every component) is
    healthy and the circuit breaker is not open; 503 otherwise.
``/healthz``
    A JSON document (see ``health_document``) with the same status code as ``/readyz``.
``/cluster``
    With ``Manager(cluster=...)``: the cluster document (``dwcp.cluster.cluster_document``),
    200 when every node is alive and healthy and the view is fresh, 503 otherwise; 404
    without a cluster.
``/metrics``
    The Prometheus exposition of ``dwcp.prometheus.DWCPCollector`` when ``prometheus_client``
    is installed (OpenMetrics when the ``Accept`` header asks for it), 404 with an
    explanation when it is not.

Handlers only read the manager's snapshots, so no lock is ever held while a socket is
written.  Request logs go to loguru at debug level, never to stderr.
"""

from __future__ import annotations

import json
import socket
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from loguru import logger

from dwcp import _validation as check
from dwcp._errors import DWCPError
from dwcp._health import HealthSnapshot, _manager_name, component_documents
from dwcp._lifecycle import StartStop

if TYPE_CHECKING:
    from dwcp._source import HealthSource

__all__ = ["HealthServer", "health_document"]

_THREAD_NAME = "dwcp-http"
# How often serve_forever looks at its shutdown flag; it bounds how long stop() takes.
_POLL_INTERVAL = 0.05
# A client that connects and then says nothing must not pin a handler thread for ever.
_REQUEST_TIMEOUT = 10.0
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"
_ALLOW = "GET, HEAD"
_METRICS_MISSING = (
    b"Prometheus metrics need the optional prometheus_client package: "
    b"pip install 'dwcp[prometheus]'\n"
)


def _utc_timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ready(started: bool, health: HealthSnapshot) -> bool:
    components = health.components
    needed = [components["transport"]] if "transport" in components else components.values()
    return started and health.breaker_state != "open" and all(c.healthy for c in needed)


def health_document(manager: HealthSource) -> tuple[bool, dict[str, Any]]:
    """Return ``(ready, document)``: the ``/readyz`` verdict and the ``/healthz`` document.

    The document's ``status`` is ``healthy`` when the manager is started, every component is
    healthy and the breaker is not open; ``ready`` (the first item, and the document's
    ``ready``) needs only the transport healthy (every component without one), the manager
    started and the breaker not open.
    """
    started = manager.is_started
    health = manager.health()
    metrics = manager.metrics()
    ready = _ready(started, health)
    rate = metrics.recovery_success_rate
    document: dict[str, Any] = {
        "status": "healthy" if started and health.healthy else "unhealthy",
        "manager": _manager_name(manager),
        "ready": ready,
        "started": started,
        "monitor_alive": manager.monitor_alive,
        "timestamp": _utc_timestamp(),
        "breaker": {"state": health.breaker_state, "storage": health.breaker_storage},
        "components": component_documents(health.components),
        "metrics": {
            "health_checks": metrics.health_checks,
            "component_checks": metrics.component_checks,
            "recovery_attempts": metrics.recovery_attempts,
            "recoveries_succeeded": metrics.recoveries_succeeded,
            "recoveries_failed": metrics.recoveries_failed,
            "recovery_success_rate": None if rate is None else round(rate, 4),
            "breaker_state_changes": metrics.breaker_state_changes,
            "breaker_rejections": metrics.breaker_rejections,
            "sends": metrics.sends,
            "sent_bytes": metrics.sent_bytes,
            "send_errors": metrics.send_errors,
            "calls": metrics.calls,
            "call_errors": metrics.call_errors,
            "call_rejections": metrics.call_rejections,
            "events_dropped": metrics.events_dropped,
            "breaker_storage_errors": metrics.breaker_storage_errors,
            "downtime_seconds": {k: round(v, 3) for k, v in metrics.downtime_seconds.items()},
        },
    }
    return ready, document


def _cluster_route(manager: HealthSource) -> tuple[int, str, bytes]:
    # /cluster: every node of the manager's cluster (dwcp.cluster), 503 unless all are fine.
    from dwcp._cluster import cluster_document

    try:
        view = manager.cluster_health()
    except DWCPError:
        return 404, _TEXT, b"no cluster configured; see Manager(cluster=...)\n"
    body = (json.dumps(cluster_document(view), indent=2) + "\n").encode()
    return 200 if view.healthy else 503, _JSON, body


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Hand-off to the handlers: set once before serving, read-only afterwards.
    manager: HealthSource
    metrics: Any  # the dwcp.prometheus registry, or None without prometheus_client

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints tracebacks to stderr; a library logs instead.  Clients that hang
        # up mid-response are routine for probes, hence debug.
        logger.opt(exception=True).bind(client=str(client_address)).debug(
            "HTTP request handling failed"
        )


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = _REQUEST_TIMEOUT
    server_version = "dwcp"

    def do_GET(self) -> None:
        try:
            code, content_type, body = self._route(urlsplit(self.path).path)
        except Exception as exc:  # noqa: BLE001 - a probe gets a 500, never a dropped connection
            logger.opt(exception=exc).bind(request=self.requestline).error("HTTP handler failed")
            code, content_type, body = 500, _TEXT, b"internal error; see the application log\n"
        self._reply(code, content_type, body)

    # Uptime checkers probe with HEAD: the same status and headers, no body (see _reply).
    do_HEAD = do_GET

    def _route(self, path: str) -> tuple[int, str, bytes]:
        manager = self.server.manager
        if path == "/livez":
            alive = manager.monitor_alive
            return (200, _TEXT, b"ok\n") if alive else (503, _TEXT, b"monitor not running\n")
        if path == "/readyz":
            ready = _ready(manager.is_started, manager.health())
            return (200, _TEXT, b"ready\n") if ready else (503, _TEXT, b"not ready\n")
        if path == "/healthz":
            ready, document = health_document(manager)
            return 200 if ready else 503, _JSON, (json.dumps(document, indent=2) + "\n").encode()
        if path == "/cluster":
            return _cluster_route(manager)
        if path == "/metrics":
            registry = self.server.metrics
            if registry is None:
                return 404, _TEXT, _METRICS_MISSING
            from prometheus_client.exposition import choose_encoder

            # prometheus_client's own choice: OpenMetrics when Accept asks for it, else text.
            encode, content_type = choose_encoder(self.headers.get("Accept") or "")
            return 200, content_type, encode(registry)
        return 404, _TEXT, b"not found; try /livez, /readyz, /healthz or /metrics\n"

    def _not_allowed(self) -> None:
        self._reply(405, _TEXT, b"method not allowed; only GET and HEAD\n", allow=_ALLOW)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _reply(self, code: int, content_type: str, body: bytes, *, allow: str = "") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if allow:
            self.send_header("Allow", allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # http.server passes HTTPStatus members for its own errors; log the number.
        status = int(code) if isinstance(code, int) else code
        logger.bind(client=self.client_address[0], request=self.requestline, status=status).debug(
            "HTTP request"
        )

    def log_message(self, format: str, *args: Any) -> None:
        # Everything else http.server would print to stderr (errors, timeouts).
        logger.bind(client=self.client_address[0], detail=format % args).debug(
            "HTTP server message"
        )


def _metrics_registry(manager: HealthSource) -> Any:
    try:
        from prometheus_client import CollectorRegistry

        from dwcp.prometheus import register_metrics
    except ImportError:
        return None
    registry = CollectorRegistry()
    register_metrics(manager, registry)
    return registry


class HealthServer(StartStop):
    """Serves ``/livez``, ``/readyz``, ``/healthz`` and ``/metrics`` for a Manager.

    ``start()`` binds ``host`` and ``port`` (``port=0`` picks a free port; read ``address`` or
    ``url``) and serves on a thread named ``dwcp-http``; ``stop()`` (or its alias ``close()``)
    shuts it down and joins it.  ``host`` must be a str and ``port`` an int from 0 to 65535:
    anything else raises ``TypeError`` or ``ValueError`` here, not in ``start()``.
    """

    def __init__(self, manager: HealthSource, host: str = "127.0.0.1", port: int = 0) -> None:
        self._manager = manager
        self._host = check.host_name("host", check.name("host", host))
        self._port = check.port("port", port)
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``; raises ``DWCPError`` (``NOT_STARTED``) before ``start()``."""
        server = self._server
        if server is None:
            raise DWCPError("health server is not started", code="NOT_STARTED")
        host, port = server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        """The base URL, such as ``http://127.0.0.1:8080``; raises like ``address``."""
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        """Bind the socket and serve on a background thread.

        Raises ``DWCPError`` with code ``HEALTH_SERVER_FAILED`` (the ``OSError`` as its
        ``__cause__``) when it cannot listen, say on a port in use, leaving the server
        stopped, and ``ALREADY_STARTED`` while it runs.
        """
        with self._lock:
            if self._server is not None:
                raise DWCPError("health server is already started", code="ALREADY_STARTED")
            server_class = _Server6 if ":" in self._host else _Server
            try:
                server = server_class((self._host, self._port), _Handler)
            except OSError as exc:  # socket.gaierror for a bad host is one too
                raise DWCPError(
                    f"health server could not listen on {self._where()}: {check.describe(exc)}",
                    code="HEALTH_SERVER_FAILED",
                ) from exc
            server.manager = self._manager
            server.metrics = _metrics_registry(self._manager)
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": _POLL_INTERVAL},
                name=_THREAD_NAME,
                daemon=True,
            )
            self._server, self._thread = server, thread
            thread.start()
        url = self.url
        logger.bind(url=url).info(f"Health server started on {url}")

    def stop(self) -> None:
        """Stop serving, join the thread and close the socket; idempotent."""
        with self._lock:
            server, self._server = self._server, None
            thread, self._thread = self._thread, None
        if server is None or thread is None:
            return
        # Outside the lock: shutdown() waits for serve_forever to notice, up to one poll.
        server.shutdown()
        thread.join()
        server.server_close()
        logger.info("Health server stopped")

    def close(self) -> None:
        """Alias of ``stop()``, for code that closes what it opened."""
        self.stop()

    def _where(self) -> str:
        return f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"

    def __repr__(self) -> str:
        try:
            where = self.url
        except DWCPError:
            where = f"{self._host} port {self._port}, not started"
        return f"<HealthServer {where}>"
