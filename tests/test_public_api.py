"""The public surface is deliberate: ``__all__`` is sorted and matches what the package exports."""

from __future__ import annotations

import inspect

import dwcp


def test_all_is_sorted_and_complete() -> None:
    assert list(dwcp.__all__) == sorted(dwcp.__all__)
    public = {name for name in vars(dwcp) if not name.startswith("_")}
    modules = {name for name, value in vars(dwcp).items() if inspect.ismodule(value)}
    assert public - modules == set(dwcp.__all__)


def test_no_foreign_types_in_public_signatures() -> None:
    """pybreaker and tenacity are implementation details: no public signature names them."""
    for exported in dwcp.__all__:
        obj = getattr(dwcp, exported)
        if not inspect.isclass(obj):
            continue
        for name, member in inspect.getmembers(obj, inspect.isfunction):
            if name.startswith("_") and name != "__init__":
                continue
            text = str(inspect.signature(member))
            assert "pybreaker" not in text and "tenacity" not in text, f"{exported}.{name}"


def test_errors_carry_codes() -> None:
    assert dwcp.CircuitOpenError("x").code == "CIRCUIT_OPEN"
    assert dwcp.TransportError("x").code == "TRANSPORT_ERROR"
    assert issubclass(dwcp.CircuitOpenError, dwcp.DWCPError)
    assert issubclass(dwcp.TransportError, dwcp.DWCPError)
    assert dwcp.DWCPError("boom", code="NOT_STARTED").code == "NOT_STARTED"
    assert str(dwcp.DWCPError("boom", code="NOT_STARTED")) == "[NOT_STARTED] boom"


def test_logging_is_disabled_until_the_application_enables_it() -> None:
    from loguru import logger

    seen: list[str] = []
    sink = logger.add(lambda message: seen.append(str(message)), level="DEBUG")
    try:
        manager = dwcp.Manager(compression=_Layer())
        manager.start()
        manager.stop()
        assert seen == []
        logger.enable("dwcp")
        manager.start()
        manager.stop()
        assert any("DWCP manager started" in line for line in seen)
    finally:
        logger.disable("dwcp")
        logger.remove(sink)


class _Layer:
    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def is_healthy(self) -> bool:
        return True
