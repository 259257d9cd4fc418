"""A backend composed of an engine's store and broker over one connection: what every ``open_backend`` returns.

The broker's roles are offered flat (``backend.send(...)``, not ``backend.broker.send(...)``), so that callers
depend on the role protocols of ``base`` and never on the composition; each method hands the call to the broker
unchanged, so each one's contract is the role's (``base.Sender``, ``Claimer``, ``Reader``, ``Operator``,
``Pruner``). ``store`` and ``broker`` stay reachable for engine tests and diagnostics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from keel.backends.base import Broker, StoreEngine

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence
    from datetime import datetime

    from keel.backends.base import (
        Claim,
        DeadLetter,
        EventRow,
        InstanceRef,
        MessageInfo,
        NewEvent,
        NewMessage,
        Pruned,
        StepRecord,
        StoredRecord,
        TurnCommit,
        TurnFailure,
        TurnRecordRow,
    )
    from keel.backends.ends import EndWaiters


class EngineBroker(Broker, Protocol):
    """An engine's broker: the roles, plus closing what is its own (its wake transports)."""

    #: The waits for messages to end (``wait_for_end``), for engine tests and diagnostics.
    ends: EndWaiters

    async def aclose(self) -> None:
        """Release what the broker holds of its own. Safe to call twice."""
        ...


StoreT = TypeVar("StoreT", bound=StoreEngine)
BrokerT = TypeVar("BrokerT", bound=EngineBroker)


class ComposedBackend(Generic[StoreT, BrokerT]):
    """The store and the broker of one engine, sharing its connection; closing it closes both.

    Args:
        store: The engine's store; it owns the connection, and closing it closes the connection.
        broker: The engine's broker over the same connection.
    """

    def __init__(self, store: StoreT, broker: BrokerT) -> None:
        self._store = store
        self.broker = broker

    @property
    def url(self) -> str:
        """The URL the backend was opened with, password masked."""
        return self._store.url

    @property
    def store(self) -> StoreT:
        """The versioned store, on the same connection as the broker."""
        return self._store

    async def aclose(self) -> None:
        """Close the broker's own resources, then the store and the connection. Safe to call twice."""
        try:
            await self.broker.aclose()
        finally:
            await self._store.aclose()

    async def send(self, message: NewMessage, /) -> str:
        """See ``base.Sender.send``."""
        return await self.broker.send(message)

    async def send_many(self, messages: Sequence[NewMessage], /) -> list[str]:
        """See ``base.Sender.send_many``."""
        return await self.broker.send_many(messages)

    async def publish(self, event: NewEvent, /) -> str:
        """See ``base.Sender.publish``."""
        return await self.broker.publish(event)

    async def claim(
        self, app: str, workflows: Collection[str], /, *, worker: str, lease_s: float, limit: int
    ) -> list[Claim]:
        """See ``base.Claimer.claim``."""
        return await self.broker.claim(app, workflows, worker=worker, lease_s=lease_s, limit=limit)

    async def wait_for_work(self, app: str, /, *, timeout_s: float) -> None:
        """See ``base.Claimer.wait_for_work``."""
        await self.broker.wait_for_work(app, timeout_s=timeout_s)

    async def renew(self, claims: Sequence[Claim], /, *, lease_s: float) -> list[bool]:
        """See ``base.Claimer.renew``."""
        return await self.broker.renew(claims, lease_s=lease_s)

    async def release(self, claim: Claim, /) -> None:
        """See ``base.Claimer.release``."""
        await self.broker.release(claim)

    async def record_step(self, step: StepRecord, /) -> None:
        """See ``base.Claimer.record_step``."""
        await self.broker.record_step(step)

    async def commit_turn(self, commit: TurnCommit, /) -> int:
        """See ``base.Claimer.commit_turn``."""
        return await self.broker.commit_turn(commit)

    async def retry_turn(self, failure: TurnFailure, /, *, delay_s: float) -> None:
        """See ``base.Claimer.retry_turn``."""
        await self.broker.retry_turn(failure, delay_s=delay_s)

    async def fail_turn(self, failure: TurnFailure, /) -> None:
        """See ``base.Claimer.fail_turn``."""
        await self.broker.fail_turn(failure)

    async def message(self, app: str, message_id: str, /) -> MessageInfo | None:
        """See ``base.Reader.message``."""
        return await self.broker.message(app, message_id)

    async def wait_for_end(self, app: str, message_id: str, /, *, timeout_s: float) -> MessageInfo | None:
        """See ``base.Reader.wait_for_end``."""
        return await self.broker.wait_for_end(app, message_id, timeout_s=timeout_s)

    async def state(self, instance: InstanceRef, /) -> StoredRecord | None:
        """See ``base.Reader.state``."""
        return await self.broker.state(instance)

    async def turns(self, instance: InstanceRef, /, *, limit: int) -> list[TurnRecordRow]:
        """See ``base.Reader.turns``."""
        return await self.broker.turns(instance, limit=limit)

    async def events(self, app: str, /, *, limit: int) -> list[EventRow]:
        """See ``base.Reader.events``."""
        return await self.broker.events(app, limit=limit)

    async def dead_letters(self, app: str, /, *, limit: int) -> list[DeadLetter]:
        """See ``base.Reader.dead_letters``."""
        return await self.broker.dead_letters(app, limit=limit)

    async def resolve_dead_letter(self, instance: InstanceRef, /, *, skip: bool) -> str | None:
        """See ``base.Operator.resolve_dead_letter``."""
        return await self.broker.resolve_dead_letter(instance, skip=skip)

    async def delete_instance(self, instance: InstanceRef, /) -> bool:
        """See ``base.Operator.delete_instance``."""
        return await self.broker.delete_instance(instance)

    async def prune(self, app: str, /, *, finished_before: datetime, keys_before: datetime) -> Pruned:
        """See ``base.Pruner.prune``."""
        return await self.broker.prune(app, finished_before=finished_before, keys_before=keys_before)
