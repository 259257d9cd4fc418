"""The app: a registry of workflows, built once at import time and frozen when a worker or client starts.

Registering at start-up, never per request, is the point: the second article's callbacks stopped firing
because each request registered its own, in its own process. A registration after the app has started
raises ``RegistrationError``, and a workflow whose signature does not fit its declared models raises at
the decorator, not on some worker in production.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from keel.config import resolve_url
from keel.context import TurnContext
from keel.errors import ConfigurationError, RegistrationError, UnknownWorkflowError
from keel.payload import validate_key
from keel.retention import DEFAULT_RETENTION, Retention
from keel.retry import DEFAULT_RETRY_POLICY, RetryPolicy
from keel.steps import DEFAULT_STEP_TIMEOUT_S

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from keel.client import Client

StateT = TypeVar("StateT", bound=BaseModel)
MessageT = TypeVar("MessageT", bound=BaseModel)


#: How long one turn may run, unless the app or workflow says otherwise.
DEFAULT_TURN_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class WorkflowSpec:
    """A registered workflow: its name, function, models and failure handling."""

    name: str
    fn: Callable[[TurnContext[Any], Any], Awaitable[None]]
    state: type[BaseModel]
    message: type[BaseModel]
    retry: RetryPolicy = DEFAULT_RETRY_POLICY
    timeout_s: float = DEFAULT_TURN_TIMEOUT_S
    step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S
    #: Upgrades a stored state document that no longer fits ``state`` (a deployment changed the model).
    migrate: Callable[[Any], Any] | None = None


class App:
    """The registry of an application's workflows, identical in every process that imports it.

    Args:
        name: Namespaces everything the app stores, so several apps can share one backend.
        backend: The backend URL; when None, the ``KEEL_URL`` environment variable, else ``sqlite:///keel.db``
            (read when a worker or client starts).
        retry: How failing turns are retried, for workflows that do not say; ``keel.RetryPolicy()`` by default.
        turn_timeout_s: How long a turn may run before it is cancelled (a failed attempt), by default.
        step_timeout_s: How long a step may run before it is cancelled (a failed attempt), by default.
        retention: How long finished messages, turn records and idempotency keys are kept; see ``keel.Retention``.

    Raises:
        InvalidKeyError: ``name`` is empty, over 255 characters or not printable.
        ConfigurationError: A timeout is not positive.
    """

    def __init__(
        self,
        name: str,
        backend: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        turn_timeout_s: float = DEFAULT_TURN_TIMEOUT_S,
        step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S,
        retention: Retention | None = None,
    ) -> None:
        self.name = validate_key(name, what="app name")
        self._backend = backend
        self.retry = retry or DEFAULT_RETRY_POLICY
        self.retention = retention or DEFAULT_RETENTION
        self.turn_timeout_s = _positive(turn_timeout_s, "turn_timeout_s")
        self.step_timeout_s = _positive(step_timeout_s, "step_timeout_s")
        self._workflows: dict[str, WorkflowSpec] = {}
        self._frozen = False

    @property
    def backend_url(self) -> str:
        """The backend URL this app uses: the argument, else ``KEEL_URL``, else ``sqlite:///keel.db``."""
        return resolve_url(self._backend)

    @property
    def workflows(self) -> dict[str, WorkflowSpec]:
        """The registered workflows by name (a copy)."""
        return dict(self._workflows)

    @property
    def frozen(self) -> bool:
        """True once a worker or client has started: registering then raises."""
        return self._frozen

    def freeze(self) -> None:
        """Close registration; called when a worker or client starts."""
        self._frozen = True

    def workflow(
        self,
        *,
        state: type[StateT],
        message: type[MessageT],
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout_s: float | None = None,
        step_timeout_s: float | None = None,
        migrate: Callable[[Any], Any] | None = None,
    ) -> Callable[
        [Callable[[TurnContext[StateT], MessageT], Awaitable[None]]],
        Callable[[TurnContext[StateT], MessageT], Awaitable[None]],
    ]:
        """Register an async function ``(ctx: keel.TurnContext[State], msg: Message) -> None`` as a workflow.

        Args:
            state: The pydantic model of the instance's state; its defaults are the first turn's state.
            message: The pydantic model of the messages the workflow receives.
            name: The workflow's name; the function's name when None.
            retry: How its failing turns are retried; the app's policy when None.
            timeout_s: How long one of its turns may run; the app's ``turn_timeout_s`` when None.
            step_timeout_s: How long one of its steps may run; the app's ``step_timeout_s`` when None.
            migrate: Called with a stored state document (a dict) that no longer fits ``state``; returns one
                that does (or a ``state`` instance). Without it such an instance is paused with the error.

        Raises:
            RegistrationError: The app has started, the name is taken, the models are not pydantic models, or
                the function is not async, takes other parameters, or is annotated with other types.
        """
        _require_model(state, "state")
        _require_model(message, "message")

        def register(
            fn: Callable[[TurnContext[StateT], MessageT], Awaitable[None]],
        ) -> Callable[[TurnContext[StateT], MessageT], Awaitable[None]]:
            workflow_name = name if name is not None else getattr(fn, "__name__", "")
            self._check_open(f"workflow {workflow_name!r}")
            _check_name(workflow_name)
            if workflow_name in self._workflows:
                raise RegistrationError(f"app {self.name!r} already has a workflow named {workflow_name!r}")
            _check_signature(fn, workflow_name, state, message)
            if migrate is not None and not callable(migrate):
                raise RegistrationError(f"migrate= of workflow {workflow_name!r} must be a function, not {migrate!r}")
            self._workflows[workflow_name] = WorkflowSpec(
                workflow_name,
                fn,
                state,
                message,
                retry=retry or self.retry,
                timeout_s=_positive(timeout_s or self.turn_timeout_s, "timeout_s"),
                step_timeout_s=_positive(step_timeout_s or self.step_timeout_s, "step_timeout_s"),
                migrate=migrate,
            )
            return fn

        return register

    def spec(self, workflow: str) -> WorkflowSpec:
        """Return the registered workflow named ``workflow``.

        Raises:
            UnknownWorkflowError: No such workflow; the error lists the registered ones.
        """
        found = self._workflows.get(workflow)
        if found is None:
            raise UnknownWorkflowError(self.name, workflow, sorted(self._workflows))
        return found

    def client(self, *, url: str | None = None) -> Client:
        """Return a client for this app (use it as ``async with app.client() as client``); freezes the app.

        Args:
            url: Overrides the app's backend URL.
        """
        from keel.client import Client

        return Client(self, url or self.backend_url)

    def _check_open(self, what: str) -> None:
        if self._frozen:
            raise RegistrationError(
                f"cannot register {what} on app {self.name!r}: the app has started (a worker or client is "
                "running). Register every workflow at import time, at start-up, in the module every process "
                "imports; registering later, or per request, is how callbacks end up in one process only"
            )


