"""Engines behind one contract (``base.py``), picked by URL scheme; each is imported only when asked for.

Each scheme names the module holding its engine's entry points, ``open_engine(url, options)`` (the store alone)
and ``open_backend(url, options)`` (store and broker composed, ``composed.py``): ``backend.py`` of the engine's
package (``sqlite/memory.py`` for ``memory://``). ``wake.py`` holds the one wake gate every engine's broker uses;
``slots.py`` a first-come-first-served queue for a pool's connections, ``probe.py`` the one question (does the server
answer?) that tells load (``BackendOverloaded``) from an outage (``BackendUnavailable``); ``tasks.py`` stops the
engines' background tasks.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from keel.backends._url import mask_password, scheme_of
from keel.errors import ConfigurationError, MissingExtraError, UnknownSchemeError

if TYPE_CHECKING:
    from keel.backends.base import Backend, StoreEngine, StoreOptions

__all__ = ["SUPPORTED_SCHEMES", "forget_memory", "mask_password", "open_backend", "open_store_engine", "scheme_of"]

#: scheme -> (module of the entry points, engine name, extra that installs its driver, the driver's import name)
_ENGINES: dict[str, tuple[str, str, str | None, str | None]] = {
    "sqlite": ("keel.backends.sqlite.backend", "SQLite", None, None),
    "postgresql": ("keel.backends.postgres.backend", "PostgreSQL", "postgres", "psycopg"),
    "postgres": ("keel.backends.postgres.backend", "PostgreSQL", "postgres", "psycopg"),
    "redis": ("keel.backends.redis.backend", "Redis", "redis", "redis"),
    "rediss": ("keel.backends.redis.backend", "Redis", "redis", "redis"),
    "memory": ("keel.backends.sqlite.memory", "memory", None, None),
}

#: The schemes a URL may use, as listed in errors.
SUPPORTED_SCHEMES = sorted(_ENGINES)


async def open_store_engine(url: str, options: StoreOptions) -> StoreEngine:
    """Open the store of the engine that ``url`` names.

    Raises:
        UnknownSchemeError: The scheme names no engine.
        MissingExtraError: The engine's driver is not installed.
        BackendUnavailable: The engine cannot be reached.
    """
    module = _engine_module(url)
    opened: StoreEngine = await module.open_engine(url, options)
    return opened


async def open_backend(url: str, options: StoreOptions) -> Backend:
    """Open the whole backend (store and broker) of the engine that ``url`` names.

    Raises:
        UnknownSchemeError: The scheme names no engine.
        MissingExtraError: The engine's driver is not installed.
        BackendUnavailable: The engine cannot be reached.
    """
    module = _engine_module(url)
    opened: Backend = await module.open_backend(url, options)
    return opened


async def forget_memory(url: str) -> None:
    """Drop the ``memory://`` database ``url`` names with all its data (it otherwise lives as long as the process).

    Raises:
        ConfigurationError: ``url`` is not a ``memory://`` URL.
    """
    if scheme_of(url) != "memory":
        raise ConfigurationError(f"forget_memory() takes a memory:// URL, not {mask_password(url)!r}")
    await _engine_module(url).forget(url)


def _engine_module(url: str) -> Any:
    scheme = scheme_of(url)
    entry = _ENGINES.get(scheme)
    if entry is None:
        raise UnknownSchemeError(mask_password(url), scheme, SUPPORTED_SCHEMES)
    module_name, engine, extra, driver = entry
    if driver is not None and extra is not None:
        try:
            importlib.import_module(driver)
        except ImportError as exc:
            raise MissingExtraError(engine, extra, driver) from exc
    return importlib.import_module(module_name)
