"""The ``keel`` command: parses options and calls library functions, nothing more.

Exit codes are named constants: 0 when all went well, 2 for bad options (click's own), and one code
per way a command can fail.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from keel.app import load_app
from keel.commands import (
    InstanceNotFoundError,
    list_dead_letters,
    list_events,
    publish_event,
    read_state,
    resolve_dead_letter,
    send_message,
    trace,
)
from keel.demo import DemoError, DemoSettings, Verdict, run_demo
from keel.errors import (
    BackendUnavailable,
    ConfigurationError,
    InvalidKeyError,
    MessageNotFoundError,
    NotPausedError,
    PayloadError,
    TurnFailedError,
    UnknownWorkflowError,
    WaitTimeoutError,
)
from keel.observe import configure_logging
from keel.version import __version__
from keel.worker import DEFAULT_CONCURRENCY, DEFAULT_GRACE_S, DEFAULT_LEASE_S, WorkerSettings, serve

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from keel.app import App

#: Everything went as promised.
RET_OK = 0
#: keel lost an update: the one thing it exists to prevent.
RET_LOST_UPDATES = 1
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


class CommandFailed(click.ClickException):
    """A failure the user can act on: shown as ``Error: message``, without a traceback."""

    exit_code = RET_FAILED


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
        raise CommandFailed(str(exc)) from None
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
        raise CommandFailed(str(exc)) from None


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
    click.echo(_run(publish_event(app, url, event_type, document, idempotency_key, wait_s)))


@main.command()
@click.argument("app_path", metavar="MODULE:APP")
@click.argument("workflow")
@click.argument("workflow_id")
@_url_option
def state(app_path: str, workflow: str, workflow_id: str, url: str | None) -> None:
    """Print the committed state of instance WORKFLOW_ID of WORKFLOW, with its version, as JSON."""
    app = _load(app_path)
    click.echo(_run(read_state(app, url, workflow, workflow_id)))


@main.command()
@click.argument("app_path", metavar="MODULE:APP")
@_url_option
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
def dead(app_path: str, url: str | None, limit: int) -> None:
    """List MODULE:APP's dead letters, newest first, with their errors."""
    click.echo(_run(list_dead_letters(_load(app_path), url, limit)))


@main.command()
@click.argument("app_path", metavar="MODULE:APP")
@click.argument("workflow")
@click.argument("workflow_id")
@_url_option
def retry(app_path: str, workflow: str, workflow_id: str, url: str | None) -> None:
    """Run the dead message of a paused instance again, before the messages that wait behind it."""
    click.echo(_run(resolve_dead_letter(_load(app_path), url, workflow, workflow_id, skip=False)))


@main.command()
@click.argument("app_path", metavar="MODULE:APP")
@click.argument("workflow")
@click.argument("workflow_id")
@_url_option
def skip(app_path: str, workflow: str, workflow_id: str, url: str | None) -> None:
    """Drop the dead message of a paused instance (recorded as skipped) and let the instance go on."""
    click.echo(_run(resolve_dead_letter(_load(app_path), url, workflow, workflow_id, skip=True)))


@main.command("trace")
@click.argument("app_path", metavar="MODULE:APP")
@click.argument("workflow")
@click.argument("workflow_id")
@_url_option
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="The last N turns.")
@click.option("--json", "as_json", is_flag=True, help="Print the turn records as JSON.")
def trace_command(app_path: str, workflow: str, workflow_id: str, url: str | None, limit: int, as_json: bool) -> None:
    """Rebuild the timeline of instance WORKFLOW_ID of WORKFLOW: every turn, who ran it, how it ended."""
    click.echo(_run(trace(_load(app_path), url, workflow, workflow_id, limit, as_json=as_json)))


@main.command("events")
@click.argument("app_path", metavar="MODULE:APP")
@_url_option
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="The last N events.")
@click.option("--json", "as_json", is_flag=True, help="Print the events as JSON.")
def events_command(app_path: str, url: str | None, limit: int, as_json: bool) -> None:
    """List MODULE:APP's recent events, newest first, with each handler's delivery status."""
    click.echo(_run(list_events(_load(app_path), url, limit, as_json=as_json)))


def _run(coroutine: Coroutine[Any, Any, str]) -> str:
    try:
        return asyncio.run(coroutine)
    except (
        UnknownWorkflowError,
        InstanceNotFoundError,
        MessageNotFoundError,
        NotPausedError,
        PayloadError,
        InvalidKeyError,
        ConfigurationError,
    ) as exc:
        raise click.UsageError(str(exc)) from None
    except (BackendUnavailable, TurnFailedError, WaitTimeoutError) as exc:
        raise CommandFailed(str(exc)) from None


if __name__ == "__main__":
    main()
