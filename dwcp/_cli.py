"""The ``python -m dwcp`` command line.

Each subcommand is a ``Command`` in ``COMMANDS``: a name, a help line, a function that adds
its arguments to its subparser, and a function that runs it and returns the exit code.  A new
subcommand is two functions and one more entry in the tuple.

``status URL`` reads a ``HealthServer``'s ``/healthz`` document and prints it as a table.
Exit codes: 0 healthy, 1 unhealthy, 2 unreachable, not a dwcp health document, or bad
arguments (argparse's own exit code).  ``--version`` prints the version.
``status --cluster REDIS_URL`` prints every node of a cluster (``dwcp.cluster``) instead:
0 when every node is alive and healthy, 1 otherwise, 2 when Redis cannot be reached.

``demo`` runs a receiver and a manager on 127.0.0.1, stops the receiver for a while and
prints what the breaker, the monitor and recovery do about it (see ``dwcp._demo``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard
from urllib.parse import urlsplit, urlunsplit

from dwcp import _demo as demo
from dwcp._version import __version__

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_UNREACHABLE = 2


@dataclass(frozen=True)
class Command:
    """One subcommand: ``configure`` adds its arguments, ``run`` returns the exit code."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- status ---------------------------------------------------------------------------------


class _Unreachable(Exception):
    """The server could not be reached or did not answer with a health document."""


def _configure_status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "url",
        nargs="?",
        type=_url_argument,
        help="base URL of a dwcp HealthServer, such as http://127.0.0.1:8080 "
        "(/healthz is added when the URL has no path)",
    )
    parser.add_argument(
        "--cluster",
        metavar="REDIS_URL",
        help="show every node of the cluster published in this Redis instead "
        "(exit 0 all alive and healthy, 1 otherwise, 2 Redis unreachable)",
    )
    parser.add_argument(
        "--namespace", default="dwcp", help="the cluster's key namespace (default dwcp)"
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON document")
    parser.add_argument(
        "--timeout",
        type=_timeout_argument,
        default=5.0,
        help="seconds to wait for the answer, more than 0 (default 5)",
    )


def health_url(url: str) -> str:
    """``url`` with ``http://`` added when it has no scheme and ``/healthz`` when no path.

    Raises ``ValueError`` for a scheme other than http or https, or a URL without a host.
    """
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"only http:// and https:// URLs are supported, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"the URL names no host: {url!r}")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/healthz")
    return urlunsplit(parts)


def _url_argument(text: str) -> str:
    try:
        return health_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _timeout_argument(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < seconds < float("inf"):  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return seconds


def _is_health_document(document: object) -> TypeGuard[dict[str, Any]]:
    """Whether ``document`` has the shape of a dwcp ``/healthz`` answer, not any JSON."""
    return (
        isinstance(document, dict)
        and document.get("status") in ("healthy", "unhealthy")
        and isinstance(document.get("ready"), bool)
        and isinstance(document.get("components"), dict)
        and isinstance(document.get("breaker"), dict)
        and isinstance(document.get("metrics"), dict)
    )


def _fetch(url: str, timeout: float) -> tuple[str, dict[str, Any]]:
    """Return the body and the parsed document; 503 is an answer, not an error."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            if exc.code != 503:
                raise _Unreachable(f"{url} answered HTTP {exc.code}, not a health document")
            raw = exc.read()
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise _Unreachable(f"cannot reach {url}: {reason}") from exc
    text = raw.decode("utf-8", errors="replace")
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if not _is_health_document(document):
        raise _Unreachable(f"{url} did not answer with a dwcp health document")
    return text, document


def _duration(seconds: object) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    if seconds < 1:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    ]


def render_status(document: Mapping[str, Any], url: str = "") -> str:
    """A readable report of a ``/healthz`` document."""
    status = str(document.get("status", "unknown"))
    verdict = status.upper() if status == "unhealthy" else status
    ready = "ready" if document.get("ready") else "not ready"
    started = "" if document.get("started", True) else ", manager not started"
    lines = [f"DWCP {verdict} ({ready}{started})" + (f"  {url}" if url else ""), ""]

    components = document.get("components") or {}
    rows = [("COMPONENT", "STATUS", "SINCE", "LAST ERROR")]
    for name, info in components.items():
        info = info if isinstance(info, Mapping) else {}
        rows.append(
            (
                str(name),
                str(info.get("status", "?")),
                _duration(info.get("seconds_in_status")),
                str(info.get("last_error") or "-"),
            )
        )
    lines += _table(rows) if components else ["(no components)"]

    breaker = document.get("breaker") or {}
    m = document.get("metrics") or {}
    rate = m.get("recovery_success_rate")
    success = f" ({rate:.0%} success)" if isinstance(rate, (int, float)) else ""
    state = breaker.get("state", "?")
    changes, rejections = m.get("breaker_state_changes", "?"), m.get("breaker_rejections", "?")
    ok, failed = m.get("recoveries_succeeded", "?"), m.get("recoveries_failed", "?")
    attempts = m.get("recovery_attempts", "?")
    sends, sent, errors = m.get("sends", "?"), m.get("sent_bytes", "?"), m.get("send_errors", "?")
    facts = [
        ("Circuit breaker", f"{state} (transitions {changes}, rejections {rejections})"),
        ("Health checks", f"{m.get('health_checks', '?')}"),
        ("Recoveries", f"{ok} succeeded, {failed} failed, {attempts} attempts{success}"),
        ("Sends", f"{sends} ok ({sent} bytes), {errors} errors"),
    ]
    downtime = m.get("downtime_seconds") or {}
    down = [f"{name} {_duration(s)}" for name, s in downtime.items() if s]
    if down:
        facts.append(("Downtime", ", ".join(down)))
    lines += ["", *(f"{label + ':':<17}{value}" for label, value in facts)]
    return "\n".join(lines)


def _run_cluster_status(args: argparse.Namespace) -> int:
    from dwcp._cluster import ClusterError, cluster_document, cluster_health, render_cluster

    try:
        view = cluster_health(args.cluster, namespace=args.namespace, timeout=args.timeout)
    except (ClusterError, ValueError, TypeError, ImportError) as exc:
        print(f"dwcp status: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(json.dumps(cluster_document(view), indent=2) if args.json else render_cluster(view))
    return EXIT_HEALTHY if view.healthy else EXIT_UNHEALTHY


def _run_status(args: argparse.Namespace) -> int:
    if args.cluster is not None:
        return _run_cluster_status(args)
    if args.url is None:
        print("dwcp status: give a health server URL or --cluster REDIS_URL", file=sys.stderr)
        return EXIT_UNREACHABLE
    url: str = args.url  # already completed by health_url, through the argument's type
    try:
        text, document = _fetch(url, args.timeout)
    except _Unreachable as exc:
        print(f"dwcp status: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(text.rstrip("\n") if args.json else render_status(document, url))
    return EXIT_HEALTHY if document.get("status") == "healthy" else EXIT_UNHEALTHY


# -- the registry ---------------------------------------------------------------------------

COMMANDS: tuple[Command, ...] = (
    Command(
        "status",
        "show the health of a running dwcp manager from its HealthServer",
        _configure_status,
        _run_status,
    ),
    Command(
        "demo",
        "watch the manager ride out a receiver outage on 127.0.0.1",
        demo.configure,
        demo.run,
    ),
)


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    """The argument parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="dwcp", description="Tools for the dwcp error-recovery manager."
    )
    parser.add_argument("--version", action="version", version=f"dwcp {__version__}")
    subparsers = parser.add_subparsers(dest="command", title="commands", required=True)
    for command in commands:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.configure(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)
