"""The ``keel`` command: parses options and calls library functions, nothing more.

Exit codes are named constants: 0 when all went well, 2 for bad options (click's own) and for input the
library refuses, and one code per way a command can fail. ``EXIT_STATUS`` maps each ``keel.ErrorCode`` to
one of them: the one table that decides how an error ends a command.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from keel.app import load_app
from keel.commands import (
    list_dead_letters,
    list_events,
    publish_event,
    read_state,
    resolve_dead_letter,
    send_message,
    trace,
)
from keel.demo import DemoError, DemoSettings, Verdict, run_demo
from keel.errors import BackendUnavailable, ConfigurationError, ErrorCode, InvalidKeyError, KeelError
from keel.observe import configure_logging
from keel.records import HandlerDelivery, parse_target
from keel.version import __version__
from keel.worker import (
    DEFAULT_CONCURRENCY,
    DEFAULT_GRACE_S,
    DEFAULT_LEASE_S,
    WorkerSettings,
    refuse_unshareable,
    serve,
)

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from keel.app import App
    from keel.records import Target

#: Everything went as promised.
RET_OK = 0
#: keel lost an update: the one thing it exists to prevent.
RET_LOST_UPDATES = 1
#: Bad options (click's own code), or input the library refused: a bad URL, id or payload, an unknown name.
RET_USAGE = 2
#: A naive way lost nothing: the demo failed to reproduce the race, so it would be lying.
RET_NAIVE_LOST_NOTHING = 3
#: The command could not run to the end: backend unreachable, a process died, keys in use.
RET_FAILED = 4
#: Stopped by Ctrl-C (128 + SIGINT, as shells report it), told apart from the codes above.
RET_INTERRUPTED = 130

_DEMO_EXIT = {
    Verdict.ok: RET_OK,
    Verdict.keel_lost: RET_LOST_UPDATES,
    Verdict.naive_lost_nothing: RET_NAIVE_LOST_NOTHING,
}

#: How each error ends a command: what the user gave is wrong (RET_USAGE), or the command could not run to the
#: end (RET_FAILED). Every ``ErrorCode`` is here; a test checks it.
EXIT_STATUS: dict[ErrorCode, int] = {
    ErrorCode.error: RET_FAILED,
    ErrorCode.configuration: RET_USAGE,
    ErrorCode.unknown_scheme: RET_USAGE,
    ErrorCode.missing_extra: RET_USAGE,
    ErrorCode.unsafe_location: RET_USAGE,
    ErrorCode.backend_unavailable: RET_FAILED,
    ErrorCode.backend_overloaded: RET_FAILED,
    ErrorCode.invalid_key: RET_USAGE,
    ErrorCode.payload: RET_USAGE,
    ErrorCode.not_serializable: RET_USAGE,
    ErrorCode.payload_too_large: RET_USAGE,
    ErrorCode.payload_validation: RET_USAGE,
    ErrorCode.store: RET_FAILED,
    ErrorCode.stale_write: RET_FAILED,
    ErrorCode.key_not_found: RET_USAGE,
    ErrorCode.contention: RET_FAILED,
    ErrorCode.lease_lost: RET_FAILED,
    ErrorCode.idempotency_conflict: RET_USAGE,
    ErrorCode.registration: RET_USAGE,
    ErrorCode.not_found: RET_USAGE,
    ErrorCode.unknown_workflow: RET_USAGE,
    ErrorCode.message_not_found: RET_USAGE,
    ErrorCode.instance_not_found: RET_USAGE,
    ErrorCode.not_paused: RET_USAGE,
    ErrorCode.turn_failed: RET_FAILED,
    ErrorCode.wait_timeout: RET_FAILED,
    ErrorCode.turn_timeout: RET_FAILED,
    ErrorCode.step_timeout: RET_FAILED,
    ErrorCode.non_retryable: RET_FAILED,
    ErrorCode.step_misuse: RET_FAILED,
    ErrorCode.retry_after: RET_FAILED,
    ErrorCode.demo_failed: RET_FAILED,
}


class CommandFailed(click.ClickException):
    """A failure the user can act on: shown as ``Error: message``, without a traceback or a usage banner."""

    exit_code = RET_FAILED


class InputRefused(CommandFailed):
    """Input the library refused (an unknown name, a bad id or payload): ``Error: message``, exit status 2.

    No usage banner: the options parsed, and the message says what is wrong with their values.
    """

    exit_code = RET_USAGE


_RAISED_AS: dict[int, type[CommandFailed]] = {RET_USAGE: InputRefused, RET_FAILED: CommandFailed}


def exit_status(error: KeelError) -> int:
    """Return the exit status a command that failed with ``error`` ends with (``EXIT_STATUS``)."""
    return EXIT_STATUS[error.code]


def _failed(error: KeelError) -> CommandFailed:
    return _RAISED_AS[exit_status(error)](str(error))


@click.group()
@click.version_option(__version__, prog_name="keel")
def main() -> None:
    """The keel command line: keep agent applications correct when they are scaled out."""


@main.command()
@click.option(
    "--url",
    metavar="URL",
    help="Backend to race on: any keel URL, e.g. sqlite:///demo.db, postgresql://user@host/db, "
    "redis://host:6379/0. Default: a fresh SQLite file in a temporary folder, removed afterwards "
    "(KEEL_URL is not read: the demo writes to a shared backend only when asked).",
)
@click.option("--processes", type=click.IntRange(min=2), default=4, show_default=True, help="Processes racing.")
@click.option(
    "--updates", type=click.IntRange(min=1), default=250, show_default=True, help="Updates per process and way."
)
@click.option(
    "--key",
    metavar="PREFIX",
    help="Prefix of the keys used (PREFIX:get-then-set, PREFIX:update); they must not exist, and are deleted "
    "afterwards. Default: a fresh random prefix.",
)
def demo(url: str | None, processes: int, updates: int, key: str | None) -> None:
    """Show lost updates when a counter is scaled out, and keel losing none.

    Several real processes increment one shared counter at once, three ways: each in its own memory,
    through a shared record read and then written back, and with keel's store.update.

    Exit status: 0 when keel applied every update and both naive ways lost some; 1 if keel lost an
    update (a bug: please report it); 2 for bad options; 3 if a naive way lost nothing (the run then
    proves nothing); 4 if the demo could not run (backend unreachable, a process died, key in use).
    """
    settings = DemoSettings(processes=processes, updates=updates, url=url, key=key)
    try:
        report = run_demo(settings, Console(highlight=False))
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="'--url'") from None
    except InvalidKeyError as exc:
        raise click.BadParameter(str(exc), param_hint="'--key'") from None
    except (BackendUnavailable, DemoError) as exc:
        raise _failed(exc) from None
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        raise SystemExit(RET_INTERRUPTED) from None
    raise SystemExit(_DEMO_EXIT[report.verdict])


def _url_option(fn: Any) -> Any:
    return click.option(
        "--url", metavar="URL", help="Backend URL; default: the app's backend, else KEEL_URL, else sqlite:///keel.db."
    )(fn)


def _load(app_path: str) -> App:
    try:
        return load_app(app_path)
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="'MODULE:APP'") from None


def _shared_url(app: App, url: str | None, command: str) -> str:
    """Return the URL a command that exits uses, refusing ``memory://``: what it wrote would vanish with it."""
    resolved = url or app.backend_url
    try:
        refuse_unshareable(resolved, user=f"`keel {command}`")
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="'--url' (or KEEL_URL)") from None
    return resolved


