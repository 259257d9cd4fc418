"""The store's contract, run on every engine: memory, sqlite, postgres, redis."""

from __future__ import annotations

import asyncio
import itertools
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

import keel
from keel.identity import process_identity


class LoanState(BaseModel):
    step: int = 0
    approved: bool = False
    notes: list[str] = []


async def test_missing_key_reads_as_none(store: keel.Store) -> None:
    assert await store.get("nothing-here") is None
    assert await store.history("nothing-here") == []


async def test_create_then_read(store: keel.Store) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    written = await store.put("loan:1", {"step": 1}, expected_version=None)
    assert written.version == 1
    assert written.value == {"step": 1}
    read = await store.get("loan:1")
    assert read is not None
    assert (read.value, read.version, read.writer) == ({"step": 1}, 1, process_identity())
    assert re.fullmatch(r".+:\d+", read.writer)
    assert read.written_at.tzinfo is not None
    assert before <= read.written_at <= datetime.now(UTC) + timedelta(seconds=5)
    assert read.written_at == written.written_at


async def test_compare_and_swap_succeeds_on_the_current_version(store: keel.Store) -> None:
    v1 = await store.put("k", {"n": 1}, expected_version=None)
    v2 = await store.put("k", {"n": 2}, expected_version=v1.version)
    assert v2.version == 2
    current = await store.get("k")
    assert current is not None
    assert (current.value, current.version) == ({"n": 2}, 2)


async def test_stale_write_is_rejected_and_changes_nothing(store: keel.Store) -> None:
    await store.put("k", {"n": 1}, expected_version=None)
    await store.put("k", {"n": 2}, expected_version=1)
    with pytest.raises(keel.StaleWriteError) as caught:
        await store.put("k", {"n": 99}, expected_version=1)
    error = caught.value
    assert (error.key, error.expected_version, error.actual_version) == ("k", 1, 2)
    assert "'k'" in str(error) and "version 1" in str(error) and "version 2" in str(error)
    current = await store.get("k")
    assert current is not None
    assert (current.value, current.version) == ({"n": 2}, 2)
    assert [h.version for h in await store.history("k")] == [2, 1]


async def test_create_only_refuses_an_existing_key(store: keel.Store) -> None:
    await store.put("k", "first", expected_version=None)
    with pytest.raises(keel.StaleWriteError) as caught:
        await store.put("k", "second", expected_version=None)
    assert (caught.value.expected_version, caught.value.actual_version) == (None, 1)
    current = await store.get("k")
    assert current is not None
    assert current.value == "first"


async def test_swap_of_a_missing_key_is_stale(store: keel.Store) -> None:
    with pytest.raises(keel.StaleWriteError) as caught:
        await store.put("absent", 1, expected_version=3)
    assert (caught.value.expected_version, caught.value.actual_version) == (3, None)
    assert await store.get("absent") is None


async def test_delete_leaves_a_tombstone_and_versions_are_never_reused(store: keel.Store) -> None:
    await store.put("k", "a", expected_version=None)
    await store.put("k", "b", expected_version=1)
    await store.delete("k", expected_version=2)
    assert await store.get("k") is None
    history = await store.history("k")
    assert [(h.version, h.deleted, h.value) for h in history] == [(3, True, None), (2, False, "b"), (1, False, "a")]
    # A re-create continues from the tombstone: the old version 1 or 2 can never match the new value.
    recreated = await store.put("k", "c", expected_version=None)
    assert recreated.version == 4
    for old in (1, 2, 3):
        with pytest.raises(keel.StaleWriteError):
            await store.put("k", "stale", expected_version=old)
    assert (await store.put("k", "d", expected_version=4)).version == 5


async def test_delete_of_a_stale_or_missing_key_changes_nothing(store: keel.Store) -> None:
    with pytest.raises(keel.StaleWriteError):
        await store.delete("absent", expected_version=1)
    await store.put("k", 1, expected_version=None)
    await store.put("k", 2, expected_version=1)
    with pytest.raises(keel.StaleWriteError) as caught:
        await store.delete("k", expected_version=1)
    assert caught.value.actual_version == 2
    current = await store.get("k")
    assert current is not None
    assert (current.value, current.version) == (2, 2)
    await store.delete("k", expected_version=2)
    with pytest.raises(keel.StaleWriteError):
        await store.delete("k", expected_version=3)  # the tombstone's version is not a live version


async def test_history_is_newest_first_and_honours_limit(store: keel.Store) -> None:
    for n in range(1, 6):
        await store.put("k", {"n": n}, expected_version=None if n == 1 else n - 1)
    history = await store.history("k")
    assert [h.version for h in history] == [5, 4, 3, 2, 1]
    assert [h.value for h in history] == [{"n": n} for n in (5, 4, 3, 2, 1)]
    assert all(h.writer == process_identity() for h in history)
    assert all(a.written_at >= b.written_at for a, b in itertools.pairwise(history))
    assert [h.version for h in await store.history("k", limit=2)] == [5, 4]


