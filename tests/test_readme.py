"""The README's quick start runs as written, and its set-up commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _block_after(heading: str, language: str) -> str:
    section = README.split(f"## {heading}", 1)[1]
    match = re.search(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert match, f"no {language} block under {heading}"
    return match.group(1)


def test_quick_start_runs_as_written() -> None:
    code = _block_after("Quick start", "python")
    exec(compile(code, "README.md quick start", "exec"), {})  # noqa: S102 - our own README


def test_readme_test_command_is_what_ci_runs() -> None:
    commands = re.findall(r"```sh\n(.*?)\n```", README.split("## Set up", 1)[1].split("##")[0])
    assert len(commands) == 2
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert commands[1] in ci
    assert "dwcp demo" in commands[0]
