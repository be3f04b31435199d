"""``python -m dwcp``: the command line in ``dwcp._cli``."""

from dwcp._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
