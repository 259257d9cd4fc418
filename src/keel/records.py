"""What the client reads back: what a claim runs, turn records, dead letters and their outcomes; pure data, no I/O.

A claim runs one of two things, and ``Target`` names either:

- ``WorkflowInstance(workflow, workflow_id)``: the next turn of a workflow instance;
- ``HandlerDelivery(handler, event_id)``: one handler's delivery of one event.

Engines store both as instances: a delivery is the instance ``on/HANDLER`` / ``EVENT_ID`` (``DELIVERY_PREFIX``),
the one message of which is the event for that handler. ``parse_target`` and ``Target.workflow`` /
``Target.workflow_id`` are the one place that encoding is read and written above the engines. Engines never read
it: each instance row stores its ``InstanceKind``, sent with the message that creates it, and engines go by that.

This module imports nothing of keel, so every layer (engines included) may import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datetime import datetime

#: Workflow names starting with this hold handler deliveries: instance ``on/HANDLER`` / ``EVENT_ID`` has one message,
#: the event for that handler, and no state. User workflow names cannot contain ``/``, so the two never collide.
DELIVERY_PREFIX = "on/"


@dataclass(frozen=True, slots=True)
class WorkflowInstance:
    """One instance of a workflow: what a claim of its next turn runs."""

    workflow: str
    workflow_id: str

    def __str__(self) -> str:
        return f"{self.workflow}/{self.workflow_id}"


@dataclass(frozen=True, slots=True)
class HandlerDelivery:
    """One handler's delivery of one event: what a claim of it runs.

    ``workflow`` and ``workflow_id`` are how engines store it: instance ``on/HANDLER`` / ``EVENT_ID``.
    """

    handler: str
    event_id: str

    @property
    def workflow(self) -> str:
        """The pseudo-workflow the engines store this handler's deliveries under: ``on/HANDLER``."""
        return delivery_workflow(self.handler)

    @property
    def workflow_id(self) -> str:
        """The delivery's instance id as stored: the event's id."""
        return self.event_id

    def __str__(self) -> str:
        return f"handler {self.handler} on event {self.event_id}"


#: What a claim runs: a workflow instance's turn, or a handler's delivery of an event.
Target = WorkflowInstance | HandlerDelivery


class InstanceKind(StrEnum):
    """What an instance stored by an engine holds, as its row records it (engines never parse the name).

    Pruning removes a delivery whole once its one message goes, and keeps a workflow instance's row (its fencing
    token, state and history).
    """

    #: A workflow's instance: a turn per message, state, a fencing token that must outlive its messages.
    workflow = "workflow"
    #: A handler's delivery of one event: one message, no state, an id (the event's) never used again.
    delivery = "delivery"


def delivery_workflow(handler: str) -> str:
    """Return the stored name of the pseudo-workflow whose instances are ``handler``'s deliveries: ``on/HANDLER``."""
    return DELIVERY_PREFIX + handler


def handler_of(workflow: str) -> str | None:
    """Return the handler whose deliveries the stored workflow name ``workflow`` holds, or None for a workflow."""
    return workflow.removeprefix(DELIVERY_PREFIX) if workflow.startswith(DELIVERY_PREFIX) else None


def parse_target(workflow: str, workflow_id: str) -> Target:
    """Return what the stored instance ``workflow`` / ``workflow_id`` is: a workflow instance or a delivery."""
    handler = handler_of(workflow)
    return WorkflowInstance(workflow, workflow_id) if handler is None else HandlerDelivery(handler, workflow_id)


class TurnOutcome(StrEnum):
    """How one attempt at a turn (or a delivery) ended, as its turn record says."""

    #: It returned, and what it wrote was committed.
    committed = "committed"
    #: It raised, and will run again after a backoff.
    retry = "retry"
    #: It raised for good: the message is dead-lettered.
    failed = "failed"


class MessageStatus(StrEnum):
    """Where a message (or an event's delivery to one handler) stands."""

    pending = "pending"
    done = "done"
    #: Dead-lettered: its instance (or the delivery) waits for ``keel retry`` or ``keel skip``.
    failed = "failed"
    #: Dead-lettered, then dropped on purpose with ``keel skip``.
    skipped = "skipped"


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """One attempt at a turn, as recorded: who ran it, under which token, from which version to which, how it ended.

    Attributes:
        instance: What ran: a ``WorkflowInstance``, or a ``HandlerDelivery``.
        message_id: The message the attempt ran.
        worker: The worker that ran it, as ``host:pid``.
        attempt: 1 for the message's first run, more for its retries and redeliveries.
        fencing_token: The lease's fencing token.
        version_read: The state version it started from; None for a delivery, which has no state.
        version_written: The state version it committed; None if it did not commit, or for a delivery.
        started_at: When it started (UTC).
        duration_s: How long it ran.
        outcome: How it ended.
        error: The traceback of a failed attempt.
    """

    instance: Target
    message_id: str
    worker: str
    attempt: int
    fencing_token: int
    version_read: int | None
    version_written: int | None
    started_at: datetime
    duration_s: float
    outcome: TurnOutcome
    error: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message whose turn (or delivery) failed for good; it waits until ``retry`` or ``skip``.

    A workflow instance's dead letter pauses the instance: its later messages wait behind it.

    Attributes:
        instance: What failed: a ``WorkflowInstance``, or a ``HandlerDelivery``.
        message_id: The dead message.
        error: The traceback of its last attempt.
        attempts: How many attempts it had.
        failed_at: When it was dead-lettered (UTC).
    """

    instance: Target
    message_id: str
    error: str
    attempts: int
    failed_at: datetime