def _handler_option(fn: Any) -> Any:
    return click.option(
        "--handler",
        metavar="NAME",
        help="Name a handler's delivery of an event: --handler NAME EVENT_ID, instead of WORKFLOW WORKFLOW_ID.",
    )(fn)


def _target(names: tuple[str, ...], handler: str | None) -> Target:
    """Read ``WORKFLOW WORKFLOW_ID``, or ``--handler NAME EVENT_ID``, into what a claim runs."""
    if handler is not None:
        if len(names) != 1:
            raise click.UsageError(f"--handler {handler} takes one EVENT_ID, not {len(names)} argument(s)")
        return HandlerDelivery(handler, names[0])
    if len(names) != 2:
        raise click.UsageError(
            f"name an instance as WORKFLOW WORKFLOW_ID, or a delivery as --handler NAME EVENT_ID; got {len(names)} "
            "argument(s)"
        )
    target = parse_target(*names)
    if isinstance(target, HandlerDelivery):
        # Kept working: dead letters printed this form before --handler existed.
        click.echo(
            f"note: {names[0]} {names[1]} is deprecated; name a delivery as --handler {target.handler} "
            f"{target.event_id}",
            err=True,
        )
    return target


@main.command()
@click.argument("app_path", metavar="MODULE:APP")
@_url_option
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    help="Turns run at once (each of a different instance).",
)
@click.option(
    "--lease-s",
    type=click.FloatRange(min=0.5),
    default=DEFAULT_LEASE_S,
    show_default=True,
    help="Lease length: another worker takes over a crashed one's instances after this.",
)
@click.option(
    "--grace-s",
    type=click.FloatRange(min=0),
    default=DEFAULT_GRACE_S,
    show_default=True,
    help="On SIGTERM or Ctrl-C, how long running turns may finish before they are cancelled.",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option("--log-json", is_flag=True, help="Log one JSON object per line.")
@click.option(
    "--only",
    metavar="NAME",
    multiple=True,
    help="Run only this workflow or handler (repeatable); all of the app's by default.",
)
def worker(
    app_path: str,
    url: str | None,
    concurrency: int,
    lease_s: float,
    grace_s: float,
    log_level: str,
    log_json: bool,
    only: tuple[str, ...],
) -> None:
    """Run MODULE:APP's turns and event handlers, e.g. `keel worker myproject.workflows:app`.

    Any number of workers on any machines can share one backend; each instance runs on one at a time, and each
    event reaches each handler on whichever worker is free. SIGTERM or Ctrl-C stops claiming, lets running turns
    finish within --grace-s, and exits 0.
    """
    app = _load(app_path)
    configure_logging(log_level, json_lines=log_json)
    try:
        settings = WorkerSettings(concurrency=concurrency, lease_s=lease_s, grace_s=grace_s, only=only)
        settings.check_names(app)
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="'--only'") from None
    try:
        asyncio.run(serve(app, url or app.backend_url, settings))
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="'--url'") from None
    except BackendUnavailable as exc:
        raise _failed(exc) from None


