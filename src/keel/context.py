"""What a workflow function sees during one turn: a private copy of the state, and who and where it runs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from pydantic import BaseModel

from keel.errors import StepError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, MutableMapping

    from keel.steps import StepRunner

StateT = TypeVar("StateT", bound=BaseModel)
P = ParamSpec("P")
T = TypeVar("T")


class TurnContext(Generic[StateT]):
    """One turn of one workflow instance.

    Attributes:
        state: A private copy of the instance's state; change it, and it is committed when the function returns
            (the state model's defaults, at version 0, on the instance's first turn).
        workflow: The workflow's name.
        workflow_id: The instance's id.
        message_id: The id of the message this turn runs.
        fencing_token: Grows with every lease on this instance; hand it to outside systems so they can refuse
            the writes of a worker that lost its lease (a paused "zombie").
        attempt: 1 on the message's first run, more when an earlier run died or lost its lease.
        state_version: The version of the state this turn started from.
        worker: The worker running the turn, as ``host:pid``.
        logger: A logger whose records carry the turn's workflow, id, worker, state version, token and attempt.
    """

    def __init__(
        self,
        *,
        state: StateT,
        workflow: str,
        workflow_id: str,
        message_id: str,
        fencing_token: int,
        attempt: int,
        state_version: int,
        worker: str,
    ) -> None:
        self.state = state
        self.workflow = workflow
        self.workflow_id = workflow_id
        self.message_id = message_id
        self.fencing_token = fencing_token
        self.attempt = attempt
        self.state_version = state_version
        self.worker = worker
        self.logger = TurnLogger(logging.getLogger("keel.turn"), self.log_fields())
        self._steps: StepRunner | None = None

    @overload
    async def step(self, name: str, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T: ...
    @overload
    async def step(self, name: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    async def step(self, name: str, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Run a side effect once per message: ``fn(*args, **kwargs)``, recorded before the turn goes on.

        When the turn runs again (after a crash, a lost lease or a retry) the recorded result is returned and
        ``fn`` is not called. Either way the result has been through JSON and comes back typed by ``fn``'s
        return annotation. A sync ``fn`` runs in a thread, so it cannot stall the lease's heartbeat.

        Args:
            name: Unique within the turn (1-255 printable characters); it names the record.
            fn: The side effect, sync or async.
            *args: Positional arguments for ``fn``.
            **kwargs: Keyword arguments for ``fn``.

        Returns:
            ``fn``'s result, or the one recorded for this message.

        Raises:
            StepError: ``name`` was already used in this turn.
            StepTimeoutError: ``fn`` ran past the step timeout (a failed attempt of the turn).
            NotSerializableError, PayloadTooLargeError: The result is not JSON, or too large.
            LeaseLostError: The lease was lost: nothing is recorded, and the turn cannot commit.
        """
        if self._steps is None:
            raise StepError("this TurnContext runs no steps: steps run inside a worker's turn (or keel.testing)")
        return await self._steps.run(name, fn, args, kwargs)

    def log_fields(self) -> dict[str, Any]:
        """The fields every log record about this turn carries (G9)."""
        return {
            "workflow": self.workflow,
            "workflow_id": self.workflow_id,
            "worker": self.worker,
            "state_version": self.state_version,
            "fencing_token": self.fencing_token,
            "attempt": self.attempt,
            "message_id": self.message_id,
        }

    def __repr__(self) -> str:
        return f"<TurnContext {self.workflow}/{self.workflow_id} v{self.state_version} token={self.fencing_token}>"


class TurnLogger(logging.LoggerAdapter[logging.Logger]):
    """Adds a turn's fields to every record, merged with any ``extra=`` the caller gives."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        """Merge the turn's fields into the record's ``extra``."""
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs
