"""The in-process engine, for unit tests: ``memory://`` or ``memory://NAME``.

One process only. Every store opened with the same URL in one process shares one dict, so a test's
client and an in-process worker see the same data; another process sees nothing of it, and nothing
survives the process. It passes the same conformance suite as the real engines.
"""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime

from keel.backends.base import StoredRecord, StoreOptions
from keel.errors import StaleWriteError


class _Space:
    """The data behind one ``memory://NAME`` URL."""

    def __init__(self) -> None:
        self.current: dict[str, StoredRecord] = {}
        self.past: dict[str, deque[StoredRecord]] = {}


_SPACES: dict[str, _Space] = {}


def _space_name(url: str) -> str:
    return url.split("://", 1)[1].strip("/")


class MemoryStore:
    """A versioned store in this process's memory; no awaits inside a write, so each write is atomic."""

    def __init__(self, url: str, options: StoreOptions) -> None:
        self.url = url
        self._options = options
        self._space = _SPACES.setdefault(_space_name(url), _Space())

    async def get(self, key: str, /) -> StoredRecord | None:
        """Return the current version of ``key``, or None."""
        record = self._space.current.get(key)
        return None if record is None or record.value_json is None else record

    async def put(self, key: str, value_json: str, /, *, expected_version: int | None, writer: str) -> StoredRecord:
        """Compare-and-swap ``key`` to ``value_json``."""
        return self._write(key, value_json, expected_version=expected_version, writer=writer)

    async def delete(self, key: str, /, *, expected_version: int, writer: str) -> StoredRecord:
        """Delete ``key`` at ``expected_version``, leaving a tombstone."""
        return self._write(key, None, expected_version=expected_version, writer=writer)

    async def history(self, key: str, /, *, limit: int) -> list[StoredRecord]:
        """Return kept versions of ``key``, newest first."""
        if self._options.history_limit == 0:
            record = self._space.current.get(key)
            return [record] if record is not None else []
        return list(reversed(self._space.past.get(key, ())))[:limit]

    async def aclose(self) -> None:
        """Nothing to release: the data stays for other stores of this process."""

    def _write(self, key: str, value_json: str | None, *, expected_version: int | None, writer: str) -> StoredRecord:
        existing = self._space.current.get(key)
        live_version = existing.version if existing is not None and existing.value_json is not None else None
        if live_version != expected_version:
            raise StaleWriteError(key, expected_version, live_version, current=existing if live_version else None)
        version = existing.version + 1 if existing is not None else 1
        record = StoredRecord(key, version, value_json, datetime.now(UTC), writer)
        self._space.current[key] = record
        limit = self._options.history_limit
        if limit > 0:
            self._space.past.setdefault(key, deque(maxlen=limit)).append(record)
        return record


async def open_engine(url: str, options: StoreOptions) -> MemoryStore:
    """Open the ``memory://`` space that ``url`` names."""
    return MemoryStore(url, options)


def reset(name: str | None = None) -> None:
    """Forget one memory space (or all of them); for tests."""
    if name is None:
        _SPACES.clear()
    else:
        _SPACES.pop(name, None)
