"""The Redis engine of the versioned store: ``redis://host:port/db`` or ``rediss://`` (TLS).

Map of the design:

- Keys: ``keys.py`` names every key; one store key is a hash of its current record plus a list of its kept
  versions, both under one hash tag, so they share a cluster slot.
- Writes: one Lua script, ``scripts/write.lua``, compares the version, writes the record (or a tombstone),
  pushes the history entry and trims the history, all atomically and in one round trip (EVALSHA; redis-py's
  registered script reloads it once on NOSCRIPT, e.g. after a server restart emptied the script cache).
- Reads: ``HMGET`` of the current record or ``LRANGE`` of the history, one command each; a single command
  is atomic in Redis, so a read never sees half a write.
- Time: ``written_at`` comes from the server's ``TIME``, inside the script, never from a worker's clock.
- Errors: every redis-py error crosses into keel at one boundary, ``_unavailable_on_error``, and becomes
  ``BackendUnavailable`` with the password masked. Socket timeouts bound every wait.
- Reconnects: redis-py's pool drops a connection that failed, and checks a pooled connection for a closed
  socket before lending it out, reconnecting if needed; so once the server is back, the next call on the
  same open store works. redis-py's automatic retry is switched off (it would resend a command after a
  timeout): a compare-and-swap whose reply was lost may have been applied, and resending it would report a
  stale write for our own write, which ``update()`` would then apply a second time. Reads are not retried
  either, so every call fails within the socket timeouts rather than after several of them.
- Schema: ``keel:schema`` records the layout version (``scripts/schema.lua`` raises it, never lowers it); data
  at a newer version than this code is refused. Data at an older version is upgraded in place first
  (``migrate.py``), and only then is the new version recorded.
- Runtime: ``broker.py`` adds inboxes, leases and the turn commit on the same client and error boundary;
  ``open_backend`` here opens both, so that the factory finds every Redis entry point in this module.
- Durability: at connect the engine reads the server's persistence settings and logs one warning when a
  restart or crash of the server would lose acknowledged writes.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from keel.backends._url import mask_password
from keel.backends.base import StoredRecord, StoreOptions
from keel.backends.redis.keys import RedisKeys, split_prefix
from keel.backends.redis.migrate import upgrade_layout
from keel.errors import BackendUnavailable, ConfigurationError, StaleWriteError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from keel.backends.redis.backend import RedisBackend

logger = logging.getLogger(__name__)

#: Seconds to wait for a TCP connection, and for each reply, before raising ``BackendUnavailable``.
SOCKET_TIMEOUT_S = 5.0

#: Seconds a call waits for a free pooled connection when all are busy (``?max_connections=``, 50 by default).
POOL_WAIT_S = 5.0

#: The layout version this code reads and writes, kept in the schema hash under ``SCHEMA_COMPONENT``:
#: 1 the versioned store, 2 adds the runtime's keys (created on first use, so 1 -> 2 only records the number),
#: 3 adds step results, retry holds and dead letters (2 -> 3 indexes the failed messages: ``migrate.py``),
#: 4 adds timers, pruning and deletion (3 -> 4 dates the messages and builds the new indexes: ``migrate.py``),
#: 5 adds the event log and handler deliveries (keys created on first use, so 4 -> 5 only records the number).
STORE_SCHEMA_VERSION = 5

#: The field of the schema hash that holds the store's layout version.
SCHEMA_COMPONENT = "store"

#: What the warning about persistence tells the operator to do.
DURABILITY_FIX = (
    "To make every acknowledged write survive a restart, set appendonly yes and appendfsync always "
    "(in redis.conf, or CONFIG SET appendonly yes, CONFIG SET appendfsync always, then CONFIG REWRITE)"
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# The fields of the current-record hash, in the order HMGET returns them.
_RECORD_FIELDS = ("v", "d", "t", "w")

# Operations that change data, which may or may not have been applied when the reply is lost: what to do then.
_WRITES = {
    "write": "read the key before writing again",
    "send": "sending the same message id again appends nothing if it was",
    "claim": "a lease taken by a lost claim expires by itself",
    "renew": "the lease may still end at its old expiry",
    "commit": "read the message's status before running its turn again",
    "fail": "read the message's status",
    "release": "the lease expires by itself",
    "step": "a step recorded twice keeps its first result",
    "retry": "read the instance's turns before retrying again",
    "resolve": "list the dead letters before resolving again",
    "prune": "pruning again is harmless",
    "delete": "deleting again is harmless",
    "publish": "publishing the same event id again appends nothing if it was",
}

# Most specific first: the first two are ConnectionErrors too.
_HINTS: tuple[tuple[type[BaseException], str], ...] = (
    (BusyLoadingError, "the server is loading its data after a restart; try again in a moment"),
    (AuthenticationError, "check the user name and password in the URL"),
    (ReadOnlyError, "this server is a read-only replica; point the URL at the primary"),
    (RedisTimeoutError, f"no reply within {SOCKET_TIMEOUT_S:g} s; is the server overloaded or the network down?"),
    (RedisConnectionError, "is redis-server running, and reachable at this address?"),
    (ResponseError, "the server refused the command"),
)


class RedisStore:
    """A versioned store in Redis, shared by every process that opens the same server, DB and prefix.

    Open it with ``open_engine`` (or ``keel.open_store``), which connects, checks persistence and the
    schema, and loads the write script before returning.
    """

    def __init__(self, url: str, client: Redis, keys: RedisKeys, options: StoreOptions) -> None:
        #: The URL the store was opened with, password masked.
        self.url = url
        self._client = client
        self._keys = keys
        self._options = options
        self._write_script = client.register_script(_script_text("write.lua"))
        self._schema_script = client.register_script(_script_text("schema.lua"))
        self._closed = False

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
        async with self._unavailable_on_error("history"):
            entries = await self._client.lrange(self._keys.history(key), 0, limit - 1)
        # decode_responses=True: every reply is text.
        return [_record_from_entry(key, entry) for entry in cast("list[str]", entries)]

    async def aclose(self) -> None:
        """Close the connection pool. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self._client.aclose()

    async def _connect(self) -> None:
        """Check the server answers, warn if it is not durable, record the schema and load the script."""
        async with self._unavailable_on_error("connect"):
            await self._client.ping()
            persistence = await _read_persistence(self._client)
            found = await self._record_schema()
        warning = persistence_warning(persistence)
        if warning is not None:
            logger.warning("Redis at %s: %s. %s.", self.url, warning, DURABILITY_FIX)
        if not found.isdigit() or int(found) > STORE_SCHEMA_VERSION:
            raise ConfigurationError(
                f"the keel data at {self.url} (prefix {self._keys.prefix!r}) has store schema {found!r}, "
                f"newer than this keel's {STORE_SCHEMA_VERSION}: upgrade keel, or use another prefix or DB"
            )

    async def _record_schema(self) -> str:
        """Upgrade older data, then raise the recorded schema version to ours unless it is newer; return it."""
        found = await self._client.hget(self._keys.schema, SCHEMA_COMPONENT)
        if isinstance(found, str) and found.isdigit() and int(found) < STORE_SCHEMA_VERSION:
            await upgrade_layout(self._client, self._keys, int(found), url=self.url)
        before, now = await self._schema_script(
            keys=[self._keys.schema], args=[SCHEMA_COMPONENT, str(STORE_SCHEMA_VERSION)]
        )
        if before != now and not before:
            logger.info("keel data created at %s (prefix %r), schema version %s", self.url, self._keys.prefix, now)
        elif before != now:
            logger.info(
                "keel data at %s (prefix %r) upgraded from schema %s to %s", self.url, self._keys.prefix, before, now
            )
        # Loaded now, the first write is a single EVALSHA instead of EVALSHA, NOSCRIPT, SCRIPT LOAD, EVALSHA.
        await self._client.script_load(self._write_script.script)
        return str(now)

    async def _current(self, key: str) -> StoredRecord | None:
        async with self._unavailable_on_error("get"):
            fields = await self._client.hmget(self._keys.current(key), _RECORD_FIELDS)
        # decode_responses=True: every reply is text.
        return _record_from_fields(key, cast("list[str | None]", fields))

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
        async with self._unavailable_on_error("write"):
            reply = await self._write_script(keys=[self._keys.current(key), self._keys.history(key)], args=args)
        if reply[0] != 1:
            live = _record_from_fields(key, list(reply[1:])) if len(reply) > 1 else None
            raise StaleWriteError(key, expected_version, live.version if live else None, current=live)
        return StoredRecord(key, int(reply[1]), value_json, _from_micros(reply[2]), writer)

    @asynccontextmanager
    async def _unavailable_on_error(self, operation: str) -> AsyncIterator[None]:
        """The one place where redis-py's errors become keel's."""
        if self._closed:
            # redis-py would quietly open new connections that nothing closes any more.
            raise BackendUnavailable(self.url, "the store is closed")
        try:
            yield
        except (RedisError, OSError) as exc:
            raise _unavailable(self.url, operation, exc) from exc


