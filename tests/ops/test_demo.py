"""``python -m dwcp demo``: a fast real run in-process, one as a subprocess, and flag checks."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dwcp import Manager
from dwcp._cli import main
from dwcp._demo import DemoConfig, run_demo

ROOT = Path(__file__).resolve().parents[2]
# A short outage at a twentieth of the library's timings: a run takes about --duration.
FAST = [
    "--warmup", "0.5",
    "--outage", "0.5",
    "--duration", "2.5",
    "--time-scale", "0.05",
    "--messages-per-second", "50",
]  # fmt: skip
_LINE = re.compile(r"^\[\s*(\d+\.\d+)s\] (\S+)\s+(.*)$")


def summary(out: str) -> dict[str, str]:
    """The summary's ``label: value`` rows."""
    rows = out.split("\nsummary\n", 1)[1].splitlines()
    pairs = (row.split(":", 1) for row in rows if ":" in row)
    return {label.strip(): value.strip() for label, value in pairs}


def number(text: str) -> int:
    return int(text.split()[0])


def timeline(out: str) -> list[tuple[float, str, str]]:
    """The timestamped lines as (seconds, source, text)."""
    lines = []
    for line in out.splitlines():
        match = _LINE.match(line)
        if match:
            lines.append((float(match[1]), match[2], match[3]))
    return lines


def first(lines: list[tuple[float, str, str]], source: str, text: str) -> float:
    """When the first line from ``source`` containing ``text`` happened."""
    for at, where, what in lines:
        if where == source and text in what:
            return at
    raise AssertionError(f"no {source} line with {text!r}")


def test_a_fast_run_recovers_and_accounts_for_every_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo", *FAST]) == 0
    out = capsys.readouterr().out
    rows = summary(out)
    sent, delivered = number(rows["messages sent"]), number(rows["delivered"])
    failed, rejected = number(rows["failed"]), number(rows["rejected"])
    assert sent == delivered + failed + rejected
    assert number(rows["lost"]) == 0
    assert failed >= 5 and rejected > 0  # the breaker opened and turned sends away
    assert re.fullmatch(r"\d+\.\d\ds \(receiver back -> breaker closed\)", rows["time to recover"])
    assert rows["breaker at the end"] == "closed"
    assert rows["result"].startswith("OK")

    lines = timeline(out)
    assert re.search(r"health endpoint: http://127\.0\.0\.1:\d+/healthz", out)
    stopped = first(lines, "demo", "stopping the receiver")
    back = first(lines, "demo", "receiver back")
    assert stopped <= first(lines, "breaker", "-> OPEN") <= back
    assert stopped <= first(lines, "monitor", "transport unhealthy")
    assert first(lines, "recovery", "attempt 1/3 in 0.05s") >= stopped
    assert back <= first(lines, "breaker", "-> HALF-OPEN") <= first(lines, "breaker", "-> CLOSED")
    assert any(source == "status" for _, source, _ in lines)


def test_run_demo_reports_a_consistent_result() -> None:
    out = io.StringIO()
    config = DemoConfig(
        messages_per_second=50,
        warmup=0.5,
        outage=0.5,
        duration=2.5,
        time_scale=0.05,
        streams=2,
        message_size=100_000,
    )
    result = run_demo(config, out)
    assert result.ok, out.getvalue()
    assert result.sent == result.delivered + result.failed + result.rejected
    assert (result.lost, result.duplicates, result.corrupt) == (0, 0, 0)
    assert result.recovered and result.breaker_state == "closed"
    assert result.recovery_time is not None and 0 <= result.recovery_time < 2.0
    assert result.time_to_open is not None and result.time_to_detect is not None
    assert result.recovery_attempts >= 1


def test_a_run_too_short_to_recover_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    # At time scale 1 the monitor first looks after 10 s: the run ends long before that.
    flags = ["--time-scale", "1", "--warmup", "0.2", "--outage", "0.2", "--duration", "0.8"]
    assert main(["demo", *flags]) == 1
    rows = summary(capsys.readouterr().out)
    assert rows["time to recover"] == "did not recover"
    assert rows["result"].startswith("FAILED: no message got through after the receiver returned")
    sent, delivered = number(rows["messages sent"]), number(rows["delivered"])
    # A send that returned just before the kill sits unconfirmed in the window, and with no
    # recovery in the run it is never resent: counted as lost, so the rows still add up.
    lost = number(rows["lost"])
    assert sent == delivered + lost + number(rows["failed"]) + number(rows["rejected"])


def test_a_crashed_sender_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_send(self: Manager, data: object) -> None:
        raise RuntimeError("bug in the send path")

    monkeypatch.setattr(Manager, "send_with_circuit_breaker", broken_send)
    out = io.StringIO()
    config = DemoConfig(warmup=0.2, outage=0.2, duration=0.6, time_scale=0.05)
    result = run_demo(config, out)
    assert not result.ok
    assert result.crash == "dwcp-demo-sender: RuntimeError('bug in the send path')"
    assert "stopped by an unexpected error in dwcp-demo-sender" in out.getvalue()


def test_python_dash_m_dwcp_demo() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "dwcp", "demo", *FAST],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"health endpoint: http://127\.0\.0\.1:\d+/healthz", result.stdout)
    rows = summary(result.stdout)
    assert rows["result"].startswith("OK")
    assert "time to recover" in rows
    assert result.stderr == ""


@pytest.mark.parametrize(
    "flags",
    [
        ["--messages-per-second", "-1"],
        ["--messages-per-second", "0"],
        ["--messages-per-second", "nan"],
        ["--message-size", "-5"],
        ["--message-size", "4"],  # no room for the message id
        ["--message-size", "1.5"],
        ["--outage", "-1"],
        ["--outage", "0"],
        ["--warmup", "-0.5"],
        ["--duration", "-10"],
        ["--duration", "inf"],
        ["--time-scale", "-0.1"],
        ["--time-scale", "0"],
        ["--streams", "-1"],
        ["--streams", "0"],
        ["--streams", "33"],
        ["--outage", "soon"],
    ],
)
def test_invalid_flags_are_argparse_errors(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["demo", *flags])
    assert excinfo.value.code == 2
    assert f"argument {flags[0]}" in capsys.readouterr().err


def test_duration_must_leave_time_after_the_outage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--warmup", "1", "--outage", "2", "--duration", "3"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "--duration (3) must exceed --warmup + --outage" in captured.err
    with pytest.raises(ValueError, match="--duration"):
        run_demo(DemoConfig(warmup=1, outage=2, duration=3), io.StringIO())


def test_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["demo", "--help"])
    assert excinfo.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--messages-per-second",
        "--message-size",
        "--outage",
        "--time-scale",
        "--streams",
        "--duration",
        "--warmup",
        "--unacknowledged",
    ):
        assert flag in text
