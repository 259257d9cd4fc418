"""The command line at the edges of the contract, run in process: exit statuses, memory://, deliveries by handler."""

from __future__ import annotations

import asyncio
import shlex
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pytest
from click.testing import CliRunner

import keel
from keel.backends import open_backend
from keel.backends.base import StoreOptions, TurnFailure
from keel.cli import EXIT_STATUS, RET_FAILED, RET_USAGE, exit_status, main
from keel.commands import list_dead_letters
from keel.events import build_event
from tests.processes.workflows import Placed
from tests.processes.workflows import app as process_app

if TYPE_CHECKING:
    from pathlib import Path

APP_PATH = "tests.processes.workflows:app"


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def test_every_error_code_has_one_exit_status() -> None:
    assert set(EXIT_STATUS) == set(keel.ErrorCode)
    assert set(EXIT_STATUS.values()) == {RET_USAGE, RET_FAILED}
    # The statuses the command-line tests assert: lookups and refused input 2, failures 4.
    refused: tuple[keel.KeelError, ...] = (
        keel.InstanceNotFoundError("counter", "c1"),
        keel.MessageNotFoundError("a", "m1"),
        keel.NotPausedError("counter/c1"),
        keel.UnknownWorkflowError("a", "x", []),
        keel.ConfigurationError("bad"),
        keel.InvalidKeyError("", "empty"),
        keel.IdempotencyConflictError("k1", "m1", app="a", workflow="counter", workflow_id="c1"),
    )
    for error in refused:
        assert exit_status(error) == RET_USAGE, error
    failed: tuple[keel.KeelError, ...] = (
        keel.BackendUnavailable("redis://h", "down"),
        keel.TurnFailedError("counter/c1", "m1", "boom"),
        keel.WaitTimeoutError("counter/c1", "m1", 1.0),
    )
    for error in failed:
        assert exit_status(error) == RET_FAILED, error


@pytest.mark.parametrize(
    "args",
    [
        ["send", APP_PATH, "counter", "c1", '{"seq": 1}'],
        ["publish", APP_PATH, "Relayed", '{"target": "t", "ledger": "l"}'],
        ["state", APP_PATH, "counter", "c1"],
        ["dead", APP_PATH],
        ["retry", APP_PATH, "counter", "c1"],
        ["skip", APP_PATH, "--handler", "confirm", "e1"],
        ["trace", APP_PATH, "counter", "c1"],
        ["events", APP_PATH],
    ],
    ids=lambda args: args[0],
)
@pytest.mark.parametrize("how", ["--url", "KEEL_URL"])
def test_every_command_that_exits_refuses_memory(args: list[str], how: str) -> None:
    env = {"KEEL_URL": "memory://"} if how == "KEEL_URL" else None
    status, stdout, stderr = run(*args, *(["--url", "memory://"] if how == "--url" else []), env=env)
    assert status == RET_USAGE, stdout
    assert f"`keel {args[0]}` cannot use memory://" in stderr
    assert "what it writes would vanish when the command exits" in stderr
    assert stdout == ""  # no message id printed for a message that would vanish


def test_an_idempotency_key_sent_again_with_other_json_exits_2_naming_key_instance_and_first_id(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'keel.db'}"
    send = ("send", APP_PATH, "counter", "c1", "--url", url, "--idempotency-key", "k1")
    status, first, stderr = run(*send[:4], '{"seq": 1}', *send[4:])
    assert status == 0, stderr
    assert run(*send[:4], '{"seq": 1}', *send[4:])[:2] == (0, first)  # the same JSON: the first id, silently
    status, stdout, stderr = run(*send[:4], '{"seq": 2}', *send[4:])
    assert (status, stdout) == (RET_USAGE, "")
    assert "idempotency key 'k1' was used before for instance counter/c1" in stderr
    assert first.strip() in stderr and "nothing was sent" in stderr and "Usage:" not in stderr

    publish = ("publish", APP_PATH, "Relayed", "--url", url, "--idempotency-key", "e1")
    status, event_id, stderr = run(*publish[:3], '{"target": "t", "ledger": "l"}', *publish[3:])
    assert status == 0, stderr
    status, stdout, stderr = run(*publish[:3], '{"target": "u", "ledger": "l"}', *publish[3:])
    assert (status, stdout) == (RET_USAGE, "")
    assert "idempotency key 'e1' was used before in app 'process-tests'" in stderr
    assert event_id.strip() in stderr and "nothing was published" in stderr