async def test_history_retention_keeps_the_last_n(backend_url: str) -> None:
    async with keel.open_store(backend_url, history_limit=3) as store:
        for _ in range(1, 8):
            await store.update("k", lambda v: v + 1, default=0)
        assert [h.version for h in await store.history("k")] == [7, 6, 5]
        assert [h.value for h in await store.history("k")] == [7, 6, 5]


async def test_history_limit_zero_keeps_only_the_current_value(backend_url: str) -> None:
    async with keel.open_store(backend_url, history_limit=0) as store:
        for _ in range(4):
            await store.update("k", lambda v: v + 1, default=0)
        history = await store.history("k")
        assert [(h.version, h.value) for h in history] == [(4, 4)]


async def test_typed_round_trip(store: keel.Store) -> None:
    state = LoanState(step=2, approved=True, notes=["ok"])
    written = await store.put("loan:7", state, expected_version=None)
    assert written.value == state
    read = await store.get("loan:7", model=LoanState)
    assert read is not None
    assert isinstance(read.value, LoanState)
    assert read.value == state
    plain = await store.get("loan:7")
    assert plain is not None
    assert plain.value == {"step": 2, "approved": True, "notes": ["ok"]}


async def test_typed_update_receives_and_returns_models(store: keel.Store) -> None:
    def advance(s: LoanState) -> LoanState:
        assert isinstance(s, LoanState)
        s.step += 1
        return s

    first = await store.update("loan:8", advance, default=LoanState(), model=LoanState)
    second = await store.update("loan:8", advance, model=LoanState)
    assert isinstance(second.value, LoanState)
    assert (first.version, second.version, second.value.step) == (1, 2, 2)


async def test_typed_read_of_a_value_that_does_not_fit(store: keel.Store) -> None:
    await store.put("loan:9", {"step": "not a number"}, expected_version=None)
    with pytest.raises(keel.PayloadValidationError, match="step"):
        await store.get("loan:9", model=LoanState)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ключ:λ:🚀", {"текст": "héllo wörld ✓", "emoji": "🙂", "cjk": "漢字"}),
        ("k", ["nested", {"a": [1, 2.5, None, True]}, ""]),
        ("quote\"s and 'apostrophes' {braces} [x] %s ;--", "value with \\ backslash and \u2028"),
        ("n", 0),
        ("null", None),
    ],
)
async def test_unicode_and_json_values_round_trip(store: keel.Store, key: str, value: Any) -> None:
    await store.put(key, value, expected_version=None)
    read = await store.get(key)
    assert read is not None
    assert read.value == value
    assert (await store.history(key))[0].value == value


async def test_large_value_round_trips(store: keel.Store) -> None:
    big = {"blob": "x" * (1024 * 1024 - 100)}
    await store.put("big", big, expected_version=None)
    read = await store.get("big")
    assert read is not None
    assert read.value == big


async def test_value_over_the_size_limit_is_refused(store: keel.Store) -> None:
    await store.put("k", "small", expected_version=None)
    with pytest.raises(keel.PayloadTooLargeError) as caught:
        await store.put("k", "é" * (600 * 1024), expected_version=1)  # 1.2 MB as UTF-8, 600 K characters
    assert caught.value.size_bytes > caught.value.limit_bytes == 1024 * 1024
    current = await store.get("k")
    assert current is not None
    assert (current.value, current.version) == ("small", 1)


async def test_size_limit_is_configurable(backend_url: str) -> None:
    async with keel.open_store(backend_url, max_value_bytes=100) as store:
        await store.put("k", "x" * 90, expected_version=None)
        with pytest.raises(keel.PayloadTooLargeError, match="100 bytes"):
            await store.update("k", lambda v: v + "x" * 20)
        current = await store.get("k")
        assert current is not None
        assert current.version == 1


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "empty"),
        ("k" * 256, "255"),
        ("line\nbreak", "printable"),
        ("nul\x00byte", "printable"),
        ("tab\there", "printable"),
        (42, "str"),
        (None, "str"),
    ],
)
async def test_bad_keys_are_refused_everywhere(store: keel.Store, key: Any, reason: str) -> None:
    for call in (
        lambda: store.get(key),
        lambda: store.put(key, 1, expected_version=None),
        lambda: store.update(key, lambda v: v, default=0),
        lambda: store.history(key),
        lambda: store.delete(key, expected_version=1),
    ):
        with pytest.raises(keel.InvalidKeyError, match=reason):
            await call()


async def test_longest_key_is_accepted(store: keel.Store) -> None:
    key = "k" * 255
    await store.put(key, 1, expected_version=None)
    assert (await store.get(key)) is not None


@pytest.mark.parametrize("value", [object(), {1, 2}, math.nan, {"a": math.inf}, b"bytes", {"when": datetime.now(UTC)}])
async def test_values_that_are_not_json_are_refused(store: keel.Store, value: Any) -> None:
    await store.put("k", {"ok": True}, expected_version=None)
    with pytest.raises(keel.NotSerializableError, match="JSON") as caught:
        await store.put("k", value, expected_version=1)
    assert isinstance(caught.value, TypeError)
    with pytest.raises(keel.NotSerializableError):
        await store.update("k", lambda _: value)
    current = await store.get("k")
    assert current is not None
    assert (current.value, current.version) == ({"ok": True}, 1)


