"""One place where constructor arguments are checked and converted, with errors that name them.

Seconds are accepted as ``int``, ``float`` or ``datetime.timedelta`` everywhere and stored as
``float``; a wrong type is a ``TypeError``, a wrong value a ``ValueError``.
"""

from __future__ import annotations

import errno
import math
import socket
import threading
from datetime import timedelta
from urllib.parse import urlsplit

__all__ = [
    "DAY",
    "WEEK",
    "WIRE_SECONDS_MAX",
    "congestion_control",
    "count",
    "describe",
    "flag",
    "host_name",
    "name",
    "number",
    "port",
    "require_methods",
    "seconds",
    "url_host",
    "wire_seconds",
]


#: One day and one week, in seconds: the longest ``Manager`` durations (a pass's interval and
#: check timeout at most a day, as a cluster member's interval; the others at most a week), so
#: that every deadline derived from them (a join, a detector's pause) stays one a thread can
#: wait for.
DAY = 86400.0
WEEK = 7 * DAY


def _as_seconds(name: str, value: object) -> float:
    """``value`` (a number or a ``timedelta``) as a float, or a ``TypeError`` naming ``name``."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a number of seconds or a timedelta, got {type(value).__name__}"
        )
    return float(value)


def seconds(
    name: str,
    value: object,
    *,
    allow_zero: bool = False,
    allow_inf: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
) -> float:
    """``value`` as a float number of seconds, or an error naming ``name``.

    Finite unless ``allow_inf``; positive (or non-negative with ``allow_zero``); at least
    ``minimum`` and at most ``maximum`` when given (what a wire field can carry, say); and
    never longer than a thread can wait (``threading.TIMEOUT_MAX``), so a value accepted
    here cannot fail later with ``OverflowError``.
    """
    number = _as_seconds(name, value)
    if (
        math.isnan(number)
        or (math.isinf(number) and not allow_inf)
        or number < 0
        or (number == 0 and not allow_zero)
    ):
        bound = "non-negative" if allow_zero else "positive"
        finite = "" if allow_inf else "finite "
        raise ValueError(f"{name} must be a {finite}{bound} number of seconds, got {value!r}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be at least {minimum:g} seconds, got {value!r}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be at most {maximum:g} seconds, got {value!r}")
    if number > threading.TIMEOUT_MAX and not math.isinf(number):
        raise ValueError(
            f"{name} must be at most {threading.TIMEOUT_MAX:g} seconds (what a thread can "
            f"wait), got {value!r}"
        )
    return number


def number(name: str, value: object, *, allow_zero: bool = True) -> float:
    """``value`` as a finite, non-negative (or positive) float that is not a duration."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    result = float(value)
    if not math.isfinite(result) or result < 0 or (result == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {bound} number, got {value!r}")
    return result


def count(name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` as an int of at least ``minimum``, or an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def port(name: str, value: object) -> int:
    """``value`` as a TCP port from 0 (any free port) to 65535."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= 65535:
        raise ValueError(f"{name} must be from 0 to 65535, got {value}")
    return value


def flag(name: str, value: object) -> bool:
    """``value`` if it is a bool; ``"no"`` or ``1`` are refused rather than guessed at."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def name(param: str, value: object) -> str:
    """``value`` if it is a non-empty string."""
    if not isinstance(value, str):
        raise TypeError(f"{param} must be a string, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{param} must be a non-empty string")
    return value


# Linux's TCP_CA_NAME_MAX: algorithm names are shorter than this.
_TCP_CA_NAME_MAX = 16


def _proc_list(path: str) -> list[str]:
    """The space-separated names in ``path``, or an empty list where it cannot be read."""
    try:
        with open(path, encoding="ascii") as file:
            return file.read().split()
    except OSError:
        return []


def congestion_control(param: str, value: object) -> str | None:
    """``value`` if None (the kernel's default) or a TCP congestion control algorithm that
    this process can set on a socket; otherwise a ``ValueError`` naming what this kernel has.

    The check is the call the sockets will make: ``setsockopt(TCP_CONGESTION)`` on a probe
    socket, so a module the kernel loads on demand is accepted, and a name outside
    ``net.ipv4.tcp_allowed_congestion_control`` is refused for a process without
    ``CAP_NET_ADMIN`` (the kernel's rule) rather than failing later at ``start()``.
    """
    if value is None:
        return None
    algorithm = name(param, value)
    option = getattr(socket, "TCP_CONGESTION", None)
    if option is None:
        raise ValueError(f"{param}: this platform has no TCP_CONGESTION socket option")
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        encoded = algorithm.encode("ascii")
        # The kernel reads at most 15 bytes and stops at a NUL: "cubic\0x" would set cubic.
        if len(encoded) >= _TCP_CA_NAME_MAX or b"\0" in encoded:
            raise ValueError("not a kernel algorithm name")
        probe.setsockopt(socket.IPPROTO_TCP, option, encoded)
    except (OSError, ValueError) as exc:
        available = _proc_list("/proc/sys/net/ipv4/tcp_available_congestion_control")
        offered = ", ".join(available) if available else "unknown"
        if isinstance(exc, OSError) and exc.errno == errno.EPERM:
            allowed = _proc_list("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
            raise ValueError(
                f"{param} {algorithm!r} is available but not allowed for this process "
                f"(allowed without CAP_NET_ADMIN: {', '.join(allowed) or 'none'}; "
                f"available: {offered})"
            ) from exc
        raise ValueError(
            f"{param} {algorithm!r} is not available on this kernel (available: {offered})"
        ) from exc
    finally:
        probe.close()
    return algorithm


def require_methods(slot: str, obj: object, methods: tuple[str, ...]) -> None:
    """Raise ``TypeError`` unless ``obj`` has every one of ``methods``, callable."""
    missing = [m for m in methods if not callable(getattr(obj, m, None))]
    if missing:
        raise TypeError(
            f"{slot} {type(obj).__name__} lacks the method(s) {', '.join(missing)} "
            f"(a {slot} needs {', '.join(methods)})"
        )


def describe(exc: BaseException) -> str:
    """``Type: message`` for logs, events and statuses."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: The longest duration a transport accepts, in seconds: the HELLO carries the keepalive
#: interval as a 32-bit count of milliseconds, and the transport's other durations are held
#: to the same bound (socket timeouts and lock waits overflow far beyond it).
WIRE_SECONDS_MAX = (2**32 - 1) / 1000


def wire_seconds(name: str, value: object) -> float:
    """``value`` as a float number of seconds a transport can use: finite, from 1 ms (the
    wire counts milliseconds: less would be written as 0) to ``WIRE_SECONDS_MAX``."""
    number = _as_seconds(name, value)
    if not math.isfinite(number) or number <= 0:
        seconds(name, value)  # raises "must be a finite positive number of seconds"
    if not 0.001 <= number <= WIRE_SECONDS_MAX:
        raise ValueError(
            f"{name} must be from 0.001 to {WIRE_SECONDS_MAX:g} seconds (what the wire "
            f"carries, in whole milliseconds), got {value!r}"
        )
    return number


def host_name(param: str, host: str) -> str:
    """``host`` if a resolver can be asked for it: the socket module encodes a host name
    with IDNA, which refuses some (an empty or over-63-character label, say), and refuses a
    NUL character with a bare ``TypeError`` at the first ``bind``/``connect``."""
    if "\x00" in host:
        raise ValueError(f"{param} {host!r} is not a valid host name: it contains a NUL character")
    try:
        host.encode("idna")
    except UnicodeError as exc:
        raise ValueError(f"{param} {host!r} is not a valid host name: {exc}") from exc
    return host


def url_host(param: str, url: str) -> str:
    """``url`` if it parses, its port (if any) is from 0 to 65535 and the host it names (if
    any: a ``unix://`` URL has none) can be resolved, as ``host_name`` checks; else a
    ``ValueError`` naming ``param``, at construction rather than at the first connection."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - parsed for its ValueError ("Port out of range 0-65535")
    except ValueError as exc:  # an unbalanced "[" of an IPv6 literal, a port 99999, say
        raise ValueError(f"{param} {url!r} is not a valid URL: {exc}") from exc
    if host:
        host_name(f"{param} host", host)
    return url
