"""The WAN benchmark's iperf3 wrapper, without namespaces: a server that answers "busy"."""

from __future__ import annotations

import json
from typing import Any

import pytest

from benchmarks import wan


class _Child:
    def __init__(self, out: str) -> None:
        self._out = out

    def communicate(self, timeout: float) -> tuple[str, None]:
        return self._out, None


class _Path:
    """Answers each iperf3 run with the next of ``answers`` (a JSON document)."""

    def __init__(self, answers: list[dict[str, Any]]) -> None:
        self.answers = answers
        self.runs = 0

    def spawn(self, ns: str, command: list[str], **kwargs: object) -> _Child:
        answer = self.answers[min(self.runs, len(self.answers) - 1)]
        self.runs += 1
        return _Child(json.dumps(answer))


_BUSY = {"error": "the server is busy running a test. try again later"}
_DONE = {
    "end": {"sum_received": {"bits_per_second": 2.5e6}, "sum_sent": {"retransmits": 7}},
}


def test_iperf_retries_a_busy_server_and_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(wan, "IPERF_BUSY_PAUSE", 0.0)
    path = _Path([_BUSY, _BUSY, _DONE])
    result = wan.iperf(path, "cubic", 1, 1.0)  # type: ignore[arg-type]
    assert result == {"mbit": 2.5, "retransmits": 7}
    assert path.runs == 3
    assert capsys.readouterr().out.count("server busy") == 2


def test_iperf_gives_up_on_a_server_busy_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wan, "IPERF_BUSY_PAUSE", 0.0)
    path = _Path([_BUSY])
    with pytest.raises(wan.BenchmarkError, match="busy"):
        wan.iperf(path, "cubic", 4, 1.0)  # type: ignore[arg-type]
    assert path.runs == wan.IPERF_BUSY_RETRIES + 1


def test_iperf_does_not_retry_other_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wan, "IPERF_BUSY_PAUSE", 0.0)
    path = _Path([{"error": "unable to connect to server: Connection refused"}, _DONE])
    with pytest.raises(wan.BenchmarkError, match="refused"):
        wan.iperf(path, "bbr", 1, 1.0)  # type: ignore[arg-type]
    assert path.runs == 1
