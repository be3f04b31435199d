"""The ``with`` statement of every dwcp class that starts: enter starts it, exit stops it."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing.Self is 3.11+ and setup.cfg still allows 3.10
    from typing_extensions import Self

__all__ = ["StartStop"]


class StartStop:
    """Mixin: ``with thing:`` calls ``thing.start()``, then ``thing.stop()`` however the block
    ends (an exception in it propagates).  The class defines ``start()`` and ``stop()``."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        """Start (see ``start()``) and return this object."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop (see ``stop()``)."""
        self.stop()
