"""The contract every engine implements, and the row types that cross it.

Engines speak JSON text and version numbers; encoding, key checks, typed values and the ``update()``
retry loop live above them (``keel.store``), written once for all engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from datetime import datetime


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One version of a key as an engine returns it.

    ``value_json`` is None for a tombstone: the key was deleted at ``version``.
    """

    key: str
    version: int
    value_json: str | None
    written_at: datetime
    writer: str


#: Versions kept per store key by default, the current one included.
DEFAULT_HISTORY_LIMIT = 100


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """Settings every engine honours."""

    #: How many versions of a key ``history()`` keeps, the current one included; 0 keeps none beyond the current.
    history_limit: int = DEFAULT_HISTORY_LIMIT


class StoreEngine(Protocol):
    """A versioned key-value store with compare-and-swap writes.

    Every write is atomic: the current value, its history entry and the trimming of old history change
    together or not at all. Version numbers of a key start at 1, grow by one per write (a delete is a
    write, leaving a tombstone), and are never reused.
    """

    #: The URL the engine was opened with, password masked: safe to log and to put in errors.
    url: str

    async def get(self, key: str, /) -> StoredRecord | None:
        """Return the current version of ``key``, or None if it was never written or is deleted.

        Raises:
            BackendUnavailable: The engine cannot be reached.
        """
        ...

    async def put(self, key: str, value_json: str, /, *, expected_version: int | None, writer: str) -> StoredRecord:
        """Write ``value_json`` as the next version if the current version is ``expected_version``.

        ``expected_version=None`` means the key must not exist (never written, or deleted).

        Returns:
            The record written.

        Raises:
            StaleWriteError: The current version is another one; nothing was written. Engines set its
                ``current`` to the live record they found (None if absent) when they have it at no extra cost.
            BackendUnavailable: The engine cannot be reached; the write may or may not have happened.
        """
        ...

    async def delete(self, key: str, /, *, expected_version: int, writer: str) -> StoredRecord:
        """Delete ``key`` if its current version is ``expected_version``, leaving a tombstone.

        Returns:
            The tombstone written (``value_json`` None), whose version is ``expected_version + 1``.

        Raises:
            StaleWriteError: The key is absent or at another version; nothing was written.
            BackendUnavailable: The engine cannot be reached.
        """
        ...

    async def history(self, key: str, /, *, limit: int) -> list[StoredRecord]:
        """Return up to ``limit`` kept versions of ``key``, newest first, tombstones included.

        With a history limit of 0 the engine keeps no past versions and returns the current one alone.

        Raises:
            BackendUnavailable: The engine cannot be reached.
        """
        ...

    async def aclose(self) -> None:
        """Release connections and threads. Safe to call twice."""
        ...
