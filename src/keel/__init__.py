"""keel keeps agent applications correct when they are scaled out to many processes and machines.

The public names are the ones in ``__all__``; everything else may change between releases.
"""

from __future__ import annotations

from keel.app import App
from keel.client import Client
from keel.context import HandlerContext, TurnContext
from keel.errors import (
    BackendOverloaded,
    BackendUnavailable,
    ConfigurationError,
    ErrorCode,
    IdempotencyConflictError,
    InstanceNotFoundError,
    InvalidKeyError,
    KeelError,
    KeyNotFoundError,
    LeaseLostError,
    MessageNotFoundError,
    MissingExtraError,
    NonRetryable,
    NotFoundError,
    NotPausedError,
    NotSerializableError,
    PayloadError,
    PayloadTooLargeError,
    PayloadValidationError,
    RegistrationError,
    RetryAfter,
    StaleWriteError,
    StepError,
    StepTimeoutError,
    StoreError,
    TurnFailedError,
    TurnTimeoutError,
    UnknownSchemeError,
    UnknownWorkflowError,
    UnsafeLocationError,
    UpdateContentionError,
    WaitTimeoutError,
)
from keel.events import Event
from keel.outgoing import Outgoing
from keel.records import DeadLetter, HandlerDelivery, MessageStatus, Target, TurnOutcome, TurnRecord, WorkflowInstance
from keel.retention import Retention
from keel.retry import RetryPolicy
from keel.store import Store, open_store
from keel.types import Versioned
from keel.version import __version__

__all__ = [
    "App",
    "BackendOverloaded",
    "BackendUnavailable",
    "Client",
    "ConfigurationError",
    "DeadLetter",
    "ErrorCode",
    "Event",
    "HandlerContext",
    "HandlerDelivery",
    "IdempotencyConflictError",
    "InstanceNotFoundError",
    "InvalidKeyError",
    "KeelError",
    "KeyNotFoundError",
    "LeaseLostError",
    "MessageNotFoundError",
    "MessageStatus",
    "MissingExtraError",
    "NonRetryable",
    "NotFoundError",
    "NotPausedError",
    "NotSerializableError",
    "Outgoing",
    "PayloadError",
    "PayloadTooLargeError",
    "PayloadValidationError",
    "RegistrationError",
    "Retention",
    "RetryAfter",
    "RetryPolicy",
    "StaleWriteError",
    "StepError",
    "StepTimeoutError",
    "Store",
    "StoreError",
    "Target",
    "TurnContext",
    "TurnFailedError",
    "TurnOutcome",
    "TurnRecord",
    "TurnTimeoutError",
    "UnknownSchemeError",
    "UnknownWorkflowError",
    "UnsafeLocationError",
    "UpdateContentionError",
    "Versioned",
    "WaitTimeoutError",
    "WorkflowInstance",
    "__version__",
    "open_store",
]
