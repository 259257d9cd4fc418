"""The versioned store: the shared state the first article asks for, done right.

``Store`` is what users hold. It checks keys, encodes values as JSON, types them with pydantic, and runs
the ``update()`` retry loop; the engine underneath (``keel.backends``) only stores JSON text and compares
versions. Everything here is written once for every engine.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import random
from collections import OrderedDict
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar, overload

from pydantic import BaseModel

from keel.backends import open_store_engine
from keel.backends.base import DEFAULT_HISTORY_LIMIT, StoredRecord, StoreOptions
from keel.config import resolve_url
from keel.errors import ConfigurationError, KeelError, KeyNotFoundError, StaleWriteError, UpdateContentionError
from keel.identity import process_identity
from keel.payload import DEFAULT_MAX_VALUE_BYTES, coerce, decode, encode, validate_key
from keel.types import Versioned

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from keel.backends.base import StoreEngine

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)

#: How long ``update()`` keeps retrying lost compare-and-swaps before it gives up, by default.
DEFAULT_UPDATE_DEADLINE_S = 10.0

#: The first retry of ``update()`` waits up to this long; each further retry doubles it, up to the cap.
UPDATE_BACKOFF_BASE_S = 0.001

#: The longest wait between two ``update()`` attempts.
UPDATE_BACKOFF_CAP_S = 0.05

#: The default number of entries ``history()`` returns.
DEFAULT_HISTORY_READ = 100


class _RecentRecords:
    """The last version this store wrote or read of a few keys: a starting guess for ``update()``, never an answer.

    Bounded in entries and in the size of each value kept, so it cannot grow with the data.
    """

    MAX_ENTRIES = 256
    MAX_VALUE_CHARS = 16 * 1024

    def __init__(self) -> None:
        self._records: OrderedDict[str, StoredRecord] = OrderedDict()

    def recall(self, key: str) -> StoredRecord | _Unknown:
        return self._records.get(key, _UNKNOWN)

    def remember(self, record: StoredRecord) -> None:
        if record.value_json is None or len(record.value_json) > self.MAX_VALUE_CHARS:
            self._records.pop(record.key, None)
            return
        self._records[record.key] = record
        self._records.move_to_end(record.key)
        if len(self._records) > self.MAX_ENTRIES:
            self._records.popitem(last=False)

    def forget(self, key: str) -> None:
        self._records.pop(key, None)


class _Unknown:
    """What the store knows of a key it has not read: nothing (unlike None, which means absent)."""


_UNKNOWN = _Unknown()


class _Missing:
    def __repr__(self) -> str:
        return "<no default>"


_MISSING: Any = _Missing()


class Store:
    """A versioned key-value store shared by every process that opens the same URL.

    Open it with ``keel.open_store(url)``. Values are JSON documents or pydantic models; every write
    is a compare-and-swap on the version, and ``update()`` turns that into a read-modify-write that
    never loses an update, however many processes run it at once.
    """

    def __init__(self, engine: StoreEngine, *, max_value_bytes: int, update_deadline_s: float) -> None:
        self._engine = engine
        self._max_value_bytes = max_value_bytes
        self._update_deadline_s = update_deadline_s
        self._recent = _RecentRecords()

    @property
    def url(self) -> str:
        """The backend URL, password masked."""
        return self._engine.url

    @overload
    async def get(self, key: str, *, model: None = None) -> Versioned[Any] | None: ...
    @overload
    async def get(self, key: str, *, model: type[ModelT]) -> Versioned[ModelT] | None: ...

    async def get(self, key: str, *, model: type[ModelT] | None = None) -> Versioned[Any] | None:
        """Read the current version of ``key``.

        Args:
            key: The key (1-255 printable characters).
            model: A pydantic model to decode the value into; plain JSON types when None.

        Returns:
            The current ``Versioned`` value, or None if the key was never written or was deleted.

        Raises:
            InvalidKeyError: The key is not usable.
            PayloadValidationError: The stored value does not fit ``model``.
            BackendUnavailable: The backend cannot be reached.
        """
        record = await self._engine.get(validate_key(key))
        if record is None or record.value_json is None:
            self._recent.forget(key)
            return None
        self._recent.remember(record)
        return _versioned(record, decode(record.value_json, model, what=f"value of {key!r}"))

    async def put(self, key: str, value: object, *, expected_version: int | None) -> Versioned[Any]:
        """Write ``value`` as the next version of ``key``, if ``key`` is still at ``expected_version``.

        Args:
            key: The key (1-255 printable characters).
            value: A JSON document (dict, list, str, int, float, bool, None) or a pydantic model.
            expected_version: The version this write is based on; None means "create: must not exist yet".
                There is no default: a blind overwrite is how updates get lost.

        Returns:
            The version written. Its value is what a later ``get`` returns: the JSON round trip of ``value``.

        Raises:
            StaleWriteError: ``key`` is at another version (or exists, for a create); nothing was written.
            InvalidKeyError, NotSerializableError, PayloadTooLargeError: Bad input; nothing was written.
            BackendUnavailable: The backend cannot be reached.
        """
        key = validate_key(key)
        _check_expected(expected_version)
        text = encode(value, what=f"value for {key!r}", max_bytes=self._max_value_bytes)
        try:
            record = await self._engine.put(key, text, expected_version=expected_version, writer=process_identity())
        except StaleWriteError:
            self._recent.forget(key)
            raise
        self._recent.remember(record)
        return _versioned(record, _round_trip(text, value))

    async def delete(self, key: str, *, expected_version: int) -> None:
        """Delete ``key`` if it is at ``expected_version``.

        The version counter survives as a tombstone, so a later re-create continues from it and an old
        ``expected_version`` can never match the new value.

        Raises:
            StaleWriteError: ``key`` is absent or at another version; nothing was changed.
            InvalidKeyError: The key is not usable.
            BackendUnavailable: The backend cannot be reached.
        """
        key = validate_key(key)
        if expected_version is None or not _is_version(expected_version):
            raise ConfigurationError(f"delete of {key!r} needs expected_version= a version number ≥ 1")
        self._recent.forget(key)
        await self._engine.delete(key, expected_version=expected_version, writer=process_identity())

    @overload
    async def update(
        self,
        key: str,
        fn: Callable[[Any], Any],
        *,
        default: Any = ...,
        model: None = None,
        deadline_s: float | None = None,
    ) -> Versioned[Any]: ...
    @overload
    async def update(
        self,
        key: str,
        fn: Callable[[ModelT], ModelT | Awaitable[ModelT]],
        *,
        default: Any = ...,
        model: type[ModelT],
        deadline_s: float | None = None,
    ) -> Versioned[ModelT]: ...

    async def update(
        self,
        key: str,
        fn: Callable[[Any], Any],
        *,
        default: Any = _MISSING,
        model: type[ModelT] | None = None,
        deadline_s: float | None = None,
    ) -> Versioned[Any]:
        """Atomically replace the value of ``key`` with ``fn(value)``.

        Reads the current version, calls ``fn`` on a private copy, and writes the result with a
        compare-and-swap; when another writer got there first it backs off (jittered, growing) and tries
        again on the new value. ``fn`` may be sync or async and may run more than once, so it should have
        no side effects.

        Args:
            key: The key (1-255 printable characters).
            fn: Maps the current value to the new one.
            default: The value ``fn`` receives when ``key`` does not exist; without it a missing key raises.
            model: A pydantic model: ``fn`` receives and returns instances of it.
            deadline_s: How long to keep retrying lost writes; the store's ``update_deadline_s`` when None.

        Returns:
            The version written.

        Raises:
            KeyNotFoundError: ``key`` does not exist and no ``default`` was given.
            UpdateContentionError: Every attempt lost to another writer until the deadline; nothing was written.
            InvalidKeyError, NotSerializableError, PayloadTooLargeError, PayloadValidationError: Bad input.
            BackendUnavailable: The backend cannot be reached.
        """
        key = validate_key(key)
        budget_s = self._update_deadline_s if deadline_s is None else deadline_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget_s
        # Start from the version this store last saw, if any: when no one else wrote since, the write
        # succeeds without a read first. The compare-and-swap keeps that safe: a stale start only fails.
        known: StoredRecord | _Unknown | None = self._recent.recall(key)
        from_cache = not isinstance(known, _Unknown)
        attempt = 0
        while True:
            attempt += 1
            if isinstance(known, _Unknown):
                known, from_cache = await self._engine.get(key), False
            try:
                expected, new_value, text = await self._apply(key, known, fn, default, model)
            except KeelError:
                raise
            except Exception:
                if not from_cache:
                    raise
                known = _UNKNOWN  # fn may have failed only on a stale value: judge it on a fresh one
                continue
            try:
                record = await self._engine.put(key, text, expected_version=expected, writer=process_identity())
            except StaleWriteError as exc:
                self._recent.forget(key)
                known = exc.current if exc.current is not None or exc.actual_version is None else _UNKNOWN
                if not from_cache:  # a real race with another writer, not just an old cached version
                    await self._back_off(key, attempt, deadline, budget_s)
                from_cache = False
                continue
            self._recent.remember(record)
            if attempt > 1:
                logger.debug("update of %s committed after %d attempts", key, attempt, extra={"key": key})
            return _versioned(record, _round_trip(text, new_value))

    async def _apply(
        self, key: str, current: StoredRecord | None, fn: Callable[[Any], Any], default: Any, model: type[ModelT] | None
    ) -> tuple[int | None, Any, str]:
        """Run ``fn`` on ``current`` (or the default) and encode the result: (expected version, value, JSON)."""
        expected, value = self._starting_point(key, current, default, model)
        new_value = fn(value)
        if inspect.isawaitable(new_value):
            new_value = await new_value
        if model is not None:
            new_value = coerce(new_value, model, what=f"update() result for {key!r}")
        text = encode(new_value, what=f"update() result for {key!r}", max_bytes=self._max_value_bytes)
        return expected, new_value, text

    async def _back_off(self, key: str, attempt: int, deadline: float, budget_s: float) -> None:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise UpdateContentionError(key, attempt, budget_s)
        await asyncio.sleep(min(remaining, _backoff_s(attempt)))

    async def history(self, key: str, *, limit: int = DEFAULT_HISTORY_READ) -> list[Versioned[Any]]:
        """Return the kept versions of ``key``, newest first.

        Each entry has the version, value, time written and writer; a deletion shows as an entry with
        ``deleted=True`` and value None. How many versions are kept is the store's ``history_limit``.

        Raises:
            InvalidKeyError: The key is not usable.
            ConfigurationError: ``limit`` is not a positive integer.
            BackendUnavailable: The backend cannot be reached.
        """
        key = validate_key(key)
        if not _is_version(limit):
            raise ConfigurationError(f"history() limit must be a positive integer, not {limit!r}")
        records = await self._engine.history(key, limit=limit)
        return [
            _versioned(r, None if r.value_json is None else decode(r.value_json), deleted=r.value_json is None)
            for r in records
        ]

    async def aclose(self) -> None:
        """Close the backend's connections. Safe to call twice."""
        await self._engine.aclose()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _starting_point(
        self, key: str, current: StoredRecord | None, default: Any, model: type[ModelT] | None
    ) -> tuple[int | None, Any]:
        if current is None or current.value_json is None:
            if default is _MISSING:
                raise KeyNotFoundError(key)
            start = copy.deepcopy(default)
            if model is not None:
                start = coerce(start, model, what=f"default for {key!r}")
            return None, start
        return current.version, decode(current.value_json, model, what=f"value of {key!r}")


