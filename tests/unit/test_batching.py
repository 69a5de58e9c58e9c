"""Batch sending: grouping, splitting, and each email's own outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailer_service.batching import BatchingTransport, BatchLimits, split
from mailer_service.compose import OutgoingEmail, Sender, compose_email
from mailer_service.transport import Receipt, SendOutcomeUnknown
from pipeline_shared.errors import HandlerFailure, PermanentFailure, TransientFailure
from unit.fakes import data_processed

SENDER = Sender(email="pipeline@example.com", name="Pipeline", category="test")


def email_to(to: str) -> OutgoingEmail:
    return compose_email(data_processed(email=to), SENDER)


# --- split ------------------------------------------------------------------------


@given(
    sizes=st.lists(st.integers(min_value=1, max_value=60), max_size=300),
    max_emails=st.integers(min_value=1, max_value=50),
    max_bytes=st.integers(min_value=1, max_value=500),
)
def test_split_keeps_every_item_once_in_order_and_within_the_limits(
    sizes: list[int], max_emails: int, max_bytes: int
) -> None:
    groups = split(sizes, BatchLimits(max_emails=max_emails, max_bytes=max_bytes))

    assert [i for group in groups for i in group] == list(range(len(sizes)))
    for group in groups:
        assert 1 <= len(group) <= max_emails
        # Over the byte limit only when a single item alone is.
        assert sum(sizes[i] for i in group) <= max_bytes or len(group) == 1


def test_split_at_the_providers_limits() -> None:
    limits = BatchLimits(max_emails=500, max_bytes=50)

    assert [len(g) for g in split([0] * 1001, limits)] == [500, 500, 1]
    assert [len(g) for g in split([20, 20, 20, 60, 1], limits)] == [2, 1, 1, 1]


# --- the batching transport ------------------------------------------------------


class Provider:
    """A batch sender that answers from ``outcome(email)`` and records its batches."""

    name = "fake"
    reconciles = False
    settle_seconds = 0.0

    def __init__(
        self,
        refuse: frozenset[str] = frozenset(),
        whole: HandlerFailure | None = None,
        delay: float = 0.001,
    ):
        self.batches: list[list[str]] = []
        self.wanted: list[list[Callable[[], bool]]] = []
        self.in_flight = 0.001
        self.delay = delay
        self.slots = 0
        self.slot_failure: Exception | None = None
        self.refuse = refuse
        self.whole = whole

    async def take_slot(self) -> None:
        self.slots += 1
        if self.slot_failure is not None:
            raise self.slot_failure
        await asyncio.sleep(self.delay)  # the provider's budget makes it wait

    async def send_batch(
        self, emails: Sequence[OutgoingEmail], wanted: Sequence[Callable[[], bool]] | None = None
    ) -> list[Receipt | HandlerFailure]:
        self.batches.append([email.to for email in emails])
        self.wanted.append(list(wanted or []))
        await asyncio.sleep(self.in_flight)
        if self.whole is not None:
            return [self.whole] * len(emails)
        return [
            PermanentFailure(f"refused {email.to}")
            if email.to in self.refuse
            else Receipt(message_id=f"id-{email.to}")
            for email in emails
        ]

    async def send(self, email: OutgoingEmail) -> Receipt:
        raise AssertionError("sent alone")

    async def find_sent(self, email: OutgoingEmail, since: float) -> Receipt | None:
        return None

    async def close(self) -> None:
        return None


async def test_emails_handed_in_together_share_one_request_and_get_their_own_receipts() -> None:
    provider = Provider()
    transport = BatchingTransport(provider, BatchLimits(wait_seconds=0.05), concurrency=2)
    addresses = [f"user{n}@example.com" for n in range(30)]

    receipts = await asyncio.gather(*(transport.send(email_to(a)) for a in addresses))

    assert provider.batches == [addresses]
    assert [r.message_id for r in receipts] == [f"id-{a}" for a in addresses]


async def test_the_sender_can_tell_which_emails_are_still_waited_for() -> None:
    # A batch refused as a whole is sent again one by one, each email waiting for
    # its own budget slot: one whose handler gave up meanwhile must be dropped.
    provider = Provider()
    provider.in_flight = 0.2
    transport = BatchingTransport(provider, BatchLimits(wait_seconds=0.01), concurrency=2)
    kept = asyncio.create_task(transport.send(email_to("kept@example.com")))
    given_up = asyncio.create_task(transport.send(email_to("gone@example.com")))
    while not provider.wanted:
        await asyncio.sleep(0.005)
    [wanted] = provider.wanted
    before = [still() for still in wanted]

    given_up.cancel()
    await asyncio.sleep(0)

    assert before == [True, True]
    assert [still() for still in wanted] == [True, False]
    await kept


async def test_a_full_batch_goes_at_once_and_the_rest_after_the_wait() -> None:
    provider = Provider()
    transport = BatchingTransport(
        provider, BatchLimits(max_emails=10, wait_seconds=0.05), concurrency=2
    )

    await asyncio.gather(*(transport.send(email_to(f"u{n}@example.com")) for n in range(25)))

    assert [len(batch) for batch in provider.batches] == [10, 10, 5]


async def test_a_lone_email_waits_no_longer_than_the_wait() -> None:
    provider = Provider()
    transport = BatchingTransport(provider, BatchLimits(wait_seconds=0.02), concurrency=2)
    loop = asyncio.get_running_loop()
    started = loop.time()

    await transport.send(email_to("ada@example.com"))

    assert loop.time() - started < 0.5
    assert provider.batches == [["ada@example.com"]]


async def test_an_email_refused_in_its_batch_fails_alone() -> None:
    provider = Provider(refuse=frozenset({"eve@example.com"}))
    transport = BatchingTransport(provider, BatchLimits(wait_seconds=0.01), concurrency=2)
    addresses = ["ada@example.com", "eve@example.com", "grace@example.com"]

    outcomes = await asyncio.gather(
        *(transport.send(email_to(a)) for a in addresses), return_exceptions=True
    )

    assert isinstance(outcomes[0], Receipt)
    assert isinstance(outcomes[1], PermanentFailure)
    assert isinstance(outcomes[2], Receipt)


async def test_a_batch_whose_outcome_is_unknown_is_unknown_for_every_email() -> None:
    provider = Provider(whole=SendOutcomeUnknown("Mailtrap did not answer in time"))
    transport = BatchingTransport(provider, BatchLimits(wait_seconds=0.01), concurrency=2)

    outcomes = await asyncio.gather(
        *(transport.send(email_to(f"u{n}@example.com")) for n in range(4)), return_exceptions=True
    )

    assert all(isinstance(outcome, SendOutcomeUnknown) for outcome in outcomes)


async def test_an_email_withdrawn_before_its_batch_leaves_is_not_sent() -> None:
    provider = Provider()
    transport = BatchingTransport(provider, BatchLimits(wait_seconds=0.05), concurrency=2)
    kept = asyncio.create_task(transport.send(email_to("ada@example.com")))
    withdrawn = asyncio.create_task(transport.send(email_to("eve@example.com")))
    await asyncio.sleep(0)

    withdrawn.cancel()
    await kept

    assert provider.batches == [["ada@example.com"]]
    with pytest.raises(asyncio.CancelledError):
        await withdrawn


async def test_an_email_whose_handler_gave_up_while_its_batch_waited_is_left_out() -> None:
    # The batch waits for a slot in the budget; a handler cancelled meanwhile
    # (HANDLER_TIMEOUT_SECONDS) must not have its email sent later behind its
    # back: its claim will be settled by another attempt.
    provider = Provider(delay=0.2)
    transport = BatchingTransport(provider, BatchLimits(wait_seconds=0.01), concurrency=2)
    kept = asyncio.create_task(transport.send(email_to("ada@example.com")))
    given_up = asyncio.create_task(transport.send(email_to("eve@example.com")))
    await asyncio.sleep(0.05)  # flushed, and waiting

    given_up.cancel()
    await kept

    assert provider.batches == [["ada@example.com"]]


async def test_emails_gather_while_the_budget_makes_a_request_wait_and_leave_together() -> None:
    # One request may leave every 0.2 s: what arrives meanwhile rides the next.
    provider = Provider(delay=0.2)
    transport = BatchingTransport(provider, BatchLimits(wait_seconds=0.01), concurrency=1)

    async def trickle() -> list[Receipt]:
        sends = []
        for n in range(20):
            sends.append(asyncio.create_task(transport.send(email_to(f"u{n}@example.com"))))
            await asyncio.sleep(0.02)
        return await asyncio.gather(*sends)

    receipts = await trickle()

    assert len(receipts) == 20
    assert len(provider.batches) <= 4, provider.batches
    assert sorted(a for batch in provider.batches for a in batch) == sorted(
        f"u{n}@example.com" for n in range(20)
    )


async def test_a_budget_that_cannot_be_read_fails_the_waiting_emails_as_not_sent() -> None:
    provider = Provider()
    provider.slot_failure = RuntimeError("database is locked")
    transport = BatchingTransport(provider, BatchLimits(wait_seconds=0.01), concurrency=2)

    outcomes = await asyncio.gather(
        *(transport.send(email_to(f"u{n}@example.com")) for n in range(3)), return_exceptions=True
    )

    for outcome in outcomes:
        assert isinstance(outcome, TransientFailure)
        assert not isinstance(outcome, SendOutcomeUnknown)
    assert provider.batches == []
