"""dwcp's logging as a library citizen: silent by default, and a bridge to stdlib ``logging``.

dwcp logs through loguru.  Importing dwcp disables its records (``logger.disable("dwcp")``)
unless the application already said what it wants for them, and ``forward_to_logging``
hands them to stdlib ``logging`` for applications that use it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from loguru import logger

if TYPE_CHECKING:
    from loguru import Message

__all__ = ["forward_to_logging"]

_PACKAGE = "dwcp"
# Attributes every LogRecord has (plus the two Formatter adds): a bound field with one of
# these names would make makeRecord raise, so it is passed as "dwcp_<name>" instead.
_RESERVED = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def silence_unless_configured() -> None:
    """``logger.disable("dwcp")``, unless the application enabled or disabled dwcp already.

    loguru has no public way to ask, and an unconditional ``disable`` at import would undo a
    ``logger.enable("dwcp")`` made before it.  Its activation list (``(name + ".", enabled)``
    pairs, stable since loguru 0.2) says what was asked; if it cannot be read, dwcp is
    disabled as loguru's documentation recommends.
    """
    try:
        entries = [
            (name, enabled)
            for name, enabled in logger._core.activation_list  # type: ignore[attr-defined]
            if isinstance(name, str) and name.startswith(_PACKAGE + ".")
        ]
    except (AttributeError, TypeError, ValueError):
        entries = []
    if any(name == _PACKAGE + "." for name, _ in entries):
        return  # the application decided for the whole package
    logger.disable(_PACKAGE)
    # Settings the application made for parts of dwcp (logger.enable("dwcp.transport"))
    # were removed by that disable; apply them again, parents first.
    for name, enabled in sorted(entries, key=lambda entry: entry[0].count(".")):
        (logger.enable if enabled else logger.disable)(name[:-1])


def forward_to_logging(logger_name: str = _PACKAGE, level: int | str = logging.DEBUG) -> int:
    """Forward dwcp's log records to stdlib ``logging`` and enable them; return the sink id.

    A record from module ``dwcp.x`` goes to the stdlib logger ``<logger_name>.x`` (so
    ``logging.getLogger("dwcp")`` configures them all) at the same level number, with its
    exception, and with loguru's bound fields (``component``, ``state``, ``error``...) as
    attributes of the ``LogRecord`` (``extra``), for a formatter or a JSON handler to show.
    A field named like a ``LogRecord`` attribute becomes ``dwcp_<name>``; all of them are
    also in ``record.dwcp_fields``.  ``level`` is the lowest level forwarded (a stdlib level
    number or a loguru level name).  ``logger.remove(id)`` with the returned id stops it.
    """
    if not isinstance(logger_name, str) or not logger_name:
        raise TypeError(f"logger_name must be a non-empty str, got {logger_name!r}")
    if isinstance(level, bool) or not isinstance(level, (int, str)):
        raise TypeError(f"level must be an int or a level name, got {level!r}")
    try:
        sink_id = logger.add(
            _Forwarder(logger_name), level=level, filter=_PACKAGE, format="{message}"
        )
    except ValueError as exc:  # loguru's word for an unknown level name or a negative number
        raise ValueError(f"level: {exc}") from exc
    logger.enable(_PACKAGE)
    return sink_id


class _Forwarder:
    """The loguru sink: one stdlib ``LogRecord`` per loguru record."""

    def __init__(self, logger_name: str) -> None:
        self._logger_name = logger_name

    def __call__(self, message: Message) -> None:
        record = message.record
        module = record["name"] or _PACKAGE
        suffix = module[len(_PACKAGE) :] if module.startswith(_PACKAGE) else "." + module
        target = logging.getLogger(self._logger_name + suffix)
        levelno = record["level"].no
        if not target.isEnabledFor(levelno):
            return
        fields = dict(record["extra"])
        extra: dict[str, Any] = {
            (f"dwcp_{key}" if key in _RESERVED else key): value for key, value in fields.items()
        }
        extra["dwcp_fields"] = fields
        exception = record["exception"]
        exc_info = (
            (exception.type, exception.value, exception.traceback)
            if exception is not None and exception.type is not None
            else None
        )
        target.handle(
            target.makeRecord(
                target.name,
                levelno,
                record["file"].path,
                record["line"],
                record["message"],
                (),
                exc_info,  # type: ignore[arg-type]
                record["function"],
                extra,
            )
        )