async def open_engine(url: str, options: StoreOptions) -> RedisStore:
    """Connect to the Redis server that ``url`` names.

    ``?prefix=NAME`` in the query picks the key prefix (``keel:`` by default); every other query parameter
    goes to redis-py.

    Returns:
        The open store.

    Raises:
        ConfigurationError: The URL or prefix cannot be used, or the data was written by a newer keel.
        BackendUnavailable: The server cannot be reached.
    """
    masked = _masked(url)
    keys, redis_url = split_prefix(url)
    store = RedisStore(masked, _client(redis_url, masked), keys, options)
    try:
        await store._connect()
    except BaseException:
        await store.aclose()
        raise
    return store


async def open_backend(url: str, options: StoreOptions) -> RedisBackend:
    """Connect to the Redis server that ``url`` names, for the store and the runtime (see ``open_engine``).

    Returns:
        The open backend: the broker, with this engine's store as its ``store``.

    Raises:
        ConfigurationError: The URL or prefix cannot be used, or the data was written by a newer keel.
        BackendUnavailable: The server cannot be reached.
    """
    # Imported here: backend.py builds on this module.
    from keel.backends.redis.backend import open_redis_backend

    return await open_redis_backend(url, options)


def _client(redis_url: str, masked: str, *, socket_timeout_s: float = SOCKET_TIMEOUT_S, **pool_options: Any) -> Redis:
    path = urlsplit(redis_url).path
    if path not in ("", "/") and not re.fullmatch(r"/\d+", path):
        # redis-py would silently fall back to DB 0, another application's data perhaps.
        raise ConfigurationError(f"the Redis URL {masked} has path {path!r}; it must be a DB index, such as /0")
    try:
        pool = BlockingConnectionPool.from_url(
            redis_url,
            decode_responses=True,
            # RESP2: scripts reply the same on every server version; and with RESP3, redis-py 8 may turn on
            # maintenance notifications, under which its pool skips the closed-socket check on checkout.
            protocol=2,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            socket_timeout=socket_timeout_s,
            # No automatic resend: see the module docstring.
            retry=Retry(NoBackoff(), 0),
            # When every connection is busy a call waits for one, this long at most, rather than failing at once.
            timeout=POOL_WAIT_S,
            **pool_options,
        )
        # redis-py builds connections at first use; build one now, so that an unknown URL option fails here
        # as a ConfigurationError, not as a TypeError from the first command.
        pool.make_connection()  # type: ignore[no-untyped-call]
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"cannot use the Redis URL {masked}: {exc}") from exc
    return Redis.from_pool(pool)


