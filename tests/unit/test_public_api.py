"""The public surface is deliberate: ``__all__`` is sorted and matches what the package exports."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import dwcp

ROOT = Path(__file__).resolve().parents[2]


def test_all_is_sorted_and_complete() -> None:
    assert list(dwcp.__all__) == sorted(dwcp.__all__)
    public = {name for name in vars(dwcp) if not name.startswith("_")}
    modules = {name for name, value in vars(dwcp).items() if inspect.ismodule(value)}
    assert public - modules == set(dwcp.__all__)


def test_no_foreign_types_in_public_signatures() -> None:
    """pybreaker and tenacity are implementation details: no public signature names them."""
    for exported in dwcp.__all__:
        obj = getattr(dwcp, exported)
        if not inspect.isclass(obj):
            continue
        for name, member in inspect.getmembers(obj, inspect.isfunction):
            if name.startswith("_") and name != "__init__":
                continue
            text = str(inspect.signature(member))
            assert "pybreaker" not in text and "tenacity" not in text, f"{exported}.{name}"


def test_errors_carry_codes() -> None:
    assert dwcp.CircuitOpenError("x").code == "CIRCUIT_OPEN"
    assert dwcp.TransportError("x").code == "TRANSPORT_ERROR"
    assert issubclass(dwcp.CircuitOpenError, dwcp.DWCPError)
    assert issubclass(dwcp.TransportError, dwcp.DWCPError)
    assert dwcp.DWCPError("boom", code="NOT_STARTED").code == "NOT_STARTED"
    assert str(dwcp.DWCPError("boom", code="NOT_STARTED")) == "[NOT_STARTED] boom"


def test_logging_is_disabled_until_the_application_enables_it() -> None:
    from loguru import logger

    seen: list[str] = []
    sink = logger.add(lambda message: seen.append(str(message)), level="DEBUG")
    try:
        manager = dwcp.Manager(compression=_Layer())
        manager.start()
        manager.stop()
        assert seen == []
        logger.enable("dwcp")
        manager.start()
        manager.stop()
        assert any("DWCP manager started" in line for line in seen)
    finally:
        logger.disable("dwcp")
        logger.remove(sink)


class _Layer:
    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def is_healthy(self) -> bool:
        return True


# -- logging -----------------------------------------------------------------------------------

_PROBE = """
import json, sys
from loguru import logger
logger.remove()
seen = []
logger.add(lambda m: seen.append(m.record["name"]), level="DEBUG")
{before}
import dwcp
notifier = dwcp.WebhookNotifier("http://127.0.0.1:9/hook", queue_size=1, repeat_interval=0)
notifier(dwcp.RecoveryFailed("transport", 1, None))
notifier(dwcp.RecoveryFailed("transport", 1, None))  # pushes the first out: a warning
exec("from loguru import logger; logger.warning('probe')", {{"__name__": "dwcp.probe"}})
print(json.dumps(seen))
"""


@pytest.mark.parametrize(
    ("before", "expected"),
    [
        ("", []),
        ('logger.enable("dwcp")', ["dwcp.webhook", "dwcp.probe"]),
        ('logger.enable("dwcp.webhook")', ["dwcp.webhook"]),
        ('logger.enable("dwcp"); logger.disable("dwcp.probe")', ["dwcp.webhook"]),
        ('logger.disable("dwcp")', []),
    ],
)
def test_what_the_application_set_before_import_survives_the_import(
    before: str, expected: list[str]
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE.format(before=before)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def stdlib_records() -> Iterator[_Records]:
    handler = _Records()
    target = logging.getLogger("myapp.dwcp")
    target.addHandler(handler)
    target.setLevel(logging.DEBUG)
    target.propagate = False
    sink = dwcp.forward_to_logging("myapp.dwcp", level="DEBUG")
    try:
        yield handler
    finally:
        from loguru import logger

        logger.remove(sink)
        logger.disable("dwcp")
        target.removeHandler(handler)
        target.propagate = True


def test_forward_to_logging_hands_records_and_fields_to_stdlib(
    stdlib_records: _Records,
) -> None:
    notifier = dwcp.WebhookNotifier(
        "http://127.0.0.1:9/hook/secret", queue_size=1, repeat_interval=0
    )
    notifier(dwcp.RecoveryFailed("transport", 1, None))
    notifier(dwcp.RecoveryFailed("sync", 1, None))  # pushes the first out: a warning
    [record] = stdlib_records.records
    assert record.name == "myapp.dwcp.webhook"
    assert (record.levelno, record.levelname) == (logging.WARNING, "WARNING")
    assert (
        record.getMessage()
        == "Webhook alert dropped: recovery_failed (queue full or notifier closed)"
    )
    assert (record.url, record.event) == ("http://127.0.0.1:9", "recovery_failed")  # type: ignore[attr-defined]
    assert record.dwcp_fields == {"url": "http://127.0.0.1:9", "event": "recovery_failed"}  # type: ignore[attr-defined]
    assert record.pathname.endswith("webhook.py") and record.funcName == "__call__"


def test_forwarded_exceptions_and_fields_named_like_record_attributes(
    stdlib_records: _Records,
) -> None:
    code = (
        "from loguru import logger\n"
        "try:\n"
        "    raise OSError('disk gone')\n"
        "except OSError as exc:\n"
        "    logger.opt(exception=exc).bind(thread='dwcp-monitor', component='sync')"
        ".error('Component failed: sync')\n"
        "logger.trace('below the level')\n"
    )
    exec(compile(code, "dwcp/fake.py", "exec"), {"__name__": "dwcp.fake"})  # noqa: S102
    [record] = stdlib_records.records
    assert record.name == "myapp.dwcp.fake"
    assert record.exc_info is not None and isinstance(record.exc_info[1], OSError)
    assert record.dwcp_thread == "dwcp-monitor"  # type: ignore[attr-defined]
    own_thread: object = record.thread  # typed int | None; widened to compare with a str
    assert own_thread != "dwcp-monitor"  # the LogRecord's own attribute is untouched
    assert record.component == "sync"  # type: ignore[attr-defined]
    assert "OSError: disk gone" in logging.Formatter().format(record)


def test_forward_to_logging_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match="logger_name"):
        dwcp.forward_to_logging(logger_name="")
    with pytest.raises(TypeError, match="level"):
        dwcp.forward_to_logging(level=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="level"):
        dwcp.forward_to_logging(level="LOUD")


def test_version_is_the_packages() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|a\d+|b\d+|rc\d+)?", dwcp.__version__)
    setup_cfg = (ROOT / "setup.cfg").read_text()
    assert "version = attr: dwcp._version.__version__" in setup_cfg


def test_forward_to_logging_picks_a_logger_and_a_minimum_level_and_its_id_stops_it() -> None:
    """README.md, "Watching it": "It also enables dwcp's logs;
    `forward_to_logging(logger_name="myapp.dwcp", level="WARNING")` picks another logger and a
    minimum level, and `logger.remove(handler_id)` with the id it returns stops it." """
    from loguru import logger

    handler = _Records()
    target = logging.getLogger("myapp.warnings")
    target.addHandler(handler)
    target.setLevel(logging.DEBUG)
    target.propagate = False
    code = "from loguru import logger\nlogger.info('Quiet: {}', 1)\nlogger.warning('Loud: {}', 2)\n"
    emit = compile(code, "dwcp/fake.py", "exec")
    logger.disable("dwcp")
    sink = dwcp.forward_to_logging(logger_name="myapp.warnings", level="WARNING")
    try:
        exec(emit, {"__name__": "dwcp.fake"})  # noqa: S102
        assert [(r.name, r.getMessage()) for r in handler.records] == [
            ("myapp.warnings.fake", "Loud: 2")
        ]  # enabled although dwcp was disabled; the INFO record is below the level
        logger.remove(sink)
        exec(emit, {"__name__": "dwcp.fake"})  # noqa: S102
        assert len(handler.records) == 1  # stopped
    finally:
        with contextlib.suppress(ValueError):
            logger.remove(sink)
        logger.disable("dwcp")
        target.removeHandler(handler)
        target.propagate = True