def _versioned(record: StoredRecord, value: Any, *, deleted: bool = False) -> Versioned[Any]:
    # model_construct: the fields come from the engine and are already the right types.
    return Versioned[Any].model_construct(
        value=value, version=record.version, written_at=record.written_at, writer=record.writer, deleted=deleted
    )


def _round_trip(text: str, value: object) -> Any:
    """Return what a later ``get`` would return for ``value`` stored as ``text``."""
    if isinstance(value, BaseModel):
        return type(value).model_validate_json(text)
    return decode(text)


def _is_version(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_expected(expected_version: object) -> None:
    if expected_version is not None and not _is_version(expected_version):
        raise ConfigurationError(
            f"expected_version must be None (create) or a version number ≥ 1, not {expected_version!r}"
        )


def _backoff_s(attempt: int) -> float:
    # Full jitter: writers that collided once spread out instead of colliding again in step.
    return random.uniform(0, min(UPDATE_BACKOFF_CAP_S, UPDATE_BACKOFF_BASE_S * 2**attempt))


@asynccontextmanager
async def open_store(
    url: str | None = None,
    *,
    history_limit: int = DEFAULT_HISTORY_LIMIT,
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    update_deadline_s: float = DEFAULT_UPDATE_DEADLINE_S,
) -> AsyncIterator[Store]:
    """Open the versioned store at ``url`` for the duration of an ``async with`` block.

    Args:
        url: ``sqlite:///path.db``, ``postgresql://...``, ``redis://...`` or ``memory://``; when None, the
            ``KEEL_URL`` environment variable, else ``sqlite:///keel.db``.
        history_limit: Versions kept per key, the current one included (0 keeps only the current value).
        max_value_bytes: The largest value accepted, as JSON bytes.
        update_deadline_s: How long ``update()`` retries lost writes before raising.

    Yields:
        The open ``Store``; it is closed when the block exits.

    Raises:
        UnknownSchemeError: The URL's scheme names no engine (the error lists the supported ones).
        MissingExtraError: The engine's driver is not installed (the error says what to pip install).
        BackendUnavailable: The backend cannot be reached.
        ConfigurationError: An option is out of range.
    """
    if not isinstance(history_limit, int) or history_limit < 0:
        raise ConfigurationError(f"history_limit must be an integer ≥ 0, not {history_limit!r}")
    if not isinstance(max_value_bytes, int) or max_value_bytes < 1:
        raise ConfigurationError(f"max_value_bytes must be a positive integer, not {max_value_bytes!r}")
    if not update_deadline_s >= 0:
        raise ConfigurationError(f"update_deadline_s must be ≥ 0, not {update_deadline_s!r}")
    engine = await open_store_engine(resolve_url(url), StoreOptions(history_limit=history_limit))
    store = Store(engine, max_value_bytes=max_value_bytes, update_deadline_s=update_deadline_s)
    try:
        yield store
    finally:
        await store.aclose()
