"""The README's quick start runs as written, and its set-up commands are the ones CI runs."""

from __future__ import annotations

import configparser
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dwcp

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _block_after(heading: str, language: str) -> str:
    section = README.split(f"## {heading}", 1)[1]
    match = re.search(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert match, f"no {language} block under {heading}"
    return match.group(1)


def test_quick_start_runs_as_written() -> None:
    code = _block_after("Quick start", "python")
    exec(compile(code, "README.md quick start", "exec"), {})  # noqa: S102 - our own README


def test_the_transport_listing_shows_the_real_defaults() -> None:
    """The README's MultiStreamTCPTransport(...) listing: each keyword shown is one the
    constructor takes, with its real default; connect_timeout is among them."""
    listing = _block_after("The multi-stream transport", "python").split(
        "dwcp.MultiStreamReceiver"
    )[0]
    shown = dict(re.findall(r"^\s+(\w+)=([^,#]+),", listing, re.MULTILINE))
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(dwcp.MultiStreamTCPTransport).parameters.items()
    }
    assert "connect_timeout" in shown
    for name, text in shown.items():
        assert name in defaults, name
        assert eval(text) == defaults[name], (name, text)


def test_the_manager_listing_shows_the_real_defaults() -> None:
    """README.md, "Configuration": "Everything is a constructor argument", listed with its
    default (`health_interval=10.0`, `max_failures=5`, `delivery_buffer_bytes=32 * 2**20`...):
    each keyword shown is one ``Manager`` takes, with its real default (``{}`` shown for a
    mapping that defaults to None, which means empty)."""
    listing = _block_after("Configuration", "python")
    shown = dict(re.findall(r"(\w+)=([^,#\n]+),", listing))
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(dwcp.Manager).parameters.items()
    }
    assert {"health_interval", "delivery_timeout", "fail_fast", "consensus"} <= set(shown)
    for name, text in shown.items():
        assert name in defaults, name
        default = (
            {} if name in ("layers", "recovery") and defaults[name] is None else defaults[name]
        )
        assert eval(text) == default, (name, text, defaults[name])


def test_readme_test_command_is_what_ci_runs() -> None:
    commands = re.findall(r"```sh\n(.*?)\n```", README.split("## Set up", 1)[1].split("##")[0])
    assert len(commands) == 2
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert commands[1] in ci
    assert "dwcp demo" in commands[0]


def _extras() -> dict[str, list[str]]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return {
        name: [line.split("=")[0].split(">")[0].strip() for line in value.split("\n") if line]
        for name, value in config["options.extras_require"].items()
    }


def test_the_projects_own_tools_are_in_the_dev_extra_not_test() -> None:
    extras = _extras()
    assert {"ruff", "mypy"} <= set(extras["dev"])
    assert not {"ruff", "mypy"} & set(extras["test"])
    ci = (ROOT / ".ci" / "run").read_text()
    # The README's test command runs first, then the dev tools are installed for the lint.
    assert (
        ci.index("pip install -e '.[test]' && python3 -m pytest")
        < ci.index("pip install -e '.[test,dev]'")
        < ci.index("ruff check")
    )


@pytest.mark.skipif(not os.environ.get("DWCP_FULL"), reason="builds a venv; set DWCP_FULL=1")
def test_the_editable_install_is_visible_to_type_checkers(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)],
        check=True,
        timeout=300,
    )
    script = tmp_path / "user_script.py"
    script.write_text("import dwcp\n\nversion: str = dwcp.__version__\nprint(version)\n")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--python-executable", str(python), str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_error_table_lists_every_code_the_library_raises() -> None:
    table = README.split("| error | `.code` |", 1)[1].split("\n\n", 1)[0]
    raised = set()
    for path in (ROOT / "dwcp").rglob("*.py"):
        source = path.read_text()
        raised |= set(re.findall(r'\bcode\s*=\s*"([A-Z_]+)"', source))
    assert raised >= {"TRANSPORT_ERROR", "CIRCUIT_OPEN", "NOT_STARTED", "NO_TRANSPORT"}
    missing = sorted(code for code in raised - {"DWCP_ERROR"} if f"`{code}`" not in table)
    assert missing == [], f"README error table lacks {missing}"
    assert "| `TransportError` | `NOT_STARTED` |" in table
