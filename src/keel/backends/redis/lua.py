"""The Lua of ``scripts/``, read once: the store's scripts alone, the runtime's with ``runtime_lib.lua`` in front."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def script_text(name: str) -> str:
    """Return the text of ``scripts/NAME``."""
    return resources.files("keel.backends.redis").joinpath("scripts", name).read_text(encoding="utf-8")


@cache
def runtime_script(name: str) -> str:
    """Return the text of one runtime script with the shared helpers in front of it."""
    return script_text("runtime_lib.lua") + "\n" + script_text(name)
