"""The ``keel`` command: parses options and calls library functions, nothing more.

Exit codes are named constants: 0 when all went well, 2 for bad options (click's own), and one code
per way a command can fail.
"""

from __future__ import annotations

import click
from rich.console import Console

from keel.demo import DemoError, DemoSettings, Verdict, run_demo
from keel.errors import BackendUnavailable, ConfigurationError, InvalidKeyError
from keel.version import __version__

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


if __name__ == "__main__":
    main()