@main.command()
@click.argument("app_path", metavar="MODULE:APP")
@click.argument("workflow")
@click.argument("workflow_id")
@click.argument("message", metavar="JSON")
@_url_option
@click.option("--idempotency-key", metavar="KEY", help="Sending again with this key enqueues nothing new.")
@click.option(
    "--delay-s",
    type=click.FloatRange(min=0),
    default=0.0,
    metavar="SECONDS",
    help="A durable timer: the message becomes visible this many seconds from now.",
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Wait this long for the turn to commit, and print the state it committed.",
)
def send(
    app_path: str,
    workflow: str,
    workflow_id: str,
    message: str,
    url: str | None,
    idempotency_key: str | None,
    delay_s: float,
    wait_s: float | None,
) -> None:
    """Send a JSON message to instance WORKFLOW_ID of WORKFLOW; print its message id."""
    app = _load(app_path)
    try:
        payload = json.loads(message)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="'JSON'") from None
    url = _shared_url(app, url, "send")
    sending = send_message(app, url, workflow, workflow_id, payload, idempotency_key, wait_s, delay_s=delay_s)
    result = _run(sending)
    click.echo(result)


@main.command()
@click.argument("app_path", metavar="MODULE:APP")
@click.argument("event_type", metavar="EVENT_TYPE")
@click.argument("payload", metavar="JSON")
@_url_option
@click.option("--idempotency-key", metavar="KEY", help="Publishing again with this key publishes nothing new.")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Wait up to this long for every handler of the event to succeed.",
)
def publish(
    app_path: str, event_type: str, payload: str, url: str | None, idempotency_key: str | None, wait_s: float | None
) -> None:
    """Publish a JSON event of EVENT_TYPE to every handler of it in MODULE:APP; print its event id."""
    app = _load(app_path)
    try:
        document = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="'JSON'") from None
    url = _shared_url(app, url, "publish")
    click.echo(_run(publish_event(app, url, event_type, document, idempotency_key, wait_s)))


