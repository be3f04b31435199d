"""The health server over real HTTP on 127.0.0.1: probes, the health document, metrics."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from loguru import logger
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import parser as _openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families

import dwcp
from dwcp.http import HealthServer
from dwcp.testing import FakeLayer, FakeTransport
from tests.conftest import wait_until

MakeManager = Callable[..., dwcp.Manager]
MakeServer = Callable[[dwcp.Manager], HealthServer]

# prometheus_client's OpenMetrics parser is unannotated; this is its documented type.
openmetrics_parse: Callable[[str], Iterable[Metric]] = (
    _openmetrics_parser.text_string_to_metric_families
)


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> dict[str, object]:
        document = json.loads(self.body)
        assert isinstance(document, dict)
        return document


def request(server: HealthServer, path: str, method: str = "GET") -> Reply:
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()


@pytest.fixture
def make_server() -> Iterator[MakeServer]:
    """Start health servers; every one is stopped (and its thread joined) at teardown."""
    made: list[HealthServer] = []

    def make(manager: dwcp.Manager) -> HealthServer:
        server = HealthServer(manager)
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        server.stop()


def fail_transport(manager: dwcp.Manager, transport: FakeTransport) -> None:
    """Make the transport's recovery fail for good, so it ends ``failed``."""
    transport.healthy = False
    assert manager.attempt_component_recovery("transport") is False


# -- probes ------------------------------------------------------------------------------------


def test_livez_follows_the_monitor_thread(
    make_manager: MakeManager, make_server: MakeServer
) -> None:
    manager = make_manager(FakeTransport())
    server = make_server(manager)
    assert request(server, "/livez").status == 503
    manager.start()
    reply = request(server, "/livez")
    assert (reply.status, reply.body) == (200, b"ok\n")
    manager.stop()
    assert request(server, "/livez").status == 503


def test_readyz_follows_transport_health(
    make_manager: MakeManager, make_server: MakeServer
) -> None:
    transport = FakeTransport()
    manager = make_manager(transport, initial_backoff=0.01, max_retries=1)
    server = make_server(manager)
    assert request(server, "/readyz").status == 503  # not started: sends would be refused
    manager.start()
    assert request(server, "/readyz").status == 200
    fail_transport(manager, transport)
    assert request(server, "/readyz").status == 503
    transport.healthy = True
    assert manager.attempt_component_recovery("transport") is True
    assert request(server, "/readyz").status == 200


def test_readyz_is_503_while_the_breaker_is_open(
    make_manager: MakeManager, make_server: MakeServer
) -> None:
    transport = FakeTransport()
    manager = make_manager(transport, max_failures=1)
    server = make_server(manager)
    manager.start()
    transport.fail_sends = ConnectionError("reset")
    with pytest.raises(dwcp.TransportError):
        manager.send_with_circuit_breaker(b"x")
    assert manager.circuit_breaker_state == "open"
    assert request(server, "/readyz").status == 503
    assert request(server, "/healthz").json()["breaker"] == {"state": "open", "storage": "local"}


def test_readyz_without_a_transport_needs_every_component(
    make_manager: MakeManager, make_server: MakeServer
) -> None:
    layer = FakeLayer()
    manager = make_manager(None, compression=layer, sync=FakeLayer(), max_retries=1)
    server = make_server(manager)
    manager.start()
    assert request(server, "/readyz").status == 200
    layer.healthy = False
    assert manager.attempt_component_recovery("compression") is False
    assert request(server, "/readyz").status == 503


def test_a_guard_only_manager_shows_its_breaker_everywhere(
    make_manager: MakeManager, make_server: MakeServer
) -> None:
    manager = make_manager(None, max_failures=2)  # no transport: used only as a guard
    server = make_server(manager)
    manager.start()
    assert manager.circuit_breaker_state == "closed"
    assert request(server, "/readyz").status == 200

    def fetch() -> None:
        raise ConnectionRefusedError("peer down")

    for _ in range(2):
        with pytest.raises(ConnectionRefusedError):
            manager.call(fetch)
    assert manager.circuit_breaker_state == "open"
    assert manager.health().breaker_state == "open" and not manager.health().healthy
    reply = request(server, "/readyz")
    assert (reply.status, reply.body) == (503, b"not ready\n")
    healthz = request(server, "/healthz")
    document = healthz.json()
    assert healthz.status == 503 and document["status"] == "unhealthy"
    assert document["breaker"] == {"state": "open", "storage": "local"}
    counts = document["metrics"]
    assert isinstance(counts, dict)
    assert (counts["calls"], counts["call_errors"], counts["call_rejections"]) == (0, 2, 0)
    assert counts["send_errors"] == 0
    families = {
        f.name: f for f in text_string_to_metric_families(request(server, "/metrics").body.decode())
    }
    states = {s.labels["state"]: s.value for s in families["dwcp_breaker_state"].samples}
    assert states == {"closed": 0.0, "open": 1.0, "half-open": 0.0}


