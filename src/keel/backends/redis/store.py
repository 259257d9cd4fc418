"""The Redis engine's store: versioned keys with compare-and-swap, on the engine's connection (``connection.py``).

- Keys: ``keys.py`` names every key; one store key is a hash of its current record plus a list of its kept
  versions, both under one hash tag, so they share a cluster slot.
- Writes: one Lua script, ``scripts/write.lua``, compares the version, writes the record (or a tombstone),
  pushes the history entry and trims the history, all atomically and in one round trip (EVALSHA; redis-py's
  registered script reloads it once on NOSCRIPT, e.g. after a server restart emptied the script cache).
- Reads: ``HMGET`` of the current record or ``LRANGE`` of the history, one command each; a single command
  is atomic in Redis, so a read never sees half a write.
- Time: ``written_at`` comes from the server's ``TIME``, inside the script, never from a worker's clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from keel.backends.base import StoredRecord
from keel.backends.redis.lua import script_text
from keel.backends.redis.rows import RECORD_FIELDS, from_micros, record_from_entry, record_from_fields
from keel.errors import StaleWriteError

if TYPE_CHECKING:
    from keel.backends.base import StoreOptions
    from keel.backends.redis.connection import RedisConnection


class RedisStore:
    """A versioned store in Redis, shared by every process that opens the same server, DB and prefix.

    Open it with ``open_engine`` (or ``keel.open_store``), which connects, checks persistence and the
    schema, and loads the write script before returning.
    """

    def __init__(self, connection: RedisConnection, options: StoreOptions) -> None:
        #: The URL the store was opened with, password masked.
        self.url = connection.url
        self.connection = connection
        self._client = connection.client
        self._keys = connection.keys
        self._options = options
        self._write_script = connection.client.register_script(script_text("write.lua"))

    async def load_script(self) -> None:
        """Load the write script now, so that the first write is a single EVALSHA (not EVALSHA, NOSCRIPT, LOAD...).

        Raises:
            BackendUnavailable: The server cannot be reached.
        """
        async with self.connection.boundary("connect"):
            await self._client.script_load(self._write_script.script)

    async def aclose(self) -> None:
        """Close the connection pool. Safe to call twice."""
        await self.connection.aclose()

    async def get(self, key: str, /) -> StoredRecord | None:
        """Return the current version of ``key``, or None if it was never written or is deleted.

        Raises:
            BackendUnavailable: The server cannot be reached.
        """
        record = await self._current(key)
        return None if record is None or record.value_json is None else record

    async def put(self, key: str, value_json: str, /, *, expected_version: int | None, writer: str) -> StoredRecord:
        """Write ``value_json`` as the next version if the live version is ``expected_version``.

        Returns:
            The record written.

        Raises:
            StaleWriteError: The live version is another one; nothing was written.
            BackendUnavailable: The server cannot be reached; the write may or may not have happened.
        """
        return await self._write(key, value_json, expected_version=expected_version, writer=writer)

    async def delete(self, key: str, /, *, expected_version: int, writer: str) -> StoredRecord:
        """Delete ``key`` if its live version is ``expected_version``, leaving a tombstone.

        Returns:
            The tombstone written.

        Raises:
            StaleWriteError: The key is absent or at another version; nothing was written.
            BackendUnavailable: The server cannot be reached; the delete may or may not have happened.
        """
        return await self._write(key, None, expected_version=expected_version, writer=writer)

    async def history(self, key: str, /, *, limit: int) -> list[StoredRecord]:
        """Return up to ``limit`` kept versions of ``key``, newest first, tombstones included.

        Raises:
            BackendUnavailable: The server cannot be reached.
        """
        if self._options.history_limit == 0:
            record = await self._current(key)
            return [] if record is None else [record]
        async with self.connection.boundary("history"):
            entries = await self._client.lrange(self._keys.history(key), 0, limit - 1)
        # decode_responses=True: every reply is text.
        return [record_from_entry(key, entry) for entry in cast("list[str]", entries)]

    async def _current(self, key: str) -> StoredRecord | None:
        async with self.connection.boundary("get"):
            fields = await self._client.hmget(self._keys.current(key), RECORD_FIELDS)
        # decode_responses=True: every reply is text.
        return record_from_fields(key, cast("list[str | None]", fields))

    async def _write(
        self, key: str, value_json: str | None, *, expected_version: int | None, writer: str
    ) -> StoredRecord:
        args = (
            "" if expected_version is None else str(expected_version),
            "1" if value_json is None else "0",
            value_json or "",
            writer,
            str(self._options.history_limit),
        )
        async with self.connection.boundary("write"):
            reply = await self._write_script(keys=[self._keys.current(key), self._keys.history(key)], args=args)
        if reply[0] != 1:
            live = record_from_fields(key, list(reply[1:])) if len(reply) > 1 else None
            raise StaleWriteError(key, expected_version, live.version if live else None, current=live)
        return StoredRecord(key, int(reply[1]), value_json, from_micros(reply[2]), writer)
