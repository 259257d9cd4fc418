"""How long finished records are kept, and the pruning a worker does in the background."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from keel.errors import BackendOverloaded, BackendUnavailable

if TYPE_CHECKING:
    from keel.backends.base import Pruner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retention:
    """What is kept of finished work; nothing undelivered or dead-lettered is ever pruned.

    Attributes:
        finished_s: Completed (or skipped) messages and turn records are pruned this long after they finished
            (1 day), and events this long after they were published; a handler's finished delivery goes whole.
            The instance's state and its state history are not touched.
        idempotency_s: A message or event sent with an idempotency key is kept at least this long (7 days)
            after it was sent, so the key keeps deduplicating; after that, the same key sends a new one.
        interval_s: How often each worker prunes (10 minutes); pruning is idempotent, so several workers
            doing it is harmless.

    Raises:
        ValueError: A duration is not positive.
    """

    finished_s: float = 24 * 3600.0
    idempotency_s: float = 7 * 24 * 3600.0
    interval_s: float = 600.0

    def __post_init__(self) -> None:
        for name in ("finished_s", "idempotency_s", "interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Retention.{name} must be a positive number of seconds")


#: The retention used when the app gives none.
DEFAULT_RETENTION = Retention()


async def prune_once(backend: Pruner, app: str, retention: Retention) -> None:
    """Prune ``app``'s finished records once, logging what went."""
    now = datetime.now(UTC)
    pruned = await backend.prune(
        app,
        finished_before=now - timedelta(seconds=retention.finished_s),
        keys_before=now - timedelta(seconds=retention.idempotency_s),
    )
    if pruned.messages or pruned.turns or pruned.events:
        logger.info(
            "pruned %d finished messages (handler deliveries included), %d turn records and %d events",
            pruned.messages,
            pruned.turns,
            pruned.events,
        )


async def prune_forever(backend: Pruner, app: str, retention: Retention, worker: str) -> None:
    """Prune every ``retention.interval_s`` (workers started together spread out) until cancelled."""
    await asyncio.sleep(random.uniform(0, retention.interval_s / 10))
    while True:
        try:
            await prune_once(backend, app, retention)
        except BackendOverloaded as exc:
            # Load: the next round, an interval later, goes on from where this one stopped.
            logger.warning("pruning put off, the backend is overloaded: %s", exc, extra={"worker": worker})
        except BackendUnavailable as exc:
            logger.error("pruning failed: %s", exc, extra={"worker": worker})
        await asyncio.sleep(retention.interval_s)
