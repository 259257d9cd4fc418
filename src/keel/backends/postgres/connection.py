"""The PostgreSQL engine's connection: settings from the URL, the pool, and the one boundary for driver errors.

- A psycopg 3 ``AsyncConnectionPool`` of autocommit connections, shared by the store and the broker; the LISTEN
  connection of the wake transport (``wake.py``) is opened outside it.
- Driver failures become ``BackendUnavailable`` in one place, ``PostgresConnection.driver_errors``, which also bounds
  every call in time. After a failure it has the pool check its idle connections: dead ones are replaced, and the
  pool keeps reconnecting in the background, so the same open backend works again once the server is back.
- ``open`` creates or upgrades the tables first (``migrate.py``), then fills the pool.

URL: ``postgresql://``, ``postgres://`` or ``postgresql+psycopg://``. Everything libpq understands is passed on
(host, port, dbname, ``sslmode``, ``options``, ...). keel's own query parameters are removed first:

- ``pool_min_size`` (default 1) and ``pool_max_size`` (default 10): connections kept open, and allowed.
- ``pool_timeout_s`` (default 30): how long a call waits for a pooled connection. psycopg's pool serves waiters first
  come first served, so a burst of calls queues (backpressure); one that waits this long raises ``BackendOverloaded``
  if a fresh connection to the server succeeds, else ``BackendUnavailable``. While the server is down and the pool
  has no open connection, a call takes this long to fail: lower it to notice outages sooner.
- ``query_timeout_s`` (default 15): how long one statement may run; sent to the server as ``statement_timeout``.

Unless the URL sets them, keel also asks libpq for ``connect_timeout=5``, TCP keepalives and ``tcp_user_timeout``
(a peer that vanished without closing the connection is noticed in about half a minute), and
``application_name=keel``. Table names are unqualified: the URL's ``options=-csearch_path=...`` picks the schema.
"""

from __future__ import annotations

import asyncio
import logging
import math
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from keel.backends._url import mask_password, scheme_of
from keel.backends.postgres.migrate import QUERIES, migrate
from keel.backends.postgres.scripts import prepare
from keel.backends.probe import SharedProbe
from keel.errors import BackendOverloaded, BackendUnavailable, ConfigurationError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from typing import LiteralString

    from psycopg.rows import TupleRow

logger = logging.getLogger(__name__)

#: What the hint of every BackendUnavailable from this engine suggests checking.
UNAVAILABLE_HINT = (
    "check that the PostgreSQL server is running and reachable at the URL's host and port, and that the URL's "
    "database, user and password are right; `psql URL` is a quick test"
)

#: libpq settings keel adds unless the URL sets them. The keepalives and tcp_user_timeout make a connection to a
#: server that vanished without closing it fail in about half a minute, instead of after the OS default of hours.
LIBPQ_DEFAULTS = {
    "connect_timeout": "5",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
    "application_name": "keel",
}

#: Connections a store keeps open, and the most it opens (URL parameters ``pool_min_size``, ``pool_max_size``).
DEFAULT_POOL_MIN_SIZE = 1
DEFAULT_POOL_MAX_SIZE = 10

#: How long a call waits for a pooled connection (URL parameter ``pool_timeout_s``): generous, so bursts queue.
DEFAULT_POOL_TIMEOUT_S = 30.0

#: How long one statement may run, enforced by the server (URL parameter ``query_timeout_s``).
DEFAULT_QUERY_TIMEOUT_S = 15.0

#: A pool gives up one reconnection attempt after this long and starts a fresh one when a call needs it. psycopg's
#: default (5 minutes of doubling delays) could leave the pool asleep for minutes after the server came back.
RECONNECT_WINDOW_S = 10.0

