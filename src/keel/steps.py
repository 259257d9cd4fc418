"""Steps: side effects (model calls, tool calls) done once per message, however often its turn runs.

``await ctx.step(name, fn, *args)`` runs ``fn`` and records its result durably, fenced by the turn's token,
before the turn goes on. When the turn runs again (a crash, a lost lease, a retry), the recorded result is
returned instead of calling ``fn`` again. Both paths give the same thing: the result goes through JSON and
comes back typed by ``fn``'s return annotation, so user code cannot tell a replay from a first run.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
import typing
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError

from keel.backends.base import StepRecord
from keel.errors import NotSerializableError, PayloadTooLargeError, PayloadValidationError, StepError, StepTimeoutError
from keel.payload import validate_key

if TYPE_CHECKING:
    from collections.abc import Callable

    from keel.backends.base import Claim, Claimer

logger = logging.getLogger(__name__)

#: How long one step may run, unless the workflow says otherwise.
DEFAULT_STEP_TIMEOUT_S = 120.0


class StepRunner:
    """Runs and records the steps of one turn."""

    def __init__(
        self,
        backend: Claimer,
        claim: Claim,
        *,
        worker: str,
        timeout_s: float,
        max_bytes: int,
        log_fields: dict[str, Any],
    ) -> None:
        self._backend = backend
        self._claim = claim
        self._worker = worker
        self._timeout_s = timeout_s
        self._max_bytes = max_bytes
        self._log_fields = log_fields
        self._recorded = dict(claim.steps)
        self._used: set[str] = set()

    async def run(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Return ``fn(*args, **kwargs)``'s result, running it only if this message has no record of ``name``.

        Raises:
            StepError: ``name`` was already used in this turn.
            StepTimeoutError: ``fn`` ran past the step timeout.
            NotSerializableError, PayloadTooLargeError: The result is not JSON, or too large.
            LeaseLostError: The turn's lease is gone: the result is not recorded, and the turn must stop.
        """
        validate_key(name, what="step name")
        if name in self._used:
            raise StepError(f"step name {name!r} is used twice in one turn; give every step of a turn its own name")
        self._used.add(name)
        adapter = _result_adapter(fn)
        extra = {**self._log_fields, "step": name}
        if name in self._recorded:
            logger.info("step %s replayed from its record", name, extra=extra)
            return _load(adapter, self._recorded[name], name)
        started = time.monotonic()
        result = await self._call(name, fn, args, kwargs)
        text = _dump(adapter, result, name, self._max_bytes)
        duration_s = time.monotonic() - started
        await self._backend.record_step(StepRecord(self._claim, name, text, self._worker, duration_s))
        self._recorded[name] = text
        logger.info("step %s done and recorded in %.3fs", name, duration_s, extra=extra)
        return _load(adapter, text, name)

    async def _call(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            async with asyncio.timeout(self._timeout_s):
                if inspect.iscoroutinefunction(fn):
                    return await fn(*args, **kwargs)
                # A sync function runs in a thread, so it cannot stall the heartbeat that keeps the lease.
                result = await asyncio.to_thread(fn, *args, **kwargs)
                return await result if inspect.isawaitable(result) else result
        except TimeoutError:
            raise StepTimeoutError(name, self._timeout_s) from None


@lru_cache(maxsize=512)
def _result_adapter(fn: Callable[..., Any]) -> TypeAdapter[Any] | None:
    """A pydantic adapter for ``fn``'s return annotation, or None when it has none (plain JSON then)."""
    target = inspect.unwrap(fn)
    try:
        hints = typing.get_type_hints(target)
    except (NameError, TypeError):
        return None
    returned = hints.get("return")
    if returned is None or returned is Any:
        return None
    return TypeAdapter(returned)


def _dump(adapter: TypeAdapter[Any] | None, result: Any, name: str, max_bytes: int) -> str:
    what = f"the result of step {name!r}"
    try:
        if adapter is not None:
            text = adapter.dump_json(result).decode()
        else:
            text = json.dumps(result, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise NotSerializableError(what, str(exc)) from exc
    if len(text) * 4 > max_bytes and len(text.encode()) > max_bytes:
        raise PayloadTooLargeError(what, len(text.encode()), max_bytes)
    return text


def _load(adapter: TypeAdapter[Any] | None, text: str, name: str) -> Any:
    if adapter is None:
        return json.loads(text)
    try:
        return adapter.validate_json(text)
    except ValidationError as exc:
        raise PayloadValidationError(
            f"the recorded result of step {name!r}", "its return annotation", exc.errors()
        ) from exc