@pytest.mark.parametrize("expected", [0, -1, "1", True, 1.0])
async def test_bad_expected_versions_are_refused(store: keel.Store, expected: Any) -> None:
    with pytest.raises(keel.ConfigurationError, match="expected_version"):
        await store.put("k", 1, expected_version=expected)
    with pytest.raises(keel.ConfigurationError, match="expected_version"):
        await store.delete("k", expected_version=expected)
    assert await store.get("k") is None


async def test_history_limit_argument_is_checked(store: keel.Store) -> None:
    with pytest.raises(keel.ConfigurationError, match="limit"):
        await store.history("k", limit=0)


async def test_update_creates_from_default_and_increments(store: keel.Store) -> None:
    first = await store.update("counter", lambda n: n + 1, default=0)
    second = await store.update("counter", lambda n: n + 1, default=0)
    assert (first.value, first.version, second.value, second.version) == (1, 1, 2, 2)


async def test_update_of_a_missing_key_without_default_raises(store: keel.Store) -> None:
    with pytest.raises(keel.KeyNotFoundError, match="default="):
        await store.update("absent", lambda n: n + 1)
    assert await store.get("absent") is None


async def test_update_does_not_mutate_the_default(store: keel.Store) -> None:
    default: dict[str, list[int]] = {"items": []}

    def append(value: dict[str, list[int]]) -> dict[str, list[int]]:
        value["items"].append(1)
        return value

    await store.update("k", append, default=default)
    assert default == {"items": []}


async def test_update_accepts_an_async_function(store: keel.Store) -> None:
    async def slow_increment(n: int) -> int:
        await asyncio.sleep(0)
        return n + 1

    result = await store.update("k", slow_increment, default=10)
    assert result.value == 11


async def test_update_retries_on_conflict_with_the_new_value(store: keel.Store) -> None:
    await store.put("k", 0, expected_version=None)
    seen: list[int] = []

    async def add_one_racing(n: int) -> int:
        seen.append(n)
        if len(seen) == 1:
            # Another writer slips in between this update's read and its write.
            await store.put("k", 100, expected_version=1)
        return n + 1

    result = await store.update("k", add_one_racing)
    assert seen == [0, 100]
    assert (result.value, result.version) == (101, 3)


async def test_update_gives_up_at_its_deadline_and_writes_nothing(store: keel.Store) -> None:
    await store.put("k", 0, expected_version=None)
    calls = 0

    async def always_overtaken(n: int) -> int:
        nonlocal calls
        calls += 1
        await store.update("k", lambda v: v + 1000)  # someone else always wins
        return -1

    with pytest.raises(keel.UpdateContentionError) as caught:
        await store.update("k", always_overtaken, deadline_s=0.2)
    assert caught.value.attempts == calls >= 2
    current = await store.get("k")
    assert current is not None
    assert current.value == 1000 * calls  # only the interlopers' writes landed, never -1


async def test_concurrent_updates_in_one_process_lose_nothing(store: keel.Store) -> None:
    results = await asyncio.gather(*(store.update("hot", lambda n: n + 1, default=0) for _ in range(40)))
    assert sorted(r.version for r in results) == list(range(1, 41))
    final = await store.get("hot")
    assert final is not None
    assert final.value == 40


async def test_closing_twice_is_harmless(backend_url: str) -> None:
    async with keel.open_store(backend_url) as store:
        await store.put("k", 1, expected_version=None)
        await store.aclose()
    async with keel.open_store(backend_url) as reopened:
        current = await reopened.get("k")
        assert current is not None
        assert current.value == 1


async def test_two_stores_updating_in_turn_never_work_from_a_stale_value(backend_url: str) -> None:
    async with keel.open_store(backend_url) as first, keel.open_store(backend_url) as second:
        results = []
        for round_no in range(6):
            writer = first if round_no % 2 == 0 else second
            results.append(await writer.update("shared", lambda n: n + 1, default=0))
        assert [(r.version, r.value) for r in results] == [(n, n) for n in range(1, 7)]


async def test_update_judges_fn_on_the_fresh_value_when_it_fails_on_an_old_one(backend_url: str) -> None:
    async with keel.open_store(backend_url) as first, keel.open_store(backend_url) as second:
        await first.put("doc", {"n": 1}, expected_version=None)  # first now knows version 1
        await second.update("doc", lambda d: {"n": 2, "ready": True})
        result = await first.update("doc", lambda d: {**d, "n": d["n"] + 1, "seen": d["ready"]})
        assert (result.version, result.value) == (3, {"n": 3, "ready": True, "seen": True})
        with pytest.raises(KeyError, match="missing"):
            await first.update("doc", lambda d: d["missing"])  # an error on the current value still surfaces
        current = await second.get("doc")
        assert current is not None
        assert current.version == 3
