"""A host that the socket module cannot encode (IDNA refuses a lone surrogate, or a label
over 63 characters; a NUL character makes CPython's bind/connect raise a bare TypeError) is
refused at construction with a ValueError naming the parameter,
by every class that takes a host or a URL: before, each got as far as start() or the
first connection and raised a bare TypeError or UnicodeError there."""

from __future__ import annotations

import pytest

import dwcp
from dwcp.http import HealthServer
from dwcp.testing import FakeTransport
from dwcp.webhook import WebhookNotifier

BAD_HOSTS = ["xn--\udcff", "\u00e9" * 70 + ".com", "a\x00b"]
IDS = ["lone-surrogate", "label-too-long", "nul"]
NOT_VALID = "is not a valid host name"


@pytest.mark.parametrize("host", BAD_HOSTS, ids=IDS)
def test_the_receiver_refuses_the_host(host: str) -> None:
    with pytest.raises(ValueError, match=f"^address host .* {NOT_VALID}"):
        dwcp.MultiStreamReceiver((host, 0), on_message=print)


@pytest.mark.parametrize("host", BAD_HOSTS, ids=IDS)
def test_the_transport_refuses_the_host(host: str) -> None:
    with pytest.raises(ValueError, match=f"^address host .* {NOT_VALID}"):
        dwcp.MultiStreamTCPTransport((host, 9))


@pytest.mark.parametrize("host", BAD_HOSTS, ids=IDS)
def test_the_health_server_refuses_the_host(host: str) -> None:
    with pytest.raises(ValueError, match=f"^host .* {NOT_VALID}"):
        HealthServer(dwcp.Manager(FakeTransport()), host, 0)


@pytest.mark.parametrize("port", [0, None], ids=["with-health-port", "without"])
@pytest.mark.parametrize("host", BAD_HOSTS, ids=IDS)
def test_the_manager_refuses_the_health_host(host: str, port: int | None) -> None:
    with pytest.raises(ValueError, match=f"^health_host .* {NOT_VALID}"):
        dwcp.Manager(FakeTransport(), health_port=port, health_host=host)


@pytest.mark.parametrize("parameter", ["cluster", "breaker_storage"])
@pytest.mark.parametrize("host", BAD_HOSTS, ids=IDS)
def test_the_manager_refuses_a_redis_url_with_the_host(host: str, parameter: str) -> None:
    pytest.importorskip("redis")
    with pytest.raises(ValueError, match=f"^{parameter} host .* {NOT_VALID}"):
        dwcp.Manager(FakeTransport(), **{parameter: f"redis://{host}:6379/0"})  # type: ignore[arg-type]


@pytest.mark.parametrize("host", BAD_HOSTS, ids=IDS)
def test_the_webhook_refuses_a_url_with_the_host(host: str) -> None:
    with pytest.raises(ValueError, match=f"^url host .* {NOT_VALID}"):
        WebhookNotifier(f"http://{host}/alerts")


def test_hosts_that_encode_are_accepted() -> None:
    # An IPv6 literal, a Unicode name IDNA encodes, a unix:// URL (no host at all).
    dwcp.MultiStreamReceiver(("::1", 0), on_message=print)
    WebhookNotifier("http://[::1]:8080/alerts")
    WebhookNotifier("https://b\u00fccher.example/alerts")
    pytest.importorskip("redis")
    dwcp.Manager(FakeTransport(), cluster="unix:///tmp/redis.sock")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:99999/alerts", "Port out of range"),
        ("http://[::1/alerts", "Invalid IPv6 URL"),
        ("http://h:x/alerts", "Port could not be cast"),
    ],
    ids=["port-out-of-range", "unbalanced-bracket", "port-not-a-number"],
)
def test_a_url_that_does_not_parse_is_a_value_error_naming_url(url: str, why: str) -> None:
    # Before: the port was refused only when posting; the bracket with a ValueError that
    # did not name url.
    with pytest.raises(ValueError, match=f"^url .* is not a valid URL: {why}"):
        WebhookNotifier(url)


@pytest.mark.parametrize("parameter", ["cluster", "breaker_storage"])
def test_a_redis_url_with_a_port_out_of_range_is_a_value_error_naming_it(parameter: str) -> None:
    pytest.importorskip("redis")
    with pytest.raises(ValueError, match=f"^{parameter} .* is not a valid URL: Port out of range"):
        dwcp.Manager(FakeTransport(), **{parameter: "redis://127.0.0.1:99999/0"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "events", [None, 5, [1], [["node_lost"]]], ids=["none", "int", "ints", "lists"]
)
def test_webhook_events_of_the_wrong_type_are_a_type_error_naming_events(events: object) -> None:
    with pytest.raises(TypeError, match="^events must be a collection of event names"):
        WebhookNotifier("http://127.0.0.1:9/alerts", events=events)  # type: ignore[arg-type]
