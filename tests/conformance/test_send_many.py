"""``send_many``: a batch in one transaction, on every engine: in order, all or nothing, deduplicated; and the client's
``send_many``, which checks every item as ``send`` does before anything is sent."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

import keel
from keel.backends.base import MessageStatus
from tests._engine import APP, claim_all, claim_one, commit_of, new_message, opened, ref, send
from tests.conformance.test_runtime import LoanRequest, make_app, running_worker

if TYPE_CHECKING:
    from keel.backends.base import Backend


async def test_a_batch_is_sent_in_order_and_returns_each_id(backend: Backend) -> None:
    batch = [new_message(ref("a"), {"n": 1}), new_message(ref("b"), {"n": 2}), new_message(ref("a"), {"n": 3})]
    assert await backend.send_many(batch) == [m.message_id for m in batch]
    for message in batch:
        info = await backend.message(APP, message.message_id)
        assert info is not None
        assert (info.instance, info.status) == (message.instance, MessageStatus.pending)
    # One instance's messages join its inbox in the batch's order.
    first = await claim_one(backend, worker="w1")
    assert first.instance == ref("a")
    assert first.message_id == batch[0].message_id
    await backend.commit_turn(commit_of(first))
    claims = await claim_all(backend)
    assert {c.message_id for c in claims} == {batch[1].message_id, batch[2].message_id}


async def test_an_empty_batch_writes_nothing(backend: Backend) -> None:
    assert await backend.send_many([]) == []
    assert await claim_all(backend) == []


async def test_a_conflict_anywhere_in_a_batch_writes_none_of_it(backend: Backend) -> None:
    first = await send(backend, ref("k"), {"n": 1}, key="order-1")
    batch = [
        new_message(ref("x"), {"n": 1}),
        new_message(ref("k"), {"n": 2}, key="order-1"),  # the key holds another payload
        new_message(ref("y"), {"n": 3}),
    ]
    with pytest.raises(keel.IdempotencyConflictError) as caught:
        await backend.send_many(batch)
    assert (caught.value.key, caught.value.first_id, caught.value.instance) == ("order-1", first, "loan/k")
    assert [await backend.message(APP, m.message_id) for m in batch] == [None, None, None]
    [claim] = await claim_all(backend)
    assert claim.message_id == first


async def test_a_conflict_within_the_batch_writes_none_of_it(backend: Backend) -> None:
    batch = [
        new_message(ref("z"), {"n": 0}),
        new_message(ref("k"), {"n": 1}, key="dup"),
        new_message(ref("k"), {"n": 2}, key="dup"),
    ]
    with pytest.raises(keel.IdempotencyConflictError) as caught:
        await backend.send_many(batch)
    assert (caught.value.key, caught.value.first_id) == ("dup", batch[1].message_id)
    assert [await backend.message(APP, m.message_id) for m in batch] == [None, None, None]
    assert await claim_all(backend) == []


async def test_idempotency_keys_deduplicate_within_and_across_batches(backend: Backend) -> None:
    before = await send(backend, ref("k"), {"n": 1}, key="sent-before")
    batch = [
        new_message(ref("k"), {"n": 1}, key="sent-before"),  # a repeat of a send before the batch
        new_message(ref("k"), {"n": 2}, key="twice"),
        new_message(ref("k"), {"n": 2}, key="twice"),  # a repeat within the batch
        new_message(ref("other"), {"n": 2}, key="twice"),  # keys are per instance
    ]
    ids = await backend.send_many(batch)
    assert ids == [before, batch[1].message_id, batch[1].message_id, batch[3].message_id]
    assert await backend.message(APP, batch[2].message_id) is None
    # The same batch again appends nothing: every message is a repeat now.
    again = [new_message(m.instance, {"n": 1 if i == 0 else 2}, m.idempotency_key) for i, m in enumerate(batch)]
    assert await backend.send_many(again) == ids
    # Resending a batch whose reply was lost (the same ids) appends nothing either.
    plain = [new_message(ref("p"), {"n": 9})]
    assert await backend.send_many(plain) == await backend.send_many(plain)
    sent = [claim.message_id for claim in await claim_all(backend, limit=10)]
    assert sorted(sent) == sorted({before, batch[3].message_id, plain[0].message_id})


async def test_a_batch_wakes_idle_waiters_and_is_visible_to_another_backend(backend: Backend, other: Backend) -> None:
    await claim_all(other)  # starts the wake rule's "since"
    await backend.send_many([new_message(ref("w"), {"n": 1}), new_message(ref("w2"), {"n": 2}, delay_s=3600)])
    await other.wait_for_work(APP, timeout_s=5)
    [claim] = await claim_all(other)  # the delayed one is not visible yet
    assert claim.instance == ref("w")


# --- client.send_many: every check of client.send, before anything is sent --------------------------------------


async def test_client_send_many_sends_outgoing_items_and_tuples_that_workers_run(backend_url: str) -> None:
    app = make_app(backend_url)
    async with app.client() as client:
        ids = await client.send_many(
            [
                keel.Outgoing("loan", "a", LoanRequest(amount=1)),
                ("loan", "a", {"amount": 2}),
                keel.Outgoing("loan", "b", {"amount": 5}, idempotency_key="req-b"),
                ("loan", "b", {"amount": 5}, "req-b"),  # the same key and message: sent once
            ]
        )
        assert len(set(ids)) == 3
        assert ids[2] == ids[3]
        async with running_worker(app, backend_url):
            assert [await client.wait("loan", "a", i, timeout_s=10) for i in ids[:2]] == [1, 2]
            assert await client.wait("loan", "b", ids[2], timeout_s=10) == 1
        a, b = await client.state("loan", "a"), await client.state("loan", "b")
        assert await client.send_many([]) == []
    assert a is not None
    assert b is not None
    assert (a.value.amounts, b.value.amounts) == ([1, 2], [5])


@pytest.mark.parametrize(
    ("bad", "error", "names"),
    [
        (("lone", "x", {"amount": 1}), keel.UnknownWorkflowError, "registered workflows: loan"),
        (("loan", "x", {"amount": -1}), keel.PayloadValidationError, "amount"),
        (("loan", "", {"amount": 1}), keel.InvalidKeyError, "workflow_id"),
        (("loan", "x", {"amount": 1}, None, -1.0), keel.ConfigurationError, "delay_s"),
        (("loan", "x"), TypeError, "a tuple of 2"),
        ("loan/x", TypeError, "a str"),
    ],
)
async def test_a_bad_item_fails_the_whole_batch_naming_its_index(
    backend_url: str, bad: object, error: type[Exception], names: str
) -> None:
    app = make_app(backend_url)
    async with app.client() as client:
        good = keel.Outgoing("loan", "fine", {"amount": 1})
        with pytest.raises(error, match=f"^item 1 of the batch.*{names}"):
            await client.send_many([good, bad, good])  # type: ignore[list-item]
        async with opened(backend_url) as backend:
            assert await backend.claim(app.name, ["loan"], worker="w1", lease_s=5, limit=10) == []
            # The same batch without the bad item goes through: the check above could have seen it.
            assert len(await client.send_many([good, good])) == 2
            assert len(await backend.claim(app.name, ["loan"], worker="w1", lease_s=5, limit=10)) == 1


async def test_a_conflicting_item_names_its_index_and_nothing_is_sent(backend_url: str) -> None:
    app = make_app(backend_url)
    async with app.client() as client:
        first = await client.send("loan", "k", {"amount": 1}, idempotency_key="once")
        batch = [("loan", "m", {"amount": 1}), ("loan", "k", {"amount": 2}, "once")]
        with pytest.raises(keel.IdempotencyConflictError, match=f"^item 1 of the batch: .*'once'.*loan/k.*{first}"):
            await client.send_many(batch)
        async with opened(backend_url) as backend:
            claims = await backend.claim(app.name, ["loan"], worker="w1", lease_s=5, limit=10)
        assert [c.message_id for c in claims] == [first]
