"""One place where constructor arguments are checked and converted, with errors that name them.

Seconds are accepted as ``int``, ``float`` or ``datetime.timedelta`` everywhere and stored as
``float``; a wrong type is a ``TypeError``, a wrong value a ``ValueError``.
"""

from __future__ import annotations

import math
import threading
from datetime import timedelta
from urllib.parse import urlsplit

__all__ = [
    "WIRE_SECONDS_MAX",
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
    with IDNA, which refuses some (an empty or over-63-character label, say)."""
    try:
        host.encode("idna")
    except UnicodeError as exc:
        raise ValueError(f"{param} {host!r} is not a valid host name: {exc}") from exc
    return host


def url_host(param: str, url: str) -> str:
    """``url`` if the host it names (if any: a ``unix://`` URL has none) can be resolved, as
    ``host_name`` checks; else a ``ValueError`` naming ``param``, at construction rather
    than as a ``UnicodeError`` on the first connection."""
    try:
        host = urlsplit(url).hostname
    except ValueError as exc:  # an unbalanced "[" of an IPv6 literal, say
        raise ValueError(f"{param} {url!r} is not a valid URL: {exc}") from exc
    if host:
        host_name(f"{param} host", host)
    return url
