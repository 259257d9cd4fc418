"""The app: a registry of workflows and event handlers, built at import time, frozen when a worker or client starts.

Registering at start-up, never per request, is the point: the second article's callbacks stopped firing
because each request registered its own, in its own process. A registration after the app has started
raises ``RegistrationError``, and a workflow or handler whose signature does not fit its declared models
raises at the decorator, not on some worker in production.
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
from keel.context import HandlerContext, TurnContext
from keel.errors import ConfigurationError, RegistrationError, UnknownWorkflowError
from keel.events import Event, event_type_name
from keel.payload import validate_key
from keel.records import HandlerDelivery, WorkflowInstance, delivery_workflow, handler_of
from keel.retention import DEFAULT_RETENTION, Retention
from keel.retry import DEFAULT_RETRY_POLICY, RetryPolicy
from keel.steps import DEFAULT_STEP_TIMEOUT_S

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from keel.client import Client
    from keel.records import Target

StateT = TypeVar("StateT", bound=BaseModel)
MessageT = TypeVar("MessageT", bound=BaseModel)
EventT = TypeVar("EventT", bound=Event)


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


@dataclass(frozen=True)
class HandlerSpec:
    """A registered event handler: its name, the event type it takes, its function and failure handling."""

    name: str
    event_type: type[Event]
    fn: Callable[[Any, HandlerContext], Awaitable[None]]
    retry: RetryPolicy = DEFAULT_RETRY_POLICY
    timeout_s: float = DEFAULT_TURN_TIMEOUT_S
    step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S

    @property
    def workflow(self) -> str:
        """The pseudo-workflow the engines store this handler's deliveries under: ``on/NAME``."""
        return delivery_workflow(self.name)