def _unavailable(url: str, operation: str, exc: BaseException) -> BackendUnavailable:
    hint = next((text for kind, text in _HINTS if isinstance(exc, kind)), "")
    if isinstance(exc, RedisConnectionError) and str(exc).startswith("No connection available"):
        # The blocking pool gave up waiting POOL_WAIT_S for a connection; redis-py has no class for it.
        hint = f"every pooled connection stayed busy for {POOL_WAIT_S:g} s; raise ?max_connections= in the URL"
    detail = f"{operation} failed: {type(exc).__name__}: {exc}"
    if operation in _WRITES and isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
        detail += f" (the {operation} may or may not have been applied; {_WRITES[operation]})"
    return BackendUnavailable(url, detail, hint=hint)


def _masked(url: str) -> str:
    """Mask the password in the URL's user part and in a ``?password=`` parameter, which redis-py also reads."""
    masked = mask_password(url)
    parts = urlsplit(masked)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(name == "password" for name, _ in pairs):
        return masked
    query = urlencode([(name, "***" if name == "password" else value) for name, value in pairs], safe="*")
    return urlunsplit(parts._replace(query=query))


@cache
def _script_text(name: str) -> str:
    return resources.files("keel.backends.redis").joinpath("scripts", name).read_text(encoding="utf-8")