def test_state_of_an_unknown_instance_says_so_without_a_usage_banner(tmp_path: Path) -> None:
    status, _, stderr = run("state", APP_PATH, "counter", "nobody", "--url", f"sqlite:///{tmp_path / 'k.db'}")
    assert status == RET_USAGE
    assert "has no committed state" in stderr
    assert "Usage:" not in stderr and "--help" not in stderr


def test_a_wait_that_times_out_names_the_backend_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a client started in another folder than the worker's: a new ./keel.db
    monkeypatch.delenv("KEEL_URL", raising=False)
    status, stdout, stderr = run("send", APP_PATH, "counter", "c1", '{"seq": 1}', "--wait", "0.2")
    assert status == RET_FAILED
    assert len(stdout.strip()) == 0
    assert "was not committed within 0.2 s" in stderr
    assert f"on sqlite:///{tmp_path.resolve() / 'keel.db'}" in stderr


async def _dead_delivery(url: str) -> str:
    """Publish a Placed event to handler confirm alone and dead-letter its delivery, as a worker would."""
    backend = await open_backend(url, StoreOptions())
    try:
        event = build_event(
            process_app.name,
            Placed(order_id="o1", ledger="-", emitted_by_attempt=1),
            ["confirm"],
            event_id="ev1",
            max_bytes=10_000,
        )
        await backend.publish(event)
        [claim] = await backend.claim(process_app.name, ["on/confirm"], worker="w:1", lease_s=10, limit=1)
        now = datetime.now(UTC)
        await backend.fail_turn(TurnFailure(claim, "RuntimeError: the mail server said no", "w:1", now, 0.01))
    finally:
        await backend.aclose()
    return event.event_id


def test_dead_prints_the_exact_command_that_retries_a_delivery_by_handler(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dead.db'}"
    event_id = asyncio.run(_dead_delivery(url))
    status, listed, _ = run("dead", APP_PATH, "--url", url)
    assert status == 0
    assert f"handler confirm  event {event_id}" in listed
    hint = f"keel retry {APP_PATH} --handler confirm {event_id} --url {url}"
    assert f"  {hint} runs it again; keel skip drops it" in listed

    status, traced, stderr = run("trace", APP_PATH, "--handler", "confirm", event_id, "--url", url)
    assert status == 0, stderr
    assert traced.startswith(f"handler confirm on event {event_id}: 1 turn record(s)\n")
    assert " -> " not in traced and "v0" not in traced
    assert "the mail server said no" in traced

    status, retried, stderr = run(*shlex.split(hint)[1:])  # the very command printed
    assert status == 0, stderr
    assert retried.strip() == f"event {event_id} will be delivered to handler confirm again"
    status, _, stderr = run("skip", APP_PATH, "--handler", "confirm", event_id, "--url", url)
    assert status == RET_USAGE and "is not paused" in stderr


def test_the_old_on_name_form_still_works_with_a_note(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    event_id = asyncio.run(_dead_delivery(url))
    status, stdout, stderr = run("skip", APP_PATH, "on/confirm", event_id, "--url", url)
    assert status == 0, stderr
    assert stdout.startswith("skipped message")
    assert f"note: on/confirm {event_id} is deprecated; name a delivery as --handler confirm {event_id}" in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["retry", APP_PATH, "--handler", "nobody", "e1"],
            "has no handler 'nobody'; registered handlers: bill, confirm",
        ),
        (["retry", APP_PATH, "--handler", "confirm"], "--handler confirm takes one EVENT_ID, not 0 argument(s)"),
        (["trace", APP_PATH, "--handler", "confirm", "a", "b"], "takes one EVENT_ID, not 2 argument(s)"),
        (["skip", APP_PATH, "counter"], "name an instance as WORKFLOW WORKFLOW_ID, or a delivery as --handler"),
    ],
)
def test_a_target_named_wrongly_gets_a_clear_error(tmp_path: Path, args: list[str], message: str) -> None:
    status, _, stderr = run(*args, "--url", f"sqlite:///{tmp_path / 'k.db'}")
    assert status == RET_USAGE
    assert message in stderr


async def test_the_retry_hint_masks_a_password(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'masked.db'}"
    await _dead_delivery(url)
    listed = await list_dead_letters(process_app, url.replace("sqlite:///", "sqlite://user:secret@/"), 5)
    assert "secret" not in listed and "user:***@" in listed