#: Extra time a call is allowed beyond its pool wait and statement timeout before the client gives up on its
#: own: the server's statement_timeout should normally answer first, with a clearer error.
CLIENT_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class PostgresSettings:
    """What a ``postgresql://`` URL asks for, split between libpq and keel."""

    masked_url: str
    conninfo: str
    connect_timeout_s: float
    pool_min_size: int = DEFAULT_POOL_MIN_SIZE
    pool_max_size: int = DEFAULT_POOL_MAX_SIZE
    pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S
    query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S

    @classmethod
    def from_url(cls, url: str) -> PostgresSettings:
        """Read ``url``: keel's parameters go to the settings, the rest (plus keel's defaults) to libpq.

        Raises:
            ConfigurationError: The URL is not a PostgreSQL URL, or a parameter has an unusable value.
        """
        masked = mask_password(url)
        scheme = scheme_of(url)
        if scheme not in {"postgresql", "postgres"} or "://" not in url:
            raise ConfigurationError(f"{masked!r} is not a postgresql:// URL")
        # Drop a driver suffix (postgresql+psycopg://): libpq knows only the plain schemes.
        libpq_url, ours = _split_params(f"{scheme}://{url.split('://', 1)[1]}")
        query_timeout_s = _positive(ours, "query_timeout_s", DEFAULT_QUERY_TIMEOUT_S, masked)
        params = _libpq_params(libpq_url, masked)
        # Ours go first so that a statement_timeout in the URL's own options wins.
        statement_timeout_ms = max(1, round(query_timeout_s * 1000))  # 0 would mean no timeout at all
        params["options"] = f"-c statement_timeout={statement_timeout_ms} {params.get('options', '')}".strip()
        settings = cls(
            masked_url=masked,
            conninfo=make_conninfo("", **params),
            connect_timeout_s=_positive(params, "connect_timeout", 5.0, masked, allow_zero=True),
            pool_min_size=int(_positive(ours, "pool_min_size", DEFAULT_POOL_MIN_SIZE, masked, allow_zero=True)),
            pool_max_size=int(_positive(ours, "pool_max_size", DEFAULT_POOL_MAX_SIZE, masked)),
            pool_timeout_s=_positive(ours, "pool_timeout_s", DEFAULT_POOL_TIMEOUT_S, masked),
            query_timeout_s=query_timeout_s,
        )
        if settings.pool_max_size < settings.pool_min_size:
            raise ConfigurationError(f"pool_max_size must not be below pool_min_size in {masked!r}")
        return settings


#: keel's own URL parameters (see the module docstring); libpq would reject them, so they never reach it.
_KEEL_PARAMS = frozenset({"pool_min_size", "pool_max_size", "pool_timeout_s", "query_timeout_s"})


def _split_params(url: str) -> tuple[str, dict[str, str]]:
    """Remove keel's parameters from ``url``, leaving the others byte for byte as libpq should see them."""
    base, _, query = url.partition("?")
    kept: list[str] = []
    ours: dict[str, str] = {}
    for part in query.split("&") if query else []:
        name, _, value = part.partition("=")
        if unquote(name) in _KEEL_PARAMS:
            ours[unquote(name)] = unquote(value)
        else:
            kept.append(part)
    return (f"{base}?{'&'.join(kept)}" if kept else base), ours


def _positive(given: dict[str, str], name: str, default: float, masked_url: str, *, allow_zero: bool = False) -> float:
    """Return URL parameter ``name`` as a number, or ``default`` when the URL does not set it."""
    if name not in given:
        return default
    try:
        number = float(given[name])
    except ValueError:
        number = math.nan
    integral = isinstance(default, int)
    usable = math.isfinite(number) and (number > 0 or (number == 0 and allow_zero))
    if not usable or (integral and not number.is_integer()):
        kind = ("non-negative " if allow_zero else "positive ") + ("whole number" if integral else "number of seconds")
        raise ConfigurationError(f"{name}={given[name]!r} in {masked_url!r}: must be a {kind}")
    return number


def _libpq_params(url: str, masked_url: str) -> dict[str, str]:
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(f"cannot use PostgreSQL URL {masked_url!r}: {one_line(exc)}") from exc
    return {**LIBPQ_DEFAULTS, **{key: str(value) for key, value in params.items()}}