def _from_micros(text: str | int) -> datetime:
    # Microseconds since the epoch as an integer: exact, where a float timestamp would round.
    return _EPOCH + timedelta(microseconds=int(text))


def _record_from_fields(key: str, fields: list[str | None]) -> StoredRecord | None:
    version, value_json, written_at, writer = fields
    if version is None:
        return None
    return StoredRecord(key, int(version), value_json, _from_micros(written_at or 0), writer or "")


def _record_from_entry(key: str, entry: str) -> StoredRecord:
    fields: dict[str, str] = json.loads(entry)
    return StoredRecord(key, int(fields["v"]), fields.get("d"), _from_micros(fields["t"]), fields.get("w", ""))


@dataclass(frozen=True, slots=True)
class Persistence:
    """What a Redis server keeps across a restart, as far as it lets a client see."""

    #: Whether every write is appended to the AOF file.
    appendonly: bool
    #: When the AOF file is fsynced (always, everysec, no); None when it could not be read.
    appendfsync: str | None
    #: The RDB snapshot schedule ("" for none); None when it could not be read.
    save: str | None


async def _read_persistence(client: Redis) -> Persistence | None:
    """Read the settings with CONFIG GET; when CONFIG is refused (ACL, renamed), with INFO persistence."""
    try:
        # Two patterns, not one CONFIG GET with three names: that form needs Redis 7.
        settings: dict[Any, Any] = {**await client.config_get("append*"), **await client.config_get("save")}
    except ResponseError:
        return await _persistence_from_info(client)
    return Persistence(settings.get("appendonly") == "yes", settings.get("appendfsync"), settings.get("save"))


async def _persistence_from_info(client: Redis) -> Persistence | None:
    try:
        info = await client.info("persistence")
    except ResponseError:
        return None
    # INFO tells whether the AOF is on, but neither its fsync policy nor the snapshot schedule.
    return Persistence(bool(int(info.get("aof_enabled", 0))), None, None)


def persistence_warning(persistence: Persistence | None) -> str | None:
    """Say what a restart or crash of the server would lose; None when every acknowledged write survives."""
    if persistence is None:
        return (
            "could not read its persistence settings (CONFIG and INFO refused); unless appendonly is yes and "
            "appendfsync always, a restart of the server can lose acknowledged writes"
        )
    if not persistence.appendonly:
        return _without_aof(persistence.save)
    fsync = persistence.appendfsync
    if fsync == "always":
        return None
    if fsync == "everysec":
        return (
            "appendfsync is everysec: a crash of the server's machine or a power loss loses up to about a "
            "second of acknowledged writes"
        )
    if fsync is None:
        return (
            "appendonly is on, but appendfsync could not be read (CONFIG refused); unless it is always, a crash "
            "of the server's machine can lose up to about a second of acknowledged writes"
        )
    return (
        f"appendfsync is {fsync}: a crash of the server's machine or a power loss loses every write the "
        "operating system had not yet flushed, often tens of seconds of acknowledged writes"
    )


def _without_aof(save: str | None) -> str:
    if save == "":
        return (
            "persistence is off (appendonly no, save ''): a restart of the server loses every stored value "
            "and all history"
        )
    if save is None:
        return (
            "appendonly is off: a restart of the server loses every write since the last RDB snapshot, or "
            "every stored value and all history if snapshots are off too"
        )
    return (
        f"appendonly is off: a restart of the server loses every write since the last RDB snapshot "
        f"(save '{save}'), which can be minutes of acknowledged writes and history"
    )
