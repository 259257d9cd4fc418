"""The whole PostgreSQL backend: the store, the broker over the store's pool, and the listener that wakes workers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from keel.backends.postgres.broker import PostgresBroker
from keel.backends.postgres.store import QUERIES, PostgresSettings, PostgresStore, _fetch_one
from keel.backends.postgres.wake import PostgresListener
from keel.backends.wake import WakeGate

if TYPE_CHECKING:
    from collections.abc import Collection

    from keel.backends.base import Claim, StoreEngine, StoreOptions


class PostgresBackend(PostgresBroker):
    """The store and broker of one PostgreSQL schema, sharing one pool; plus one LISTEN connection, opened lazily."""

    def __init__(self, store: PostgresStore, schema: str) -> None:
        super().__init__(store, schema)
        self.url = store.url
        # Typed as the protocol says (an attribute's type must match it exactly); ``_store`` is the same object.
        self.store: StoreEngine = store
        self._gate = WakeGate(store.url)
        self._listener = PostgresListener(store, schema, self._gate)

    async def claim(
        self, app: str, workflows: Collection[str], /, *, worker: str, lease_s: float, limit: int
    ) -> list[Claim]:
        """Lease up to ``limit`` claimable instances of ``app`` in ``workflows``, earliest visible message first.

        The gate notes the workflows and the moment: the next ``wait_for_work`` for ``app`` wakes for them only,
        and at once if one was sent meanwhile.
        """
        self._gate.claiming(app, workflows)
        return await super().claim(app, workflows, worker=worker, lease_s=lease_s, limit=limit)

    async def wait_for_work(self, app: str, /, *, timeout_s: float) -> None:
        """Return when a workflow of ``app`` this backend claims may have work, or after ``timeout_s``.

        Raises:
            BackendUnavailable: The listener connection cannot be opened, or the backend is closed.
        """
        await self._gate.wait(app, timeout_s=timeout_s, listen=lambda: self._listener.watch(app))

    async def aclose(self) -> None:
        """Close the listener connection and the pool. Safe to call twice."""
        self._gate.close()
        try:
            await self._listener.aclose()
        finally:
            await self._store.aclose()


async def open_backend(url: str, options: StoreOptions) -> PostgresBackend:
    """Open the PostgreSQL backend that ``url`` names, creating or upgrading its tables if needed.

    Raises:
        ConfigurationError: The URL or a keel parameter in it is unusable, or the tables cannot be created.
        BackendUnavailable: The server cannot be reached.
    """
    store = PostgresStore(PostgresSettings.from_url(url), options)
    try:
        await store.open()
        async with store._connection() as conn:
            row = await _fetch_one(conn, QUERIES["current_schema"], {})
    except BaseException:
        await store.aclose()
        raise
    # The migration created the tables in this schema, so search_path names one and the row is there.
    assert row is not None
    return PostgresBackend(store, str(row[0]))
