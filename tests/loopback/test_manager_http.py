"""The health server started and stopped by the Manager itself (``health_port``)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest

import dwcp
from dwcp.testing import FakeLayer, FakeTransport

MakeManager = Callable[..., dwcp.Manager]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_health_server_lives_and_dies_with_the_manager(make_manager: MakeManager) -> None:
    transport = FakeTransport()
    manager = make_manager(transport, compression=FakeLayer(), health_port=0)
    assert manager.health_url is None
    manager.start()
    url = manager.health_url
    assert url is not None and url.startswith("http://127.0.0.1:")
    assert get(url + "/livez")[0] == 200
    status, body = get(url + "/healthz")
    document = json.loads(body)
    assert status == 200 and document["components"]["transport"]["status"] == "healthy"
    transport.healthy = False
    transport.fail_sends = OSError("down")
    for _ in range(5):
        with pytest.raises(dwcp.TransportError):
            manager.send_with_circuit_breaker(b"x")
    assert get(url + "/readyz")[0] == 503
    manager.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/livez", timeout=2)


def test_port_in_use_fails_start_cleanly(make_manager: MakeManager) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        transport = FakeTransport()
        manager = make_manager(transport, health_port=port)
        with pytest.raises(dwcp.DWCPError) as info:
            manager.start()
        assert info.value.code == "HEALTH_SERVER_FAILED"
        assert not manager.is_started and transport.started == 0


def test_bad_health_port_is_rejected() -> None:
    with pytest.raises(ValueError, match="port"):
        dwcp.Manager(FakeTransport(), health_port=70000)