def test_a_failed_layer_leaves_the_transport_ready_but_status_unhealthy(
    make_manager: MakeManager, make_server: MakeServer
) -> None:
    layer = FakeLayer()
    manager = make_manager(FakeTransport(), consensus=layer, max_retries=1)
    server = make_server(manager)
    manager.start()
    layer.healthy = False
    assert manager.attempt_component_recovery("consensus") is False
    reply = request(server, "/healthz")
    document = reply.json()
    assert reply.status == 200
    assert (document["status"], document["ready"]) == ("unhealthy", True)


# -- the health document -----------------------------------------------------------------------


def test_healthz_document(make_manager: MakeManager, make_server: MakeServer) -> None:
    transport = FakeTransport()
    manager = make_manager(transport, compression=FakeLayer(), max_retries=1)
    server = make_server(manager)
    manager.start()
    manager.send_with_circuit_breaker(b"abc")

    reply = request(server, "/healthz")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json"
    document = reply.json()
    assert document["status"] == "healthy"
    assert document["ready"] is True
    assert document["started"] is True
    assert document["monitor_alive"] is True
    assert document["breaker"] == {"state": "closed", "storage": "local"}
    assert document["manager"] == "dwcp"
    components = document["components"]
    assert isinstance(components, dict)
    assert set(components) == {"transport", "compression"}
    metrics = document["metrics"]
    assert isinstance(metrics, dict)
    assert (metrics["sends"], metrics["sent_bytes"]) == (1, 3)
    assert metrics["recovery_success_rate"] is None
    assert (metrics["events_dropped"], metrics["breaker_storage_errors"]) == (0, 0)

    fail_transport(manager, transport)
    reply = request(server, "/healthz")
    document = reply.json()
    assert reply.status == 503
    assert document["status"] == "unhealthy"
    transport_doc = document["components"]["transport"]  # type: ignore[index]
    assert transport_doc["status"] == "failed"
    assert "ConnectionError: peer unreachable" in transport_doc["last_error"]
    assert transport_doc["seconds_in_status"] >= 0
    assert document["metrics"]["recoveries_failed"] == 1  # type: ignore[index]
    assert document["metrics"]["recovery_success_rate"] == 0.0  # type: ignore[index]


# -- metrics -----------------------------------------------------------------------------------


def test_metrics_serves_the_prometheus_exposition(
    make_manager: MakeManager, make_server: MakeServer
) -> None:
    manager = make_manager(FakeTransport())
    server = make_server(manager)
    manager.start()
    manager.check_component_health()
    reply = request(server, "/metrics")
    assert reply.status == 200
    # Without an Accept header: the classic text format, as prometheus_client itself serves.
    assert reply.headers["Content-Type"] == choose_encoder("")[1]
    assert reply.headers["Content-Type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(reply.body.decode())
        for s in family.samples
    }
    assert samples[("dwcp_health_checks_total", (("manager", "dwcp"),))] == 1
    assert samples[("dwcp_component_up", (("component", "transport"), ("manager", "dwcp")))] == 1


def test_metrics_without_prometheus_client_is_404(
    make_manager: MakeManager, make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] == "prometheus_client"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "dwcp.prometheus", None)
    server = make_server(make_manager(FakeTransport()))
    reply = request(server, "/metrics")
    assert reply.status == 404
    assert b"pip install 'dwcp[prometheus]'" in reply.body
    assert request(server, "/healthz").status == 503  # the rest still works


# -- routing -----------------------------------------------------------------------------------


def test_unknown_paths_are_404_and_queries_are_ignored(
    make_manager: MakeManager, make_server: MakeServer
) -> None:
    manager = make_manager(FakeTransport())
    server = make_server(manager)
    manager.start()
    assert request(server, "/").status == 404
    assert request(server, "/healthz/extra").status == 404
    assert request(server, "/readyz?verbose=1").status == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_405(
    make_manager: MakeManager, make_server: MakeServer, method: str
) -> None:
    server = make_server(make_manager(FakeTransport()))
    reply = request(server, "/healthz", method)
    assert reply.status == 405
    assert reply.headers["Allow"] == "GET, HEAD"


