"""The exactly-once example's record file survives a kill inside a record's ``write()``
(``examples/exactly_once_receiver.py``: a torn last line is cut off at the next start)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import dwcp

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "exactly_once_receiver.py"
A = "a1" * 16
B = "b2" * 16


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("exactly_once_receiver", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_torn_last_line_is_cut_off_so_the_next_record_is_readable(tmp_path: Path) -> None:
    records = tmp_path / "records"
    records.write_text(f"{A} 0 first\n{A} 1 second\n{B} 0 x")  # killed inside B 0's write()
    processed = example().processed
    assert processed(str(records)) == {A: 1}
    assert records.read_text() == f"{A} 0 first\n{A} 1 second\n"
    with open(records, "a") as file:  # the restarted receiver: B resends message 0
        file.write(f"{B} 0 x\n")
    assert processed(str(records)) == {A: 1, B: 0}


def test_a_tear_inside_the_sender_id_never_stops_the_next_start(tmp_path: Path) -> None:
    # Before the fix, the next record was appended to "a1a1a1a1" and the merged line's first
    # field (40 hex digits) went to resume_from, which refused it at every later start.
    records = tmp_path / "records"
    records.write_text(f"{A} 0 first\n{A[:8]}")
    module = example()
    assert module.processed(str(records)) == {A: 0}
    records.write_text(f"{A} 0 first\n{A[:8]}{B} 3 merged\n{'0' * 32} 1 zero\n{A} 2x y\n")
    assert module.processed(str(records)) == {A: 0}


def test_a_missing_file_means_nothing_processed(tmp_path: Path) -> None:
    assert example().processed(str(tmp_path / "absent")) == {}


def test_a_restart_after_more_senders_than_resume_from_takes_keeps_the_latest(
    tmp_path: Path,
) -> None:
    # README: resume_from takes at most 4,096 senders; the receiver itself forgets the least
    # recently seen first. Before the fix the example handed every sender it had ever recorded
    # and the 4,097th made every later start raise ValueError.
    records = tmp_path / "records"
    senders = [f"{n + 1:032x}" for n in range(4097)]
    records.write_text("".join(f"{sender} 0 m\n" for sender in senders) + f"{senders[0]} 1 m\n")
    last = example().processed(str(records))
    assert len(last) == 4096 and senders[1] not in last  # the least recently seen went
    assert last[senders[0]] == 1 and last[senders[-1]] == 0
    dwcp.MultiStreamReceiver(on_message=print, with_ids=True, resume_from=last)
