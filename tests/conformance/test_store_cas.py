"""Compare-and-swap at the edge of the store's contract, on every engine (G1): every stale write is refused, says
which version it found, and changes nothing; of many writers racing from one version exactly one wins."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import pytest

import keel

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from keel.backends.base import Backend

#: (case, the write, the live version the error reports): "live" is at version 2, "gone" deleted at version 2.
STALE_WRITES: list[tuple[str, Callable[[keel.Store], Awaitable[object]], int | None]] = [
    ("create over a live key", lambda s: s.put("live", "x", expected_version=None), 2),
    ("put on an old version", lambda s: s.put("live", "x", expected_version=1), 2),
    ("put on a future version", lambda s: s.put("live", "x", expected_version=3), 2),
    ("delete of an old version", lambda s: s.delete("live", expected_version=1), 2),
    ("put on a tombstone's version", lambda s: s.put("gone", "x", expected_version=2), None),
    ("delete of a tombstone", lambda s: s.delete("gone", expected_version=2), None),
    ("put on an absent key", lambda s: s.put("absent", "x", expected_version=1), None),
    ("delete of an absent key", lambda s: s.delete("absent", expected_version=1), None),
]


async def readings(store: keel.Store) -> list[object]:
    return [(await store.get(k), await store.history(k)) for k in ("live", "gone", "absent")]


@pytest.mark.parametrize(("case", "call", "actual"), STALE_WRITES, ids=[c[0] for c in STALE_WRITES])
async def test_a_stale_write_is_refused_says_what_it_found_and_changes_nothing(
    store: keel.Store, case: str, call: Callable[[keel.Store], Awaitable[object]], actual: int | None
) -> None:
    await store.put("live", "1", expected_version=None)
    await store.put("live", "2", expected_version=1)
    await store.put("gone", "1", expected_version=None)
    await store.delete("gone", expected_version=1)
    before = await readings(store)
    with pytest.raises(keel.StaleWriteError) as caught:
        await call(store)
    assert caught.value.actual_version == actual
    assert await readings(store) == before


async def test_concurrent_swaps_from_one_version_through_several_stores_have_one_winner(backend_url: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        opened = [await stack.enter_async_context(keel.open_store(backend_url)) for _ in range(4)]
        await opened[0].put("k", 0, expected_version=None)

        async def swap(n: int) -> bool:
            try:
                await opened[n % 4].put("k", n, expected_version=1)
            except keel.StaleWriteError as exc:
                assert exc.actual_version == 2
                return False
            return True

        wins = await asyncio.gather(*(swap(n) for n in range(40)))
        history = await opened[1].history("k")
    assert sum(wins) == 1
    assert [(h.version, h.value) for h in history] == [(2, wins.index(True)), (1, 0)]


async def test_an_engine_delete_returns_its_tombstone_and_a_create_goes_on_from_it(backend: Backend) -> None:
    engine = backend.store
    written = await engine.put("k", '"a"', expected_version=None, writer="w1")
    tombstone = await engine.delete("k", expected_version=written.version, writer="w1")
    assert (tombstone.key, tombstone.version, tombstone.value_json, tombstone.writer) == ("k", 2, None, "w1")
    assert await engine.get("k") is None
    assert [(r.version, r.value_json) for r in await engine.history("k", limit=10)] == [(2, None), (1, '"a"')]
    assert (await engine.put("k", '"b"', expected_version=None, writer="w1")).version == 3


async def test_a_backend_and_its_store_name_one_url(backend: Backend, backend_url: str) -> None:
    assert backend.url == backend.store.url
    assert backend.url.split(":", 1)[0] == backend_url.split(":", 1)[0]
