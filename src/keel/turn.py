"""One turn, start to finish: load the state, run the workflow function, then commit, retry or dead-letter.

A handler's delivery of an event runs here too, as a turn without state: decode the event, run the handler, and
commit its acknowledgement with what it sent and published, or retry or dead-letter it the same way.

Nothing fails silently here. The state is loaded (and upgraded with the workflow's ``migrate`` when it no
longer fits its model) and run on a private copy under the workflow's timeout; its steps are recorded as they
finish. A turn that returns commits atomically; one that raises is retried after a jittered backoff on the
state as last committed, or dead-lettered with its traceback (which pauses its instance) when retrying cannot
help or its attempts have run out. Whatever happens is logged with the turn's workflow, id, worker, state
version, fencing token and attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import traceback
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from keel.app import HandlerSpec
from keel.backends.base import TurnCommit, TurnFailure
from keel.context import HandlerContext, TurnContext
from keel.errors import (
    BackendOverloaded,
    BackendUnavailable,
    LeaseLostError,
    PayloadValidationError,
    TurnTimeoutError,
)
from keel.events import Envelope, handler_idempotency_key
from keel.load import LoadNotice
from keel.outbox import Outbox
from keel.payload import coerce, decode, encode
from keel.records import HandlerDelivery, parse_target
from keel.retry import retry_delay_s
from keel.steps import StepRunner

if TYPE_CHECKING:
    from collections.abc import Awaitable, Iterator

    from keel.app import App, WorkflowSpec
    from keel.backends.base import Claim, Claimer
    from keel.records import Target

    Job = WorkflowSpec | HandlerSpec

logger = logging.getLogger("keel.worker")


class TurnRunner:
    """Runs claimed turns of one app for one worker."""

    def __init__(
        self, app: App, backend: Claimer, *, worker: str, max_state_bytes: int, load: LoadNotice | None = None
    ) -> None:
        self.app = app
        self.backend = backend
        self.worker = worker
        self.max_state_bytes = max_state_bytes
        #: Where an overloaded backend is reported: once per episode, shared with the worker's other calls.
        self.load = load or LoadNotice(logger, worker)
        #: Message ids whose outcome (commit, retry, dead letter) is being written: their runs are over, so a
        #: heartbeat that finds their lease already released must not call that a lost lease.
        self.settling: set[str] = set()

    async def run(self, claim: Claim) -> None:
        """Run ``claim``'s turn (or handler delivery) and record how it ended; never raises but for cancellation."""
        job = self.app.job(target_of(claim))
        extra = log_fields(claim, self.worker)
        started_at, started = datetime.now(UTC), time.monotonic()
        if claim.attempt > job.retry.max_attempts:
            # Earlier attempts never reported back: their workers died or lost the lease mid-run.
            error = (
                f"gave up at attempt {claim.attempt} of {job.retry.max_attempts}: the earlier attempts did not "
                "finish (their workers died or lost their lease mid-run)"
            )
            with self._settling(claim):
                await self._dead_letter(claim, error, started_at, 0.0)
            return
        logger.debug("%s started", _noun(claim), extra=extra)
        outbox = Outbox(self.app, claim.instance, claim.message_id, max_bytes=self.max_state_bytes)
        try:
            if isinstance(job, HandlerSpec):
                state_json = await self._execute_handler(job, claim, outbox)
            else:
                state_json = await self._execute(job, claim, outbox)
        except asyncio.CancelledError:
            logger.warning("%s cancelled before it could commit", _noun(claim), extra=extra)
            raise
        except LeaseLostError as exc:
            logger.warning("%s stopped, its lease is lost: %s", _noun(claim), exc.reason, extra=extra)
            return
        except Exception as exc:  # noqa: BLE001 - every failure of user code is recorded, never swallowed
            with self._settling(claim):
                await self._failed(job, claim, exc, started_at, time.monotonic() - started)
            return
        duration_s = time.monotonic() - started
        with self._settling(claim):
            await self._commit(
                TurnCommit(claim, state_json, self.worker, started_at, duration_s, outbox.sends, outbox.events)
            )

    @contextlib.contextmanager
    def _settling(self, claim: Claim) -> Iterator[None]:
        self.settling.add(claim.message_id)
        try:
            yield
        finally:
            self.settling.discard(claim.message_id)

    async def _execute(self, spec: WorkflowSpec, claim: Claim, outbox: Outbox) -> str:
        """Run the workflow function on a private copy of the state; return the new state as JSON."""
        where = f"{claim.instance.workflow}/{claim.instance.workflow_id}"
        state = self._load_state(spec, claim, where)
        message = decode(claim.payload_json, spec.message, what=f"message {claim.message_id} to {where}")
        ctx: TurnContext[Any] = TurnContext(
            state=state,
            workflow=claim.instance.workflow,
            workflow_id=claim.instance.workflow_id,
            message_id=claim.message_id,
            fencing_token=claim.fencing_token,
            attempt=claim.attempt,
            state_version=claim.state_version,
            worker=self.worker,
        )
        ctx._steps = self._steps(spec, claim)
        ctx._outbox = outbox
        await self._within_timeout(spec.fn(ctx, message), spec.timeout_s, f"the turn of {where}")
        # Pydantic does not check assignments by default: validate the state as it will be stored. No warnings:
        # a wrongly typed field is reported below, as the validation error that names it.
        raw = ctx.state.model_dump(warnings=False) if isinstance(ctx.state, BaseModel) else ctx.state
        new_state = coerce(raw, spec.state, what=f"the state the turn of {where} left")
        return encode(new_state, what=f"the state of {where}", max_bytes=self.max_state_bytes)

    async def _execute_handler(self, spec: HandlerSpec, claim: Claim, outbox: Outbox) -> str | None:
        """Decode the delivered event and run the handler; return None: a commit without state acknowledges it."""
        event_id = claim.instance.workflow_id
        where = f"event {event_id} for handler {spec.name}"
        envelope = Envelope.from_json(self.app.name, claim.payload_json, what=where)
        # A payload that no longer fits the model (a deployment changed it) fails here: PayloadValidationError is
        # not retried, so the delivery is dead-lettered with the fields named, never dropped.
        event = envelope.decode(spec.event_type, what=f"{where} (did a deployment change {spec.event_type.__name__}?)")
        ctx = HandlerContext(
            handler=spec.name,
            event_id=event_id,
            event_type=envelope.type_name,
            idempotency_key=handler_idempotency_key(event_id, spec.name),
            published_at=envelope.published_at,
            source=envelope.source,
            message_id=claim.message_id,
            attempt=claim.attempt,
            fencing_token=claim.fencing_token,
            worker=self.worker,
        )
        ctx._steps = self._steps(spec, claim)
        ctx._outbox = outbox
        await self._within_timeout(spec.fn(event, ctx), spec.timeout_s, f"handler {spec.name} on {where}")
        return None

    def _steps(self, job: Job, claim: Claim) -> StepRunner:
        return StepRunner(
            self.backend,
            claim,
            worker=self.worker,
            timeout_s=job.step_timeout_s,
            max_bytes=self.max_state_bytes,
            log_fields=log_fields(claim, self.worker),
        )

    @staticmethod
    async def _within_timeout(run: Awaitable[None], timeout_s: float, what: str) -> None:
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                await run
        except TimeoutError:
            if not deadline.expired():
                raise  # the run's own (a step's timeout, or the user's): not the run running out of time
            raise TurnTimeoutError(what, timeout_s) from None

    @staticmethod
    def _load_state(spec: WorkflowSpec, claim: Claim, where: str) -> BaseModel:
        if claim.state_json is None:
            return spec.state()
        try:
            loaded: BaseModel = decode(claim.state_json, spec.state, what=f"the stored state of {where}")
        except PayloadValidationError as drift:
            if spec.migrate is None:
                raise PayloadValidationError(
                    f"the stored state of {where} (version {claim.state_version}; did a deployment change "
                    f"{spec.state.__name__}? pass migrate= to @app.workflow, then `keel retry`)",
                    spec.state.__name__,
                    drift.errors,
                ) from drift
        else:
            return loaded
        upgraded = spec.migrate(json.loads(claim.state_json))
        return coerce(upgraded, spec.state, what=f"the state migrate= made of {where}'s stored state")

    async def _commit(self, commit: TurnCommit) -> None:
        claim = commit.claim
        extra = log_fields(claim, self.worker)
        try:
            version = await self.backend.commit_turn(commit)
        except LeaseLostError as exc:
            logger.warning("%s not committed, its lease is lost: %s", _noun(claim), exc.reason, extra=extra)
            return
        except BackendOverloaded as exc:
            # Nothing was written; the lease expires and the turn runs again, when the load may have eased.
            self.load.overloaded("committing a turn", exc)
            return
        except BackendUnavailable as exc:
            logger.error("%s not committed, the backend is unavailable: %s", _noun(claim), exc, extra=extra)
            return
        self.load.eased()
        effects = _effects(commit)
        if commit.state_json is None:
            logger.info("%s done in %.3fs%s", _noun(claim), commit.duration_s, effects, extra=extra)
        else:
            logger.info(
                "turn committed: state version %d in %.3fs%s",
                version,
                commit.duration_s,
                effects,
                extra={**extra, "state_version": version},
            )

    async def _failed(self, job: Job, claim: Claim, exc: Exception, started_at: datetime, duration_s: float) -> None:
        error = "".join(traceback.format_exception(exc))
        delay_s = retry_delay_s(exc, claim.attempt, job.retry)
        if delay_s is None:
            await self._dead_letter(claim, error, started_at, duration_s)
            return
        extra = log_fields(claim, self.worker)
        logger.warning(
            "%s failed (attempt %d of %d), retrying in %.2fs: %s",
            _noun(claim),
            claim.attempt,
            job.retry.max_attempts,
            delay_s,
            _last_line(error),
            extra=extra,
        )
        failure = TurnFailure(claim, error, self.worker, started_at, duration_s)
        try:
            await self.backend.retry_turn(failure, delay_s=delay_s)
        except LeaseLostError as exc_lost:
            logger.warning("failure not recorded, the lease is lost: %s", exc_lost.reason, extra=extra)
        except BackendOverloaded as exc_busy:
            self.load.overloaded("recording a failed attempt", exc_busy)
        except BackendUnavailable as exc_down:
            logger.error("failure not recorded, the backend is unavailable: %s", exc_down, extra=extra)

    async def _dead_letter(self, claim: Claim, error: str, started_at: datetime, duration_s: float) -> None:
        extra = log_fields(claim, self.worker)
        paused = "the delivery waits" if isinstance(target_of(claim), HandlerDelivery) else "the instance is paused"
        logger.error(
            "%s dead-lettered at attempt %d; %s until `keel retry` or `keel skip`:\n%s",
            _noun(claim),
            claim.attempt,
            paused,
            error.rstrip(),
            extra=extra,
        )
        try:
            await self.backend.fail_turn(TurnFailure(claim, error, self.worker, started_at, duration_s))
        except LeaseLostError as exc:
            logger.warning("dead letter not recorded, its lease is lost: %s", exc.reason, extra=extra)
        except BackendOverloaded as exc_busy:
            self.load.overloaded("dead-lettering a message", exc_busy)
        except BackendUnavailable as exc:
            logger.error("dead letter not recorded, the backend is unavailable: %s", exc, extra=extra)