def raw_exchange(server: HealthServer, head: bytes) -> bytes:
    """Send one raw request and read until the server closes: what is on the wire, exactly."""
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(head)
        chunks = []
        for _ in range(1000):  # bounded: the server closes after one answer
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/healthz", "/metrics", "/nope"])
def test_head_answers_like_get_without_a_body(
    make_manager: MakeManager, make_server: MakeServer, path: str
) -> None:
    manager = make_manager(FakeTransport())
    server = make_server(manager)
    manager.start()
    get = request(server, path)
    wire = raw_exchange(server, f"HEAD {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    head, _, body = wire.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    assert int(status_line.split()[1]) == get.status
    assert body == b""  # nothing after the headers
    assert headers["Content-Type"] == get.headers["Content-Type"]
    if path != "/healthz" and path != "/metrics":  # those bodies carry a timestamp or timings
        assert int(headers["Content-Length"]) == len(get.body)


def test_metrics_honours_accept_openmetrics(
    make_manager: MakeManager, make_server: MakeServer
) -> None:
    manager = make_manager(FakeTransport())
    server = make_server(manager)
    manager.start()
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", "/metrics", headers={"Accept": "application/openmetrics-text"})
        response = conn.getresponse()
        body = response.read().decode()
    finally:
        conn.close()
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_parse(body)}
    assert families["dwcp_component_up"].samples[0].labels == {
        "manager": "dwcp",
        "component": "transport",
    }
    assert families["dwcp_build"].type == "info"


def test_a_handler_error_is_a_500_not_a_dropped_connection(
    make_manager: MakeManager, make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = make_manager(FakeTransport())
    server = make_server(manager)

    def broken() -> dwcp.HealthSnapshot:
        raise RuntimeError("snapshot bug")

    monkeypatch.setattr(manager, "health", broken)
    assert request(server, "/healthz").status == 500
    assert request(server, "/livez").status == 503  # routes that do not need it still work


# -- lifecycle ---------------------------------------------------------------------------------


def http_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dwcp-http"]


def test_stop_is_idempotent_joins_the_thread_and_closes_the_socket(
    make_manager: MakeManager,
) -> None:
    server = HealthServer(make_manager(FakeTransport()))
    with pytest.raises(dwcp.DWCPError, match="not started"):
        _ = server.address
    server.start()
    try:
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        assert server.url == f"http://127.0.0.1:{port}"
        assert len(http_threads()) == 1
        with pytest.raises(dwcp.DWCPError) as excinfo:
            server.start()
        assert excinfo.value.code == "ALREADY_STARTED"
    finally:
        server.stop()
    server.stop()
    assert http_threads() == []
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host, port), timeout=5):
        pass


def test_context_manager_and_restart(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport())
    manager.start()
    with HealthServer(manager) as server:
        assert request(server, "/livez").status == 200
    assert http_threads() == []
    with HealthServer(manager) as server:
        assert request(server, "/readyz").status == 200


def test_requests_are_logged_to_loguru_not_stderr(
    make_manager: MakeManager, make_server: MakeServer, capfd: pytest.CaptureFixture[str]
) -> None:
    server = make_server(make_manager(FakeTransport()))
    records: list[dict[str, object]] = []
    sink = logger.add(lambda m: records.append(dict(m.record["extra"])), level="DEBUG")
    logger.enable("dwcp")
    try:
        request(server, "/livez")
        request(server, "/nope")
        # The log line is written after the response, on the handler thread.
        wait_until(lambda: len([r for r in records if "status" in r]) >= 2)
    finally:
        logger.disable("dwcp")
        logger.remove(sink)
    assert {r["status"] for r in records if "status" in r} == {503, 404}
    assert capfd.readouterr().err == ""


# -- concurrency -------------------------------------------------------------------------------


