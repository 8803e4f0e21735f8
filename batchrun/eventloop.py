"""Which event loop runs a job: ``--loop auto|asyncio|uvloop``.

uvloop (libuv) runs the same asyncio code with less overhead per socket
event; it is a default dependency wherever it builds (not on Windows).
``auto`` takes it when it can be imported and falls back to the standard
loop otherwise; ``uvloop`` insists on it.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any, Final, Literal

from batchrun.errors import UsageError

LoopName = Literal["auto", "asyncio", "uvloop"]
LOOPS: Final = ("auto", "asyncio", "uvloop")

__all__ = ["LOOPS", "LoopName", "backend_options", "resolve", "running"]


def resolve(name: str) -> Literal["asyncio", "uvloop"]:
    """The loop ``name`` stands for here; ``UsageError`` when ``uvloop`` is
    asked for and cannot be imported."""
    available = importlib.util.find_spec("uvloop") is not None
    if name == "uvloop" and not available:
        raise UsageError(
            "--loop uvloop: uvloop is not installed (it does not build on Windows);"
            " install it (pip install uvloop) or use --loop asyncio"
        )
    if name == "uvloop" or (name == "auto" and available):
        return "uvloop"
    return "asyncio"


def backend_options(name: str) -> dict[str, Any]:
    """``anyio.run`` backend options for loop ``name``."""
    return {"use_uvloop": resolve(name) == "uvloop"}


def running() -> str:
    """The name of the event loop running now: "uvloop" or "asyncio"."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