def load_app(path: str) -> App:
    """Import ``MODULE:ATTRIBUTE`` (e.g. ``myproject.workflows:app``) and return the ``keel.App`` it names.

    The current folder is importable, as it is for ``python -m``.

    Raises:
        ConfigurationError: The path is malformed, the module cannot be imported, or the attribute is missing
            or not an App.
    """
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"{path!r} is not MODULE:APP, e.g. myproject.workflows:app")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import module {module_name!r} (from {path!r}): {exc}") from exc
    found = getattr(module, attribute, None)
    if not isinstance(found, App):
        kind = "nothing" if found is None else type(found).__name__
        raise ConfigurationError(f"{path!r} names {kind}, not a keel.App")
    return found


def _positive(value: float, name: str) -> float:
    if not (isinstance(value, int | float) and value > 0):
        raise ConfigurationError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


def _require_model(model: object, role: str) -> None:
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise RegistrationError(f"{role}= must be a pydantic model class, not {model!r}")


def _check_name(name: str) -> None:
    try:
        validate_key(name, what="workflow name")
    except ValueError as exc:
        raise RegistrationError(str(exc)) from exc
    if "/" in name:
        raise RegistrationError(f"workflow name {name!r} must not contain '/'")


def _check_signature(fn: object, name: str, state: type[BaseModel], message: type[BaseModel]) -> None:
    where = f"workflow {name!r} ({getattr(fn, '__qualname__', fn)!r})"
    if not inspect.iscoroutinefunction(fn):
        raise RegistrationError(f"{where} must be an async function: async def {name}(ctx, msg) -> None")
    params = list(inspect.signature(fn).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) != 2 or any(p.kind not in positional for p in params):
        raise RegistrationError(
            f"{where} must take exactly two positional parameters (ctx: keel.TurnContext[{state.__name__}], "
            f"msg: {message.__name__}); it takes ({', '.join(str(p) for p in params)})"
        )
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError) as exc:
        raise RegistrationError(f"{where} has annotations that cannot be resolved: {exc}") from exc
    _check_context_hint(hints.get(params[0].name), where, state)
    msg_hint = hints.get(params[1].name)
    if msg_hint is not None and msg_hint is not Any and msg_hint is not message:
        raise RegistrationError(f"{where} annotates its message as {msg_hint!r}, but message={message.__name__}")
    returned = hints.get("return", None)
    if "return" in hints and returned is not type(None):
        raise RegistrationError(f"{where} must return None (the state is committed from ctx.state), not {returned!r}")


def _check_context_hint(hint: object, where: str, state: type[BaseModel]) -> None:
    if hint is None or hint is Any or hint is TurnContext:
        return
    args = typing.get_args(hint)
    if typing.get_origin(hint) is not TurnContext or len(args) != 1:
        raise RegistrationError(
            f"{where} annotates its context as {hint!r}; expected keel.TurnContext[{state.__name__}]"
        )
    if args[0] is not state and args[0] is not Any:
        raise RegistrationError(
            f"{where} annotates its context as TurnContext[{getattr(args[0], '__name__', args[0])}], "
            f"but state={state.__name__}"
        )