def target_of(claim: Claim) -> Target:
    """What ``claim`` runs: a workflow instance's turn, or a handler's delivery of an event."""
    return parse_target(claim.instance.workflow, claim.instance.workflow_id)


def log_fields(claim: Claim, worker: str) -> dict[str, Any]:
    """The fields every log record about ``claim``'s turn (or delivery) carries (G9).

    A delivery's records carry ``handler`` and ``event_id`` instead of a ``state_version``: it has no state.
    """
    fields: dict[str, Any] = {"workflow": claim.instance.workflow, "workflow_id": claim.instance.workflow_id}
    target = target_of(claim)
    if isinstance(target, HandlerDelivery):
        fields.update(handler=target.handler, event_id=target.event_id)
    else:
        fields["state_version"] = claim.state_version
    fields.update(worker=worker, fencing_token=claim.fencing_token, attempt=claim.attempt, message_id=claim.message_id)
    return fields


def _noun(claim: Claim) -> str:
    target = target_of(claim)
    return f"handler {target.handler}" if isinstance(target, HandlerDelivery) else "turn"


def _effects(commit: TurnCommit) -> str:
    parts = []
    if commit.sends:
        parts.append(f"{len(commit.sends)} message(s) sent")
    if commit.events:
        parts.append(f"{len(commit.events)} event(s) published")
    return f" ({', '.join(parts)})" if parts else ""


def _last_line(error: str) -> str:
    lines = error.strip().splitlines()
    return lines[-1] if lines else "unknown error"