class App:
    """The registry of an application's workflows and event handlers, identical in every process that imports it.

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
        self._handlers: dict[str, HandlerSpec] = {}
        self._event_types: dict[str, type[Event]] = {}
        self._frozen = False
        self._testing_url: str | None = None

    @property
    def backend_url(self) -> str:
        """The backend URL this app uses: the argument, else ``KEEL_URL``, else ``sqlite:///keel.db``.

        Inside ``async with keel.testing.WorkflowTester(app)``, the tester's private backend instead.
        """
        return self._testing_url or resolve_url(self._backend)

    def use_testing_backend(self, url: str | None) -> None:
        """Point ``backend_url`` (so ``app.client()`` too) at a test's private backend, or back with None.

        ``keel.testing.WorkflowTester`` calls it, so that code under test that opens ``app.client()`` sends to
        the tester's backend rather than to a real ``./keel.db``.

        Raises:
            ConfigurationError: Another tester already has the app.
        """
        if url is not None and self._testing_url is not None:
            raise ConfigurationError(
                f"app {self.name!r} is already under test by another WorkflowTester: nest none, one at a time"
            )
        self._testing_url = url

    @property
    def workflows(self) -> dict[str, WorkflowSpec]:
        """The registered workflows by name (a copy)."""
        return dict(self._workflows)

    @property
    def handlers(self) -> dict[str, HandlerSpec]:
        """The registered event handlers by name (a copy)."""
        return dict(self._handlers)

    def handlers_of(self, event_type: type[Event]) -> list[HandlerSpec]:
        """The handlers registered for ``event_type``, in registration order."""
        name = event_type_name(event_type)
        return [spec for spec in self._handlers.values() if event_type_name(spec.event_type) == name]

    @property
    def frozen(self) -> bool:
        """True once a worker or client has started: registering then raises."""
        return self._frozen

    def freeze(self) -> None:
        """Close registration; called when a worker or client starts."""
        self._frozen = True

    def workflow(
        self,
        _fn: None = None,
        /,
        *,
        state: type[StateT] | None = None,
        message: type[MessageT] | None = None,
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
            RegistrationError: The app has started, the name is taken, the models are missing or not pydantic
                models (``@app.workflow`` without its parentheses), or the function is not async, takes other
                parameters, or is annotated with other types.
        """
        if _fn is not None or state is None or message is None:
            named = f" {getattr(_fn, '__name__', '')!r}" if _fn is not None else ""
            raise RegistrationError(
                f"workflow{named} needs its models: write @app.workflow(state=StateModel, message=MessageModel), "
                "with the parentheses"
            )
        _require_model(state, "state")
        _require_model(message, "message")

        def register(
            fn: Callable[[TurnContext[StateT], MessageT], Awaitable[None]],
        ) -> Callable[[TurnContext[StateT], MessageT], Awaitable[None]]:
            workflow_name = name if name is not None else getattr(fn, "__name__", "")
            self._check_open(f"workflow {workflow_name!r}")
            _check_name(workflow_name, what="workflow name")
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

    def on(
        self,
        event_type: type[EventT],
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout_s: float | None = None,
        step_timeout_s: float | None = None,
    ) -> Callable[
        [Callable[[EventT, HandlerContext], Awaitable[None]]], Callable[[EventT, HandlerContext], Awaitable[None]]
    ]:
        """Register an async function ``(event: EventType, ctx: keel.HandlerContext) -> None`` as a handler.

        Every event of ``event_type`` published or emitted from then on is delivered to it, at least once, on
        whichever worker is free, with ``ctx.idempotency_key`` the same on every redelivery; its sends and
        publishes are committed with its success, once. Register handlers at import time, in the module every
        process imports: the publishing process fans events out to the handlers it knows.

        Args:
            event_type: A ``keel.Event`` subclass.
            name: The handler's name (it names its deliveries: ``on/NAME``); the function's name when None.
            retry: How its failing deliveries are retried; the app's policy when None.
            timeout_s: How long one delivery may run; the app's ``turn_timeout_s`` when None.
            step_timeout_s: How long one of its steps may run; the app's ``step_timeout_s`` when None.

        Raises:
            RegistrationError: The app has started, the name is taken, ``event_type`` is not a ``keel.Event``
                subclass (or another class already has its name), or the function is not async, takes other
                parameters, or is annotated with other types.
        """
        if not (isinstance(event_type, type) and issubclass(event_type, Event)):
            hint = " (write @app.on(EventType), with the event type)" if callable(event_type) else ""
            raise RegistrationError(f"@app.on() takes a keel.Event subclass, not {event_type!r}{hint}")

        def register(
            fn: Callable[[EventT, HandlerContext], Awaitable[None]],
        ) -> Callable[[EventT, HandlerContext], Awaitable[None]]:
            handler_name = name if name is not None else getattr(fn, "__name__", "")
            self._check_open(f"handler {handler_name!r}")
            _check_name(handler_name, what="handler name")
            if handler_name in self._handlers:
                raise RegistrationError(
                    f"app {self.name!r} already has a handler named {handler_name!r}; pass name= to tell them apart"
                )
            type_name = event_type_name(event_type)
            known = self._event_types.get(type_name)
            if known is not None and known is not event_type:
                raise RegistrationError(
                    f"two event types are named {type_name!r} ({known.__module__} and {event_type.__module__}): "
                    "events are stored by type name, so rename one"
                )
            _check_handler_signature(fn, handler_name, event_type)
            self._event_types[type_name] = event_type
            self._handlers[handler_name] = HandlerSpec(
                handler_name,
                event_type,
                fn,
                retry=retry or self.retry,
                timeout_s=_positive(timeout_s or self.turn_timeout_s, "timeout_s"),
                step_timeout_s=_positive(step_timeout_s or self.step_timeout_s, "step_timeout_s"),
            )
            return fn

        return register

    def event_type(self, name: str) -> type[Event]:
        """Return the event type named ``name`` among those the app's handlers take.

        Raises:
            UnknownWorkflowError: No handler takes an event type of that name; the error lists those that do.
        """
        found = self._event_types.get(name)
        if found is None:
            raise UnknownWorkflowError(self.name, name, sorted(self._event_types), kind="event type")
        return found

    def handler(self, name: str) -> HandlerSpec:
        """Return the registered handler named ``name`` (``on/NAME``, its deliveries' stored name, works too).

        Raises:
            UnknownWorkflowError: No such handler; the error lists the registered ones.
        """
        found = self._handlers.get(handler_of(name) or name)
        if found is None:
            raise UnknownWorkflowError(self.name, name, sorted(self._handlers), kind="handler")
        return found

    def job(self, target: Target | str) -> WorkflowSpec | HandlerSpec:
        """Return what runs ``target``: the workflow of a ``WorkflowInstance``, the handler of a ``HandlerDelivery``.

        Args:
            target: What a claim runs; or a stored workflow name, where ``on/NAME`` names handler NAME's deliveries.

        Raises:
            UnknownWorkflowError: Nothing of that name is registered; the error lists what is (for a stored
                name, workflows and ``on/NAME`` of every handler).
        """
        if isinstance(target, WorkflowInstance):
            return self.spec(target.workflow)
        if isinstance(target, HandlerDelivery):
            return self.handler(target.handler)
        handler = handler_of(target)
        found = self._workflows.get(target) if handler is None else self._handlers.get(handler)
        if found is None:
            registered = sorted([*self._workflows, *map(delivery_workflow, self._handlers)])
            raise UnknownWorkflowError(self.name, target, registered)
        return found

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


