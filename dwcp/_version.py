"""The package version, in one place: setup.cfg reads it (``version = attr:``) and so does
``dwcp.__version__``."""

__version__ = "0.1.0.dev0"
