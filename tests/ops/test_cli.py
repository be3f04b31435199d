"""``python -m dwcp status`` against a live HealthServer on 127.0.0.1."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import dwcp
from dwcp._cli import COMMANDS, Command, _duration, build_parser, health_url, main
from dwcp.http import HealthServer
from dwcp.testing import FakeLayer, FakeTransport

MakeManager = Callable[..., dwcp.Manager]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def transport() -> FakeTransport:
    return FakeTransport()


@pytest.fixture
def manager(make_manager: MakeManager, transport: FakeTransport) -> dwcp.Manager:
    manager = make_manager(transport, compression=FakeLayer(), initial_backoff=0.01, max_retries=1)
    manager.start()
    return manager


@pytest.fixture
def server(manager: dwcp.Manager) -> Iterator[HealthServer]:
    with HealthServer(manager) as server:
        yield server


def test_status_of_a_healthy_manager(
    server: HealthServer, manager: dwcp.Manager, capsys: pytest.CaptureFixture[str]
) -> None:
    manager.send_with_circuit_breaker(b"hello")
    assert main(["status", server.url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("DWCP healthy (ready)")
    assert f"{server.url}/healthz" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["COMPONENT"] == ["COMPONENT", "STATUS", "SINCE", "LAST", "ERROR"]
    assert rows["transport"][1:2] == ["healthy"] and rows["transport"][-1] == "-"
    assert rows["compression"][1] == "healthy"
    assert "Circuit breaker: closed (transitions 0, rejections 0)" in out
    assert "Sends:           1 ok (5 bytes), 0 errors" in out


def test_status_of_an_unhealthy_manager(
    server: HealthServer,
    manager: dwcp.Manager,
    transport: FakeTransport,
    capsys: pytest.CaptureFixture[str],
) -> None:
    transport.healthy = False
    assert manager.attempt_component_recovery("transport") is False
    assert main(["status", server.url]) == 1
    out = capsys.readouterr().out
    assert out.startswith("DWCP UNHEALTHY (not ready)")
    transport_row = next(line for line in out.splitlines() if line.startswith("transport"))
    assert "failed" in transport_row and "peer unreachable" in transport_row
    assert "Recoveries:      0 succeeded, 1 failed, 1 attempts (0% success)" in out
    assert "Downtime:        transport" in out


def test_json_prints_the_raw_document(
    server: HealthServer,
    manager: dwcp.Manager,
    transport: FakeTransport,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["status", "--json", server.url]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["status"] == "healthy"
    assert set(document["components"]) == {"transport", "compression"}

    transport.healthy = False
    manager.attempt_component_recovery("transport")
    assert main(["status", server.url + "/healthz", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "unhealthy"


def test_unreachable_server_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["status", f"http://127.0.0.1:{port}", "--timeout", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"dwcp status: cannot reach http://127.0.0.1:{port}/healthz" in captured.err


def test_timeout_bounds_a_request_to_a_server_that_never_answers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """docs/observability.md, "Command line": "`--timeout` bounds the request (seconds, more
    than 0; default 5). Exit codes: [...] 2 unreachable": a server that accepts the
    connection and never answers is unreachable once the timeout passes."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever reads or answers
        port = silent.getsockname()[1]
        codes: list[int] = []
        status = threading.Thread(
            target=lambda: codes.append(main(["status", f"127.0.0.1:{port}", "--timeout", "0.5"])),
            name="test-status",
        )
        status.start()
        status.join(60.0)  # generous: only a request the timeout did not bound reaches it
        assert not status.is_alive(), "the request was not bounded by --timeout"
    assert codes == [2]
    assert f"dwcp status: cannot reach http://127.0.0.1:{port}/healthz" in capsys.readouterr().err


@pytest.mark.parametrize(("path", "reason"), [("/nope", "HTTP 404"), ("/livez", "health document")])
def test_a_url_that_is_not_a_health_document_exits_2(
    server: HealthServer, path: str, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", server.url + path]) == 2
    assert reason in capsys.readouterr().err


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/healthz"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/healthz"),
        ("127.0.0.1:8080", "http://127.0.0.1:8080/healthz"),
        ("http://h:1/custom/health", "http://h:1/custom/health"),
        ("https://h/?x=1", "https://h/healthz?x=1"),
    ],
)
def test_health_url(given: str, expected: str) -> None:
    assert health_url(given) == expected


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.042, "0.04s"), (12.34, "12.3s"), (75, "1m15s"), (7322, "2h02m"), (200_000, "2d07h")],
)
def test_duration(seconds: float, text: str) -> None:
    assert _duration(seconds) == text


def test_a_subcommand_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main([])
    assert excinfo.value.code == 2
    assert "status" in capsys.readouterr().err


def test_the_registry_takes_another_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--peers", type=int, default=1)

    def run(args: argparse.Namespace) -> int:
        print(f"example with {args.peers} peers")
        return 0

    parser = build_parser((*COMMANDS, Command("example", "run an example", configure, run)))
    args = parser.parse_args(["example", "--peers", "3"])
    assert args.run(args) == 0
    assert capsys.readouterr().out == "example with 3 peers\n"


def test_python_dash_m_dwcp_status(server: HealthServer) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "dwcp", "status", server.url],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("DWCP healthy")
    assert "transport" in result.stdout


# -- arguments ---------------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["--version"])
    assert excinfo.value.code == 0
    assert capsys.readouterr().out == f"dwcp {dwcp.__version__}\n"


def test_python_dash_m_dwcp_version() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "dwcp", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, f"dwcp {dwcp.__version__}\n")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["status", "http://127.0.0.1:9", "--timeout", "-1"], "must be a finite number above 0"),
        (["status", "http://127.0.0.1:9", "--timeout", "0"], "must be a finite number above 0"),
        (["status", "http://127.0.0.1:9", "--timeout", "nan"], "must be a finite number above 0"),
        (["status", "http://127.0.0.1:9", "--timeout", "soon"], "not a number of seconds"),
        (["status", "ftp://127.0.0.1/healthz"], "only http:// and https:// URLs"),
        (["status", "file:///etc/passwd"], "only http:// and https:// URLs"),
        (["status", "http://"], "names no host"),
    ],
)
def test_bad_arguments_are_argparse_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "usage: dwcp status" in err and message in err


def test_health_url_rejects_other_schemes() -> None:
    with pytest.raises(ValueError, match="only http:// and https://"):
        health_url("ftp://example.invalid/")


class _JSONServer:
    """An HTTP server on 127.0.0.1 answering every GET with one JSON document."""

    def __init__(self, document: object, status: int = 200) -> None:
        body = json.dumps(document).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="json"
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()


@pytest.mark.parametrize(
    ("document", "status"),
    [
        ({"status": "ok"}, 200),
        ({"status": "unhealthy"}, 503),
        ({"status": "healthy", "ready": True, "components": [], "breaker": {}, "metrics": {}}, 200),
        (["healthy"], 200),
        ("healthy", 200),
    ],
)
def test_json_that_is_not_a_dwcp_health_document_exits_2(
    document: object, status: int, capsys: pytest.CaptureFixture[str]
) -> None:
    server = _JSONServer(document, status)
    try:
        assert main(["status", server.url]) == 2
    finally:
        server.close()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "did not answer with a dwcp health document" in captured.err


def test_a_served_document_passes_the_shape_check(
    server: HealthServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # The same check, against what HealthServer really serves: it must not reject it.
    assert main(["status", "--json", server.url]) == 0
    document = json.loads(capsys.readouterr().out)
    copy = _JSONServer(document)
    try:
        assert main(["status", copy.url]) == 0
    finally:
        copy.close()
