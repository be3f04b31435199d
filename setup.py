"""Shim so that older tooling and ``pip install -e .`` work; metadata lives in setup.cfg."""

from setuptools import setup

setup()