class PostgresConnection:
    """The pool of one PostgreSQL URL, shared by its store and broker, and the boundary its calls cross."""

    def __init__(self, settings: PostgresSettings) -> None:
        self.url = settings.masked_url
        self.settings = settings
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]] = AsyncConnectionPool(
            settings.conninfo,
            kwargs={"autocommit": True},
            # The broker's scripts execute statements prepared once per connection (scripts.py).
            configure=prepare,
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            timeout=settings.pool_timeout_s,
            reconnect_timeout=RECONNECT_WINDOW_S,
            name="keel",
            open=False,
        )
        self._deadline_s = settings.pool_timeout_s + settings.query_timeout_s + CLIENT_GRACE_S
        self._pool_check: asyncio.Task[None] | None = None
        self._probe = SharedProbe(self._connect_once)
        self._closed = False

    async def open(self) -> None:
        """Create or upgrade the tables, then fill the pool.

        Raises:
            BackendUnavailable: The server cannot be reached.
            ConfigurationError: The schema cannot be created or is newer than this code.
        """
        async with self.driver_errors():
            await migrate(self.settings.conninfo, self.settings.masked_url)
            await self._pool.open(wait=True, timeout=self.settings.pool_timeout_s)

    async def aclose(self) -> None:
        """Close the pool's connections. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._pool_check is not None:
            # Let a running check finish so it returns its connections, but not for long: leave nothing running.
            await asyncio.wait({self._pool_check}, timeout=self.settings.connect_timeout_s or 1.0)
            self._pool_check.cancel()
            await asyncio.wait({self._pool_check})
        await self._probe.aclose()
        await self._pool.close()

    @property
    def pool(self) -> AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]]:
        """The pool, for engine tests and diagnostics."""
        return self._pool

    async def current_schema(self) -> str:
        """The schema the URL's search_path puts the tables in."""
        async with self.connection() as conn:
            row = await fetch_one(conn, QUERIES["current_schema"], {})
        # The migration created the tables in this schema, so search_path names one and the row is there.
        assert row is not None
        return str(row[0])

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[TupleRow]]:
        """Lend a pooled connection for one call."""
        async with self.driver_errors(), self._pool.connection() as conn:
            yield conn

    @asynccontextmanager
    async def driver_errors(self) -> AsyncIterator[None]:
        """The one place where driver failures become keel's errors, and where calls get their deadline.

        Raises:
            BackendOverloaded: No pooled connection came free within ``pool_timeout_s``, though the server answers.
            BackendUnavailable: The server cannot be reached, or stopped answering.
        """
        try:
            async with asyncio.timeout(self._deadline_s):
                yield
        except PoolTimeout as exc:
            raise await self._starved() from exc
        except PoolClosed as exc:
            raise BackendUnavailable(
                self.url, "the store is closed", hint="open a new one with keel.open_store()"
            ) from exc
        except psycopg.OperationalError as exc:
            self._schedule_pool_check()
            raise BackendUnavailable(self.url, one_line(exc), hint=UNAVAILABLE_HINT) from exc
        except TimeoutError as exc:
            self._schedule_pool_check()
            detail = f"no answer within {self._deadline_s:g} s"
            raise BackendUnavailable(self.url, detail, hint=UNAVAILABLE_HINT) from exc

    async def _starved(self) -> BackendOverloaded | BackendUnavailable:
        """Explain a pool timeout: the server is unreachable, or every connection stayed busy (load)."""
        # Counted before the probe, which takes a while. psycopg's count holds this call, and may hold others that
        # gave up just before it: they leave its queue when the next connection comes back.
        queued = max(1, self._pool.get_stats().get("requests_waiting", 0))
        failure = await self._probe.failure()
        if failure is not None:
            detail = f"no connection within {self.settings.pool_timeout_s:g} s: {failure}"
            return BackendUnavailable(self.url, detail, hint=UNAVAILABLE_HINT)
        hint = (
            "raise pool_max_size= or pool_timeout_s= in the URL, or make fewer calls at once (client.send_many sends "
            "a batch in one call); a call that holds its connection long makes the others wait too"
        )
        return BackendOverloaded(
            self.url,
            waited_s=self.settings.pool_timeout_s,
            queued=queued,
            connections=self.settings.pool_max_size,
            hint=hint,
        )

    async def _connect_once(self) -> str | None:
        """None if a connection of its own, outside the pool, reaches the server; else why it failed."""
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s + 1):
                probe = await psycopg.AsyncConnection.connect(self.settings.conninfo)
        except (psycopg.OperationalError, TimeoutError) as exc:
            return one_line(exc)
        await probe.close()
        return None

    def _schedule_pool_check(self) -> None:
        # Every idle connection died with the server; without a check each would fail one more call after it is
        # back. The check replaces them, and the pool reconnects in the background until the server answers.
        if self._closed or not self._pool_open or (self._pool_check is not None and not self._pool_check.done()):
            return
        self._pool_check = asyncio.create_task(self._check_pool(), name="keel-postgres-pool-check")

    @property
    def _pool_open(self) -> bool:
        return not self._pool.closed

    async def _check_pool(self) -> None:
        try:
            await self._pool.check()
        except psycopg.Error as exc:
            # Closed meanwhile, or the server is still down: the pool's own reconnection carries on either way.
            logger.debug("checking the connections to %s failed: %s", self.url, exc)


async def fetch_one(
    conn: psycopg.AsyncConnection[TupleRow], query: LiteralString, params: dict[str, Any]
) -> tuple[Any, ...] | None:
    """Run ``query`` and return its first row, or None."""
    cursor = await conn.execute(query, params)
    return await cursor.fetchone()


def one_line(exc: BaseException) -> str:
    """Join the lines of a libpq message ("...failed: Connection refused / Is the server running...?")."""
    return " ".join(str(exc).split()) or type(exc).__name__
