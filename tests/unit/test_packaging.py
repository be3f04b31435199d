"""What a user checks before adopting the library: licence, build system, Python versions."""

from __future__ import annotations

import configparser
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def metadata() -> configparser.SectionProxy:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config["metadata"]


def classifiers() -> list[str]:
    return [line.strip() for line in metadata()["classifiers"].splitlines() if line.strip()]


def test_the_mit_licence_the_metadata_names_is_shipped() -> None:
    assert metadata()["license"] == "MIT"
    assert metadata()["license_files"].strip() == "LICENSE"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    # No "License ::" classifier: setuptools deprecates them for the SPDX name above.
    assert not [c for c in classifiers() if c.startswith("License ::")]


def test_pyproject_names_the_setuptools_build_backend() -> None:
    tomllib = pytest.importorskip("tomllib")  # the standard library's from 3.11
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    assert any(req.startswith("setuptools") for req in build["requires"])


def test_every_supported_python_is_declared_and_this_one_among_them() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["options"]["python_requires"] == ">=3.10"
    versions = [c.rsplit(" :: ", 1)[1] for c in classifiers() if c.count(" :: ") == 2]
    versions = [v for v in versions if v.startswith("3.")]
    assert versions == ["3.10", "3.11", "3.12", "3.13"]
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert running in versions, f"tests run on Python {running}, which setup.cfg does not list"
