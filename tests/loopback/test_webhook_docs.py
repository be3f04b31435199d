"""docs/webhooks.md's verify() example, run against real signed requests as they arrive."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import dwcp
from dwcp.webhook import WebhookNotifier
from tests.conftest import wait_until

Verify = Callable[..., bool]


def documented_verify() -> Verify:
    """The ``verify()`` of the Signatures section, executed as a reader would paste it."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "webhooks.md").read_text()
    code = docs.split("## Signatures", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/webhooks.md", "exec"), namespace)  # noqa: S102 - our own docs
    verify = namespace["verify"]
    assert callable(verify)
    return verify  # type: ignore[no-any-return]


class Endpoint:
    """Records each request's body and its headers with their names exactly as received."""

    def __init__(self) -> None:
        self.requests: list[tuple[list[tuple[str, str]], bytes]] = []
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with endpoint._lock:
                    endpoint.requests.append((list(self.headers.items()), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="endpoint"
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()


@pytest.fixture
def signed_request() -> Iterator[tuple[list[tuple[str, str]], bytes]]:
    """One alert as the endpoint received it, signed with ``b"shared-secret"``."""
    endpoint = Endpoint()
    notifier = WebhookNotifier(endpoint.url, secret=b"shared-secret", retry_backoff=0.01)
    try:
        notifier.start()
        notifier(dwcp.RecoveryFailed("transport", 3, "ConnectionError: peer unreachable"))
        wait_until(lambda: notifier.delivered == 1)
        [request] = endpoint.requests
        yield request
    finally:
        notifier.close(timeout=2.0)
        endpoint.close()


def test_verify_accepts_the_headers_as_a_plain_dict_in_any_letter_case(
    signed_request: tuple[list[tuple[str, str]], bytes],
) -> None:
    verify = documented_verify()
    received, body = signed_request
    as_received = dict(received)  # the names as they came over the wire
    assert "X-Dwcp-Timestamp" in as_received  # urllib's casing: an exact lookup would fail
    for headers in (
        as_received,
        {name.lower(): value for name, value in received},  # ASGI frameworks lowercase them
        {name.upper(): value for name, value in received},
    ):
        assert verify(b"shared-secret", headers, body) is True


def test_verify_refuses_a_wrong_secret_a_changed_body_a_stale_or_missing_stamp(
    signed_request: tuple[list[tuple[str, str]], bytes],
) -> None:
    verify = documented_verify()
    received, body = signed_request
    headers = {name.lower(): value for name, value in received}
    assert verify(b"another-secret", headers, body) is False
    assert verify(b"shared-secret", headers, body.replace(b"transport", b"transpork")) is False
    stale = {**headers, "x-dwcp-timestamp": str(int(headers["x-dwcp-timestamp"]) - 3600)}
    assert verify(b"shared-secret", stale, body) is False
    unstamped = {k: v for k, v in headers.items() if k != "x-dwcp-timestamp"}
    assert verify(b"shared-secret", unstamped, body) is False
    unsigned = {k: v for k, v in headers.items() if k != "x-dwcp-signature-256"}
    assert verify(b"shared-secret", unsigned, body) is False
    assert verify(b"shared-secret", {**headers, "x-dwcp-timestamp": "soon"}, body) is False


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((123, "1700000000", b"{}"), "secret"),
        (("s3cret", 1700000000, b"{}"), "timestamp"),
        (("s3cret", "1700000000", "{}"), "body"),
    ],
)
def test_sign_names_an_argument_of_the_wrong_type(args: tuple[object, ...], name: str) -> None:
    from dwcp.webhook import sign

    with pytest.raises(TypeError, match=name):
        sign(*args)  # type: ignore[arg-type]
