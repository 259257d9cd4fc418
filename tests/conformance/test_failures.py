"""Nothing fails silently, nothing is done twice (G4, G6): steps, timeouts, retries, dead letters, drift."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import Counter
from typing import TYPE_CHECKING

import pytest
from pydantic import BaseModel

import keel
from keel.backends import open_backend
from keel.backends.base import InstanceRef, StoreOptions
from tests.conformance.test_runtime import running_worker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

#: Calls of side effects, counted outside keel, per test run: a step must not run twice.
LEDGER: Counter[str] = Counter()
FAST = keel.RetryPolicy(max_attempts=3, initial_delay_s=0.05, max_delay_s=0.2)


class Job(BaseModel):
    kind: str
    run: str = ""


class Quote(BaseModel):
    price: int
    currency: str = "EUR"


class JobState(BaseModel):
    done: list[str] = []
    quote: Quote | None = None
    thread: str = ""


def charge(run: str) -> Quote:
    """A sync side effect: it must run in a thread, once per message."""
    LEDGER[f"{run}:charge"] += 1
    return Quote(price=42)


async def lookup(run: str, key: str) -> dict[str, int]:
    LEDGER[f"{run}:lookup"] += 1
    return {key: 7}


async def do_steps(ctx: keel.TurnContext[JobState], msg: Job) -> None:
    quote = await ctx.step("charge", charge, msg.run)
    assert isinstance(quote, Quote)  # typed on the first run and on replay alike
    found = await ctx.step("lookup", lookup, msg.run, key="k")
    ctx.state.quote = quote
    ctx.state.done.append(f"{found['k']}")
    if ctx.attempt == 1:
        raise ConnectionError("the network blinked after the steps")


async def do_thread(ctx: keel.TurnContext[JobState], msg: Job) -> None:
    ctx.state.thread = await ctx.step("where", lambda: threading.current_thread().name)


async def do_same_name(ctx: keel.TurnContext[JobState], msg: Job) -> None:
    await ctx.step("twice", lookup, msg.run, key="a")
    await ctx.step("twice", lookup, msg.run, key="b")


async def do_not_json(ctx: keel.TurnContext[JobState], msg: Job) -> None:
    await ctx.step("obj", lambda: object())


async def do_flaky(ctx: keel.TurnContext[JobState], msg: Job) -> None:
    if LEDGER[f"{msg.run}:attempt"] < 3:
        raise ConnectionError(f"attempt {LEDGER[f'{msg.run}:attempt']} failed")


async def do_always(ctx: keel.TurnContext[JobState], msg: Job) -> None:
    raise RuntimeError("this never works")


async def do_non_retryable(ctx: keel.TurnContext[JobState], msg: Job) -> None:
    raise keel.NonRetryable("the account is closed")


async def do_retry_after(ctx: keel.TurnContext[JobState], msg: Job) -> None:
    if LEDGER[f"{msg.run}:attempt"] == 1:
        raise keel.RetryAfter(0.6, "rate limited")


async def do_hang(ctx: keel.TurnContext[JobState], msg: Job) -> None:
    await asyncio.sleep(60)


async def do_nothing(ctx: keel.TurnContext[JobState], msg: Job) -> None:
    return None


BEHAVIOURS = {
    "steps": do_steps,
    "thread": do_thread,
    "same-name": do_same_name,
    "not-json": do_not_json,
    "flaky": do_flaky,
    "always": do_always,
    "non-retryable": do_non_retryable,
    "retry-after": do_retry_after,
    "hang": do_hang,
}


def make_app(url: str) -> keel.App:
    app = keel.App(f"fail-{uuid.uuid4().hex[:8]}", backend=url, retry=FAST)

    @app.workflow(state=JobState, message=Job, timeout_s=1.5, step_timeout_s=5.0)
    async def job(ctx: keel.TurnContext[JobState], msg: Job) -> None:
        LEDGER[f"{msg.run}:attempt"] += 1
        await BEHAVIOURS.get(msg.kind, do_nothing)(ctx, msg)
        ctx.state.done.append(msg.kind)

    return app


@pytest.fixture
def app(backend_url: str) -> keel.App:
    return make_app(backend_url)


@pytest.fixture
async def client(app: keel.App, backend_url: str) -> AsyncIterator[keel.Client]:
    async with app.client() as opened, running_worker(app, backend_url):
        yield opened


async def turn_outcomes(url: str, app: keel.App, workflow_id: str) -> list[tuple[str, int]]:
    backend = await open_backend(url, StoreOptions())
    try:
        turns = await backend.turns(InstanceRef(app.name, "job", workflow_id), limit=20)
    finally:
        await backend.aclose()
    return [(t.outcome, t.attempt) for t in reversed(turns)]


async def test_a_retried_turn_replays_its_steps_instead_of_running_them_again(
    client: keel.Client, app: keel.App, backend_url: str
) -> None:
    run = uuid.uuid4().hex
    message_id = await client.send("job", "s", Job(kind="steps", run=run))
    assert await client.wait("job", "s", message_id, timeout_s=15) == 1
    assert (LEDGER[f"{run}:attempt"], LEDGER[f"{run}:charge"], LEDGER[f"{run}:lookup"]) == (2, 1, 1)
    state = await client.state("job", "s")
    assert state is not None
    assert state.value.quote == Quote(price=42)
    assert state.value.done == ["7", "steps"]  # the failed attempt's changes were never committed
    assert await turn_outcomes(backend_url, app, "s") == [("retry", 1), ("committed", 2)]


async def test_a_sync_step_runs_in_a_thread(client: keel.Client) -> None:
    message_id = await client.send("job", "t", Job(kind="thread"))
    await client.wait("job", "t", message_id, timeout_s=15)
    state = await client.state("job", "t")
    assert state is not None
    assert state.value.thread not in ("", threading.main_thread().name)


@pytest.mark.parametrize(("kind", "error"), [("same-name", "used twice"), ("not-json", "not JSON-serialisable")])
async def test_misused_steps_dead_letter_at_once(
    client: keel.Client, app: keel.App, backend_url: str, kind: str, error: str
) -> None:
    message_id = await client.send("job", kind, Job(kind=kind, run=uuid.uuid4().hex))
    with pytest.raises(keel.TurnFailedError, match=error):
        await client.wait("job", kind, message_id, timeout_s=15)
    assert await turn_outcomes(backend_url, app, kind) == [("failed", 1)]


async def test_a_flaky_turn_is_retried_with_backoff_until_it_commits(
    client: keel.Client, app: keel.App, backend_url: str
) -> None:
    run = uuid.uuid4().hex
    message_id = await client.send("job", "f", Job(kind="flaky", run=run))
    assert await client.wait("job", "f", message_id, timeout_s=15) == 1
    assert await turn_outcomes(backend_url, app, "f") == [("retry", 1), ("retry", 2), ("committed", 3)]


async def test_retry_after_sets_the_delay(client: keel.Client, backend_url: str, app: keel.App) -> None:
    run = uuid.uuid4().hex
    message_id = await client.send("job", "r", Job(kind="retry-after", run=run))
    await client.wait("job", "r", message_id, timeout_s=15)
    backend = await open_backend(backend_url, StoreOptions())
    try:
        first, second = reversed(await backend.turns(InstanceRef(app.name, "job", "r"), limit=5))
    finally:
        await backend.aclose()
    assert (first.outcome, second.outcome) == ("retry", "committed")
    assert "rate limited" in (first.error or "")
    assert (second.started_at - first.started_at).total_seconds() >= 0.55


async def test_non_retryable_dead_letters_at_once_and_pauses_the_instance(
    client: keel.Client, app: keel.App, backend_url: str
) -> None:
    dead = await client.send("job", "n", Job(kind="non-retryable"))
    later = await client.send("job", "n", Job(kind="ok"))
    with pytest.raises(keel.TurnFailedError, match="the account is closed"):
        await client.wait("job", "n", dead, timeout_s=15)
    assert await turn_outcomes(backend_url, app, "n") == [("failed", 1)]
    with pytest.raises(keel.WaitTimeoutError):
        await client.wait("job", "n", later, timeout_s=0.5)
    [letter] = await client.dead_letters()
    assert (letter.message_id, letter.attempts, letter.instance.workflow_id) == (dead, 1, "n")
    assert "NonRetryable" in letter.error


async def test_attempts_run_out_then_retry_resumes_the_instance_in_order(
    client: keel.Client, app: keel.App, backend_url: str
) -> None:
    dead = await client.send("job", "a", Job(kind="always"))
    later = await client.send("job", "a", Job(kind="ok"))
    with pytest.raises(keel.TurnFailedError, match="this never works"):
        await client.wait("job", "a", dead, timeout_s=15)
    assert await turn_outcomes(backend_url, app, "a") == [("retry", 1), ("retry", 2), ("failed", 3)]
    assert await client.retry("job", "a") == dead  # it fails again, three more attempts: nothing overtakes it
    with pytest.raises(keel.TurnFailedError):
        await client.wait("job", "a", dead, timeout_s=15)
    with pytest.raises(keel.WaitTimeoutError):
        await client.wait("job", "a", later, timeout_s=0.3)
    assert await client.skip("job", "a") == dead
    assert await client.wait("job", "a", later, timeout_s=15) == 1
    with pytest.raises(keel.TurnFailedError, match="skipped"):
        await client.wait("job", "a", dead, timeout_s=1)
    state = await client.state("job", "a")
    assert state is not None
    assert state.value.done == ["ok"]
    assert await client.dead_letters() == []
    with pytest.raises(keel.NotPausedError):
        await client.retry("job", "a")


async def test_a_hung_turn_times_out_as_a_failed_attempt(client: keel.Client) -> None:
    message_id = await client.send("job", "h", Job(kind="hang"))
    with pytest.raises(keel.TurnFailedError, match="timeout") as caught:
        await client.wait("job", "h", message_id, timeout_s=40)
    assert "TurnTimeoutError" in caught.value.error


async def test_a_hung_step_times_out_as_a_failed_attempt(backend_url: str) -> None:
    app = keel.App(f"hang-{uuid.uuid4().hex[:8]}", backend=backend_url, retry=keel.RetryPolicy(max_attempts=1))

    @app.workflow(state=JobState, message=Job, step_timeout_s=0.3)
    async def job(ctx: keel.TurnContext[JobState], msg: Job) -> None:
        await ctx.step("hang", asyncio.sleep, 60)

    async with app.client() as client, running_worker(app, backend_url):
        message_id = await client.send("job", "hs", Job(kind="hang-step"))
        with pytest.raises(keel.TurnFailedError, match=r"step 'hang' ran past its timeout of 0\.3 s"):
            await client.wait("job", "hs", message_id, timeout_s=15)


class StateV1(BaseModel):
    count: int = 0


class StateV2(BaseModel):
    total: int = 0
    unit: str


class Bump(BaseModel):
    by: int = 1


def versioned_app(name: str, url: str, state: type[BaseModel], *, migrate: object = None) -> keel.App:
    app = keel.App(name, backend=url, retry=FAST)

    async def counter(ctx, msg: Bump) -> None:  # type: ignore[no-untyped-def]
        if isinstance(ctx.state, StateV1):
            ctx.state.count += msg.by
        elif isinstance(ctx.state, StateV2):
            ctx.state.total += msg.by

    app.workflow(state=state, message=Bump, name="counter", migrate=migrate)(counter)  # type: ignore[arg-type]
    return app


async def test_state_drift_pauses_the_instance_and_migrate_upgrades_it(backend_url: str) -> None:
    name = f"drift-{uuid.uuid4().hex[:8]}"
    old = versioned_app(name, backend_url, StateV1)
    async with old.client() as client, running_worker(old, backend_url):
        await client.wait("counter", "c", await client.send("counter", "c", Bump(by=3)), timeout_s=15)

    new = versioned_app(name, backend_url, StateV2)  # a deployment changed the model, without migrate=
    async with new.client() as client, running_worker(new, backend_url):
        stuck = await client.send("counter", "c", Bump(by=1))
        with pytest.raises(keel.TurnFailedError, match="unit") as caught:
            await client.wait("counter", "c", stuck, timeout_s=15)
        assert "migrate=" in caught.value.error

    def upgrade(document: dict[str, int]) -> dict[str, object]:
        return {"total": document["count"], "unit": "items"}

    fixed = versioned_app(name, backend_url, StateV2, migrate=upgrade)
    async with fixed.client() as client, running_worker(fixed, backend_url):
        assert await client.retry("counter", "c") == stuck
        assert await client.wait("counter", "c", stuck, timeout_s=15) == 2
        state = await client.state("counter", "c")
    assert state is not None
    assert state.value == StateV2(total=4, unit="items")
