"""The Redis engine's connection: the client and its pool from the URL, the checks at connect, the error boundary.

- URL: ``redis://host:port/db`` or ``rediss://`` (TLS); ``?prefix=NAME`` picks the key prefix (``keel:`` by
  default, ``keys.py``); ``?pool_timeout_s=`` (default 30) how long a call waits for a pooled connection;
  ``?max_connections=`` (default 50) the pool's size; every other query parameter goes to redis-py.
- Errors: every redis-py error crosses into keel at one boundary, ``RedisConnection.boundary``, and becomes
  ``BackendUnavailable`` with the password masked. Socket timeouts bound every wait.
- Load: calls queue for the pool's connections first come first served (``keel.backends.slots``), because
  redis-py's ``BlockingConnectionPool`` is not fair: a woken waiter must retake the pool's lock and goes to the
  back of the line when a newer call took the connection first. With many callers each sending and then polling
  ``wait()`` through one client, each returned its connection and took it straight back, so some waiters lost
  every race and failed after the pool's 5 s timeout, as if the server were down, while it sat idle (150 such
  callers on 50 connections: a third of them within 6 s). Now a freed connection goes to the oldest waiter. A call
  that waits ``pool_timeout_s`` for one raises ``BackendOverloaded`` when the server still answers a fresh
  connection's PING, and ``BackendUnavailable`` when it does not.
- Reconnects: redis-py's pool drops a connection that failed, and checks a pooled connection for a closed
  socket before lending it out, reconnecting if needed; so once the server is back, the next call on the
  same open backend works. redis-py's automatic retry is switched off (it would resend a command after a
  timeout): a compare-and-swap whose reply was lost may have been applied, and resending it would report a
  stale write for our own write, which ``update()`` would then apply a second time. Reads are not retried
  either, so every call fails within the socket timeouts rather than after several of them.
- Schema: ``keel:schema`` records the layout version (``scripts/schema.lua`` raises it, never lowers it); data
  at a newer version than this code is refused. Data at an older version is upgraded in place first
  (``migrate.py``), and only then is the new version recorded.
- Durability: at connect the engine reads the server's persistence settings and logs one warning when a
  restart or crash of the server would lose acknowledged writes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
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
from keel.backends.probe import SharedProbe
from keel.backends.redis.keys import split_prefix
from keel.backends.redis.lua import script_text
from keel.backends.redis.migrate import SCHEMA_COMPONENT, STORE_SCHEMA_VERSION, upgrade_layout
from keel.backends.slots import FairSlots, SlotTimeout
from keel.errors import BackendOverloaded, BackendUnavailable, ConfigurationError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from keel.backends.redis.keys import RedisKeys

logger = logging.getLogger(__name__)

#: Seconds to wait for a TCP connection, and for each reply, before raising ``BackendUnavailable``.
SOCKET_TIMEOUT_S = 5.0

#: Seconds a call waits for a free pooled connection when all are busy, by default (``?pool_timeout_s=``): generous,
#: so that a burst of calls queues (backpressure) rather than fails.
DEFAULT_POOL_TIMEOUT_S = 30.0

#: Connections of a pool, by default (``?max_connections=``).
DEFAULT_MAX_CONNECTIONS = 50

#: What a BackendOverloaded from this engine suggests.
OVERLOADED_HINT = (
    "raise ?max_connections= or ?pool_timeout_s= in the URL, or make fewer calls at once "
    "(client.send_many sends a batch in one call)"
)

#: What the warning about persistence tells the operator to do.
DURABILITY_FIX = (
    "To make every acknowledged write survive a restart, set appendonly yes and appendfsync always "
    "(in redis.conf, or CONFIG SET appendonly yes, CONFIG SET appendfsync always, then CONFIG REWRITE)"
)

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


class RedisConnection:
    """The client of one Redis URL (password masked in ``url``), its key layout, and the boundary its calls cross.

    Open it with ``open_connection``, which connects, checks persistence and records the schema.
    """

    def __init__(self, url: str, client: Redis, keys: RedisKeys) -> None:
        self.url = url
        self.client = client
        self.keys = keys
        self._schema_script = client.register_script(script_text("schema.lua"))
        self._closed = False
        pool = client.connection_pool
        # One slot per connection: every call waits its turn here, fairly, and so never in redis-py's pool.
        self._slots = FairSlots(pool.max_connections, getattr(pool, "timeout", None) or DEFAULT_POOL_TIMEOUT_S)
        self._probe = SharedProbe(self._ping_once)

    async def aclose(self) -> None:
        """Close the connection pool. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self._probe.aclose()
        await self.client.aclose()

    async def connect(self) -> None:
        """Check the server answers, warn if it is not durable, and record (after upgrading) the schema."""
        async with self.boundary("connect"):
            await self.client.ping()
            persistence = await _read_persistence(self.client)
            found = await self._record_schema()
        warning = persistence_warning(persistence)
        if warning is not None:
            logger.warning("Redis at %s: %s. %s.", self.url, warning, DURABILITY_FIX)
        if not found.isdigit() or int(found) > STORE_SCHEMA_VERSION:
            raise ConfigurationError(
                f"the keel data at {self.url} (prefix {self.keys.prefix!r}) has store schema {found!r}, "
                f"newer than this keel's {STORE_SCHEMA_VERSION}: upgrade keel, or use another prefix or DB"
            )

    async def _record_schema(self) -> str:
        """Upgrade older data, then raise the recorded schema version to ours unless it is newer; return it."""
        found = await self.client.hget(self.keys.schema, SCHEMA_COMPONENT)
        if isinstance(found, str) and found.isdigit() and int(found) < STORE_SCHEMA_VERSION:
            await upgrade_layout(self.client, self.keys, int(found), url=self.url)
        before, now = await self._schema_script(
            keys=[self.keys.schema], args=[SCHEMA_COMPONENT, str(STORE_SCHEMA_VERSION)]
        )
        if before != now and not before:
            logger.info("keel data created at %s (prefix %r), schema version %s", self.url, self.keys.prefix, now)
        elif before != now:
            logger.info(
                "keel data at %s (prefix %r) upgraded from schema %s to %s", self.url, self.keys.prefix, before, now
            )
        return str(now)

    @asynccontextmanager
    async def boundary(self, operation: str) -> AsyncIterator[None]:
        """Wait for a pooled connection's turn, then run the call within ``errors``.

        Raises:
            BackendOverloaded: No connection came free within ``pool_timeout_s``, though the server answers.
            BackendUnavailable: As ``errors``; or no connection came free and the server does not answer.
        """
        self._refuse_if_closed()
        try:
            async with self._slots.slot(), self.errors(operation):
                yield
        except SlotTimeout as waited:
            raise await self._starved(waited) from None

    @asynccontextmanager
    async def errors(self, operation: str) -> AsyncIterator[None]:
        """The one place where redis-py's errors become keel's; ``operation`` names the call in the error.

        Used alone by calls on a pool of their own (the blocking reads of waits), which need no turn in this one.
        """
        self._refuse_if_closed()
        try:
            yield
        except (RedisError, OSError) as exc:
            raise _unavailable(self.url, operation, exc) from exc

    def _refuse_if_closed(self) -> None:
        if self._closed:
            # redis-py would quietly open new connections that nothing closes any more.
            raise BackendUnavailable(self.url, "the store is closed")

    async def _starved(self, waited: SlotTimeout) -> BackendOverloaded | BackendUnavailable:
        """Tell load from an outage: does the server answer a PING on a connection of its own, outside the pool?"""
        failure = await self._probe.failure()
        if failure is not None:
            detail = f"no pooled connection within {waited.waited_s:g} s, and a new one fails: {failure}"
            return BackendUnavailable(self.url, detail, hint="is redis-server running, and reachable at this address?")
        return BackendOverloaded(
            self.url, waited_s=waited.waited_s, queued=waited.queued, connections=waited.size, hint=OVERLOADED_HINT
        )

    async def _ping_once(self) -> str | None:
        probe = self.client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            async with asyncio.timeout(SOCKET_TIMEOUT_S):
                await probe.connect()
                await probe.send_command("PING")
                await probe.read_response()
        except (RedisError, OSError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            await probe.disconnect()
        return None


async def open_connection(url: str) -> RedisConnection:
    """Connect to the Redis server that ``url`` names, check it and record the schema.

    Raises:
        ConfigurationError: The URL or prefix cannot be used, or the data was written by a newer keel.
        BackendUnavailable: The server cannot be reached.
    """
    masked = masked_url(url)
    keys, redis_url = split_prefix(url)
    connection = RedisConnection(masked, make_client(redis_url, masked), keys)
    try:
        await connection.connect()
    except BaseException:
        await connection.aclose()
        raise
    return connection


def make_client(
    redis_url: str, masked: str, *, socket_timeout_s: float = SOCKET_TIMEOUT_S, **pool_options: Any
) -> Redis:
    """A client on a pool of its own for ``redis_url`` (``masked`` names it in errors).

    Raises:
        ConfigurationError: The URL cannot be used.
    """
    path = urlsplit(redis_url).path
    if path not in ("", "/") and not re.fullmatch(r"/\d+", path):
        # redis-py would silently fall back to DB 0, another application's data perhaps.
        raise ConfigurationError(f"the Redis URL {masked} has path {path!r}; it must be a DB index, such as /0")
    redis_url, pool_timeout_s = split_pool_timeout(redis_url, masked)
    pool_options.setdefault("max_connections", DEFAULT_MAX_CONNECTIONS)
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
            # Calls wait their turn in RedisConnection's fair queue, bounded by this; the pool's own wait never comes
            # into play then, and its timeout is only a backstop.
            timeout=pool_timeout_s,
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
    detail = f"{operation} failed: {type(exc).__name__}: {exc}"
    if operation in _WRITES and isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
        detail += f" (the {operation} may or may not have been applied; {_WRITES[operation]})"
    return BackendUnavailable(url, detail, hint=hint)


def split_pool_timeout(redis_url: str, masked: str) -> tuple[str, float]:
    """Take ``?pool_timeout_s=`` out of the URL, which redis-py does not know: the URL without it, and its value.

    Raises:
        ConfigurationError: The value is not a positive number of seconds.
    """
    parts = urlsplit(redis_url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    given = [value for name, value in pairs if name == "pool_timeout_s"]
    if not given:
        return redis_url, DEFAULT_POOL_TIMEOUT_S
    try:
        seconds = float(given[-1])
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigurationError(f"pool_timeout_s={given[-1]!r} in {masked}: must be a positive number of seconds")
    rest = urlencode([(name, value) for name, value in pairs if name != "pool_timeout_s"])
    return urlunsplit(parts._replace(query=rest)), seconds


def masked_url(url: str) -> str:
    """Mask the password in the URL's user part and in a ``?password=`` parameter, which redis-py also reads."""
    masked = mask_password(url)
    parts = urlsplit(masked)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(name == "password" for name, _ in pairs):
        return masked
    query = urlencode([(name, "***" if name == "password" else value) for name, value in pairs], safe="*")
    return urlunsplit(parts._replace(query=query))


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