@main.command()
@click.argument("app_path", metavar="MODULE:APP")
@click.argument("workflow")
@click.argument("workflow_id")
@_url_option
def state(app_path: str, workflow: str, workflow_id: str, url: str | None) -> None:
    """Print the committed state of instance WORKFLOW_ID of WORKFLOW, with its version, as JSON."""
    app = _load(app_path)
    click.echo(_run(read_state(app, _shared_url(app, url, "state"), workflow, workflow_id)))


@main.command()
@click.argument("app_path", metavar="MODULE:APP")
@_url_option
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
def dead(app_path: str, url: str | None, limit: int) -> None:
    """List MODULE:APP's dead letters, newest first, with their errors and the command that retries each."""
    app = _load(app_path)
    _shared_url(app, url, "dead")
    click.echo(_run(list_dead_letters(app, url, limit, app_path=app_path)))


_TARGET = "WORKFLOW WORKFLOW_ID | --handler NAME EVENT_ID"


@main.command()
@click.argument("app_path", metavar="MODULE:APP")
@click.argument("names", nargs=-1, metavar=_TARGET)
@_handler_option
@_url_option
def retry(app_path: str, names: tuple[str, ...], handler: str | None, url: str | None) -> None:
    """Run the dead message of a paused instance (or a handler's dead delivery) again, before those behind it."""
    app = _load(app_path)
    target = _target(names, handler)
    click.echo(_run(resolve_dead_letter(app, _shared_url(app, url, "retry"), target, skip=False)))


@main.command()
@click.argument("app_path", metavar="MODULE:APP")
@click.argument("names", nargs=-1, metavar=_TARGET)
@_handler_option
@_url_option
def skip(app_path: str, names: tuple[str, ...], handler: str | None, url: str | None) -> None:
    """Drop the dead message of a paused instance (or a handler's dead delivery), recorded as skipped."""
    app = _load(app_path)
    target = _target(names, handler)
    click.echo(_run(resolve_dead_letter(app, _shared_url(app, url, "skip"), target, skip=True)))


@main.command("trace")
@click.argument("app_path", metavar="MODULE:APP")
@click.argument("names", nargs=-1, metavar=_TARGET)
@_handler_option
@_url_option
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="The last N turns.")
@click.option("--json", "as_json", is_flag=True, help="Print the turn records as JSON.")
def trace_command(
    app_path: str, names: tuple[str, ...], handler: str | None, url: str | None, limit: int, as_json: bool
) -> None:
    """Rebuild the timeline of an instance, or of a handler's delivery of an event: each turn and how it ended."""
    app = _load(app_path)
    target = _target(names, handler)
    click.echo(_run(trace(app, _shared_url(app, url, "trace"), target, limit, as_json=as_json)))


@main.command("events")
@click.argument("app_path", metavar="MODULE:APP")
@_url_option
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="The last N events.")
@click.option("--json", "as_json", is_flag=True, help="Print the events as JSON.")
def events_command(app_path: str, url: str | None, limit: int, as_json: bool) -> None:
    """List MODULE:APP's recent events, newest first, with each handler's delivery status."""
    app = _load(app_path)
    click.echo(_run(list_events(app, _shared_url(app, url, "events"), limit, as_json=as_json)))


def _run(coroutine: Coroutine[Any, Any, str]) -> str:
    try:
        return asyncio.run(coroutine)
    except KeelError as exc:
        raise _failed(exc) from None


if __name__ == "__main__":
    main()
