"""Engines behind one protocol, picked by URL scheme; each is imported only when asked for."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from keel.backends._url import mask_password, scheme_of
from keel.errors import ConfigurationError, MissingExtraError, UnknownSchemeError

if TYPE_CHECKING:
    from keel.backends.base import Backend, StoreEngine, StoreOptions

#: scheme -> (module, engine name, extra that installs its driver, the driver's import name)
_ENGINES: dict[str, tuple[str, str, str | None, str | None]] = {
    "sqlite": ("keel.backends.sqlite.store", "SQLite", None, None),
    "postgresql": ("keel.backends.postgres.store", "PostgreSQL", "postgres", "psycopg"),
    "postgres": ("keel.backends.postgres.store", "PostgreSQL", "postgres", "psycopg"),
    "redis": ("keel.backends.redis.store", "Redis", "redis", "redis"),
    "rediss": ("keel.backends.redis.store", "Redis", "redis", "redis"),
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