def test_concurrent_scrapes_while_a_component_fails_and_recovers(
    make_manager: MakeManager, make_server: MakeServer
) -> None:
    transport = FakeTransport()
    manager = make_manager(
        transport, health_interval=0.05, initial_backoff=0.01, health_check_timeout=1.0
    )
    server = make_server(manager)
    manager.start()

    done = threading.Event()
    lock = threading.Lock()
    seen: dict[str, set[int]] = {}
    errors: list[BaseException] = []
    paths = ("/livez", "/readyz", "/healthz", "/metrics")

    def scrape() -> None:
        for i in range(3000):  # bounded; the test ends the loop far sooner through ``done``
            if done.is_set():
                return
            path = paths[i % len(paths)]
            try:
                reply = request(server, path)
                if path == "/healthz":
                    reply.json()
                elif path == "/metrics":
                    list(text_string_to_metric_families(reply.body.decode()))
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)
                return
            with lock:
                seen.setdefault(path, set()).add(reply.status)

    def saw(path: str, status: int) -> bool:
        with lock:
            return status in seen.get(path, set())

    scrapers = [threading.Thread(target=scrape, name=f"scraper-{n}") for n in range(4)]
    for thread in scrapers:
        thread.start()
    try:
        wait_until(lambda: saw("/readyz", 200) or bool(errors))
        transport.healthy = False
        wait_until(lambda: saw("/readyz", 503) or bool(errors))
        with lock:
            seen.clear()
        transport.healthy = True
        wait_until(
            lambda: (
                bool(errors)
                or (manager.health().components["transport"].healthy and saw("/readyz", 200))
            )
        )
    finally:
        done.set()
        for thread in scrapers:
            thread.join(10)
    assert not any(t.is_alive() for t in scrapers)
    assert errors == []
    assert manager.metrics().recoveries_succeeded + manager.metrics().recoveries_failed >= 1
    assert all(codes <= {200, 503} for path, codes in seen.items() if path != "/metrics")


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"host": 1234}, TypeError, "host must be a string"),
        ({"host": ""}, ValueError, "host must be a non-empty string"),
        ({"port": "80"}, TypeError, "port must be an int"),
        ({"port": 80.0}, TypeError, "port must be an int"),
        ({"port": True}, TypeError, "port must be an int"),
        ({"port": -1}, ValueError, "port must be from 0 to 65535"),
        ({"port": 70000}, ValueError, "port must be from 0 to 65535"),
    ],
)
def test_host_and_port_are_checked_at_construction(
    make_manager: MakeManager, kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        HealthServer(make_manager(FakeTransport()), **kwargs)  # type: ignore[arg-type]


def test_the_managers_health_host_and_port_are_named_as_such() -> None:
    with pytest.raises(TypeError, match="^health_host must be a string"):
        dwcp.Manager(FakeTransport(), health_port=0, health_host=1234)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^health_port must be from 0 to 65535"):
        dwcp.Manager(FakeTransport(), health_port=-1)
    with pytest.raises(TypeError, match="^health_port must be an int"):
        dwcp.Manager(FakeTransport(), health_port="80")  # type: ignore[arg-type]


def error_table_rows(code: str) -> list[str]:
    """The rows of the README's error table whose ``.code`` cell names ``code``."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("| error | `.code` |", 1)[1].split("\n\n", 1)[0]
    return [row for row in table.splitlines() if f"`{code}`" in row.split("|")[2]]


def test_start_on_a_busy_port_raises_the_typed_error_and_can_be_retried(
    make_manager: MakeManager,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HealthServer(make_manager(FakeTransport()), port=port)
        with pytest.raises(dwcp.DWCPError) as info:
            server.start()
    assert info.value.code == "HEALTH_SERVER_FAILED"
    assert f"127.0.0.1:{port}" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert http_threads() == []
    assert any("`HealthServer.start()`" in row for row in error_table_rows("HEALTH_SERVER_FAILED"))
    server.start()  # the port is free again: nothing was left half-started
    try:
        assert server.address == ("127.0.0.1", port)
    finally:
        server.stop()


def test_address_and_url_before_start_raise_the_code_the_readme_lists(
    make_manager: MakeManager,
) -> None:
    server = HealthServer(make_manager(FakeTransport()))
    for read in (lambda: server.url, lambda: server.address):
        with pytest.raises(dwcp.DWCPError) as info:
            read()
        assert info.value.code == "NOT_STARTED"
    rows = error_table_rows("NOT_STARTED")
    assert any("`HealthServer.url`" in row and "`DWCPError`" in row for row in rows)


def test_repr_and_close_alias(make_manager: MakeManager) -> None:
    server = HealthServer(make_manager(FakeTransport()), port=0)
    assert repr(server) == "<HealthServer 127.0.0.1 port 0, not started>"
    server.start()
    try:
        assert repr(server) == f"<HealthServer {server.url}>"
    finally:
        server.close()
    assert http_threads() == []