def _check_name(name: str, *, what: str) -> None:
    try:
        validate_key(name, what=what)
    except ValueError as exc:
        raise RegistrationError(str(exc)) from exc
    if "/" in name:
        raise RegistrationError(f"{what} {name!r} must not contain '/'")


def _check_signature(fn: object, name: str, state: type[BaseModel], message: type[BaseModel]) -> None:
    where = f"workflow {name!r} ({getattr(fn, '__qualname__', fn)!r})"
    expected = f"async def {name}(ctx: keel.TurnContext[{state.__name__}], msg: {message.__name__}) -> None"
    params, hints = _async_pair(fn, where, expected)
    _check_context_hint(hints.get(params[0].name), where, state)
    msg_hint = hints.get(params[1].name)
    if msg_hint is not None and msg_hint is not Any and msg_hint is not message:
        raise RegistrationError(f"{where} annotates its message as {msg_hint!r}, but message={message.__name__}")
    returned = hints.get("return", None)
    if "return" in hints and returned is not type(None):
        raise RegistrationError(f"{where} must return None (the state is committed from ctx.state), not {returned!r}")


def _async_pair(fn: object, where: str, expected: str) -> tuple[list[inspect.Parameter], dict[str, Any]]:
    """Check that ``fn`` is ``async def`` with two positional parameters; return them and the resolved hints.

    Annotations are resolved as ``typing.get_type_hints`` does, so string annotations (and ``from __future__
    import annotations``) are checked like any others.
    """
    if not inspect.iscoroutinefunction(fn):
        raise RegistrationError(f"{where} must be an async function: {expected}")
    params = list(inspect.signature(fn).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) != 2 or any(p.kind not in positional for p in params):
        raise RegistrationError(
            f"{where} must take exactly two positional parameters: {expected}; "
            f"it takes ({', '.join(str(p) for p in params)})"
        )
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError) as exc:
        raise RegistrationError(f"{where} has annotations that cannot be resolved: {exc}") from exc
    return params, hints


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


def _check_handler_signature(fn: object, name: str, event_type: type[Event]) -> None:
    """Catch at registration what would otherwise be a TypeError on some worker: the second article's bug."""
    event_name = event_type.__name__
    where = f"handler {name!r} ({getattr(fn, '__qualname__', fn)!r})"
    expected = f"async def {name}(event: {event_name}, ctx: keel.HandlerContext) -> None"
    params, hints = _async_pair(fn, where, expected)
    event_hint = hints.get(params[0].name)
    fits = (
        event_hint is None or event_hint is Any or (isinstance(event_hint, type) and issubclass(event_type, event_hint))
    )
    if not fits:
        raise RegistrationError(
            f"{where} is registered for {event_name} but annotates its event as {_type_label(event_hint)}: {expected}"
        )
    ctx_hint = hints.get(params[1].name)
    if ctx_hint is not None and ctx_hint is not Any and ctx_hint is not HandlerContext:
        raise RegistrationError(f"{where} annotates its context as {_type_label(ctx_hint)}: {expected}")
    if "return" in hints and hints["return"] is not type(None):
        raise RegistrationError(f"{where} must return None, not {_type_label(hints['return'])}")


def _type_label(hint: object) -> str:
    return getattr(hint, "__name__", None) or repr(hint)
