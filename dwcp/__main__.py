"""``python -m dwcp``: the command line in ``dwcp.cli``."""

from dwcp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
