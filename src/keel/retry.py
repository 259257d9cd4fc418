"""When a failed turn runs again: the retry policy and the classification of failures."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pydantic import ValidationError

from keel.errors import (
    ConfigurationError,
    IdempotencyConflictError,
    InvalidKeyError,
    NonRetryable,
    PayloadError,
    RegistrationError,
    RetryAfter,
    UnknownWorkflowError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how far apart, a failing turn is tried.

    Attempt ``n`` (1-based) that fails waits ``min(max_delay_s, initial_delay_s * multiplier ** (n - 1))``,
    jittered to between half and all of it, before attempt ``n + 1``; after ``max_attempts`` the message is
    dead-lettered and its instance paused.

    Raises:
        ValueError: A setting is out of range.
    """

    max_attempts: int = 5
    initial_delay_s: float = 1.0
    max_delay_s: float = 60.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts!r}")
        if not 0 <= self.initial_delay_s <= self.max_delay_s:
            raise ValueError("need 0 <= initial_delay_s <= max_delay_s")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, not {self.multiplier!r}")

    def delay_s(self, attempt: int) -> float:
        """The pause after failed attempt ``attempt``; jitter keeps instances that failed together apart."""
        ceiling = min(self.max_delay_s, self.initial_delay_s * self.multiplier ** max(0, attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


#: The policy used when neither the app nor the workflow gives one.
DEFAULT_RETRY_POLICY = RetryPolicy()

#: Failures that happen again, the same way, on every attempt: dead-lettered at once, never retried.
FAILS_THE_SAME_WAY = (
    NonRetryable,
    PayloadError,
    ValidationError,
    InvalidKeyError,
    UnknownWorkflowError,
    RegistrationError,
    ConfigurationError,
    IdempotencyConflictError,
)


def retry_delay_s(exc: BaseException, attempt: int, policy: RetryPolicy) -> float | None:
    """Return how long to wait before retrying after ``exc``, or None to dead-letter now.

    Not retried: ``NonRetryable`` and its subclasses, payload errors (a state or message that does not
    validate, a result that is not JSON or too large: the same input fails the same way), a bad key or an
    unknown workflow named by ``ctx.send`` or ``ctx.step``, a registration inside a turn (registering per
    request: the app is frozen, so it raises every time) and a configuration keel cannot work with (the same
    code fails the same way until a deployment changes it, and then ``keel retry`` runs it again), and any
    failure once ``attempt`` reached ``policy.max_attempts``. ``RetryAfter`` sets its own delay.
    """
    if isinstance(exc, FAILS_THE_SAME_WAY):
        return None
    if attempt >= policy.max_attempts:
        return None
    if isinstance(exc, RetryAfter):
        return exc.delay_s
    return policy.delay_s(attempt)
