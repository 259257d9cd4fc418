"""One turn, start to finish: load the state, run the workflow function, then commit, retry or dead-letter.

Nothing fails silently here. The state is loaded (and upgraded with the workflow's ``migrate`` when it no
longer fits its model) and run on a private copy under the workflow's timeout; its steps are recorded as they
finish. A turn that returns commits atomically; one that raises is retried after a jittered backoff on the
state as last committed, or dead-lettered with its traceback (which pauses its instance) when retrying cannot
help or its attempts have run out. Whatever happens is logged with the turn's workflow, id, worker, state
version, fencing token and attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from keel.backends.base import TurnCommit, TurnFailure
from keel.context import TurnContext
from keel.errors import BackendUnavailable, LeaseLostError, PayloadValidationError, TurnTimeoutError
from keel.payload import coerce, decode, encode
from keel.retry import retry_delay_s
from keel.steps import StepRunner

if TYPE_CHECKING:
    from keel.app import App, WorkflowSpec
    from keel.backends.base import Backend, Claim

logger = logging.getLogger("keel.worker")


class TurnRunner:
    """Runs claimed turns of one app for one worker."""

    def __init__(self, app: App, backend: Backend, *, worker: str, max_state_bytes: int) -> None:
        self.app = app
        self.backend = backend
        self.worker = worker
        self.max_state_bytes = max_state_bytes

    async def run(self, claim: Claim) -> None:
        """Run ``claim``'s turn and record how it ended; never raises but for cancellation."""
        spec = self.app.spec(claim.instance.workflow)
        extra = log_fields(claim, self.worker)
        started_at, started = datetime.now(UTC), time.monotonic()
        if claim.attempt > spec.retry.max_attempts:
            # Earlier attempts never reported back: their workers died or lost the lease mid-turn.
            error = (
                f"gave up at attempt {claim.attempt} of {spec.retry.max_attempts}: the earlier attempts did not "
                "finish (their workers died or lost their lease mid-turn)"
            )
            await self._dead_letter(claim, error, started_at, 0.0)
            return
        logger.debug("turn started", extra=extra)
        try:
            state_json = await self._execute(spec, claim)
        except asyncio.CancelledError:
            logger.warning("turn cancelled before it could commit", extra=extra)
            raise
        except LeaseLostError as exc:
            logger.warning("turn stopped, its lease is lost: %s", exc.reason, extra=extra)
            return
        except Exception as exc:  # noqa: BLE001 - every failure of user code is recorded, never swallowed
            await self._failed(spec, claim, exc, started_at, time.monotonic() - started)
            return
        await self._commit(TurnCommit(claim, state_json, self.worker, started_at, time.monotonic() - started))

    async def _execute(self, spec: WorkflowSpec, claim: Claim) -> str:
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
        ctx._steps = StepRunner(
            self.backend,
            claim,
            worker=self.worker,
            timeout_s=spec.step_timeout_s,
            max_bytes=self.max_state_bytes,
            log_fields=log_fields(claim, self.worker),
        )
        deadline = asyncio.timeout(spec.timeout_s)
        try:
            async with deadline:
                await spec.fn(ctx, message)
        except TimeoutError:
            if not deadline.expired():
                raise  # the turn's own (a step's timeout, or the user's): not the turn running out of time
            raise TurnTimeoutError(where, spec.timeout_s) from None
        # Pydantic does not check assignments by default: validate the state as it will be stored. No warnings:
        # a wrongly typed field is reported below, as the validation error that names it.
        raw = ctx.state.model_dump(warnings=False) if isinstance(ctx.state, BaseModel) else ctx.state
        new_state = coerce(raw, spec.state, what=f"the state the turn of {where} left")
        return encode(new_state, what=f"the state of {where}", max_bytes=self.max_state_bytes)

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
        extra = log_fields(commit.claim, self.worker)
        try:
            version = await self.backend.commit_turn(commit)
        except LeaseLostError as exc:
            logger.warning("turn not committed, its lease is lost: %s", exc.reason, extra=extra)
            return
        except BackendUnavailable as exc:
            logger.error("turn not committed, the backend is unavailable: %s", exc, extra=extra)
            return
        logger.info(
            "turn committed: state version %d in %.3fs",
            version,
            commit.duration_s,
            extra={**extra, "state_version": version},
        )

    async def _failed(
        self, spec: WorkflowSpec, claim: Claim, exc: Exception, started_at: datetime, duration_s: float
    ) -> None:
        error = "".join(traceback.format_exception(exc))
        delay_s = retry_delay_s(exc, claim.attempt, spec.retry)
        if delay_s is None:
            await self._dead_letter(claim, error, started_at, duration_s)
            return
        extra = log_fields(claim, self.worker)
        logger.warning(
            "turn failed (attempt %d of %d), retrying in %.2fs: %s",
            claim.attempt,
            spec.retry.max_attempts,
            delay_s,
            _last_line(error),
            extra=extra,
        )
        failure = TurnFailure(claim, error, self.worker, started_at, duration_s)
        try:
            await self.backend.retry_turn(failure, delay_s=delay_s)
        except LeaseLostError as exc_lost:
            logger.warning("turn failure not recorded, its lease is lost: %s", exc_lost.reason, extra=extra)
        except BackendUnavailable as exc_down:
            logger.error("turn failure not recorded, the backend is unavailable: %s", exc_down, extra=extra)

    async def _dead_letter(self, claim: Claim, error: str, started_at: datetime, duration_s: float) -> None:
        extra = log_fields(claim, self.worker)
        logger.error(
            "turn dead-lettered at attempt %d; the instance is paused until `keel retry` or `keel skip`:\n%s",
            claim.attempt,
            error.rstrip(),
            extra=extra,
        )
        try:
            await self.backend.fail_turn(TurnFailure(claim, error, self.worker, started_at, duration_s))
        except LeaseLostError as exc:
            logger.warning("dead letter not recorded, its lease is lost: %s", exc.reason, extra=extra)
        except BackendUnavailable as exc:
            logger.error("dead letter not recorded, the backend is unavailable: %s", exc, extra=extra)


def log_fields(claim: Claim, worker: str) -> dict[str, Any]:
    """The fields every log record about ``claim``'s turn carries (G9)."""
    return {
        "workflow": claim.instance.workflow,
        "workflow_id": claim.instance.workflow_id,
        "worker": worker,
        "state_version": claim.state_version,
        "fencing_token": claim.fencing_token,
        "attempt": claim.attempt,
        "message_id": claim.message_id,
    }


def _last_line(error: str) -> str:
    lines = error.strip().splitlines()
    return lines[-1] if lines else "unknown error"
