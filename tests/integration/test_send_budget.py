"""One provider request budget for every mailer replica, on real databases, and the real
SDK against a stand-in that enforces Mailtrap's per-token limit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from mailer_service.compose import Sender, compose_email
from mailer_service.mailtrap_transport import MailtrapTransport
from mailer_service.send_budget import SendBudget
from mailer_service.transport import Receipt
from pipeline_shared.errors import Deferred
from support.mailtrap_stub import MailtrapStub
from unit.fakes import data_processed

SENDER = Sender(email="pipeline@example.com", name="Pipeline", category="test")
LIMIT, WINDOW = 4, 0.5
# The stand-in's window is 5 % shorter and the budget's 5 % longer: 0.2 s of margin for a
# request's way from the budget to the stand-in on a loaded machine (0.1 s was not).
SDK_WINDOW = 2.0


@pytest.fixture
async def replicas(database_url: str) -> AsyncIterator[list[SendBudget]]:
    """Three mailers' budgets on one database."""
    budgets = [
        SendBudget.open(database_url, max_requests=LIMIT, window_seconds=WINDOW) for _ in range(3)
    ]
    yield budgets
    for budget in budgets:
        await budget.close()


def most_in_any_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max(sum(1 for t in times if start <= t < start + window) for start in times)


async def test_replicas_sharing_a_database_stay_within_one_limit_together(
    replicas: list[SendBudget],
) -> None:
    granted: list[float] = []

    def take(budget: SendBudget) -> None:
        # Timed in the thread that took it, not when the event loop gets round to
        # the result: on a busy machine that can be a tenth of a second later, and
        # the late reading squeezes an earlier request into a later window.
        budget.acquire_blocking()
        granted.append(time.monotonic())

    started = time.monotonic()
    await asyncio.gather(*(asyncio.to_thread(take, replicas[n % 3]) for n in range(16)))

    assert len(granted) == 16
    assert most_in_any_window(granted, WINDOW) <= LIMIT
    # Four windows' worth of requests take at least three windows.
    assert time.monotonic() - started >= 3 * WINDOW


async def test_a_429_blocks_every_replica_for_its_retry_after(replicas: list[SendBudget]) -> None:
    first, second, _ = replicas
    await first.block_for(0.6)
    started = time.monotonic()

    await second.acquire()

    assert time.monotonic() - started >= 0.5


async def test_a_tenth_of_the_budget_goes_at_once_then_requests_are_evenly_spaced(
    database_url: str,
) -> None:
    # 20 requests per 20 s: two at once, then one per 1.05 s (the window's margin).
    replicas = [SendBudget.open(database_url, max_requests=20, window_seconds=20) for _ in range(2)]
    granted: list[float] = []

    async def take(budget: SendBudget) -> None:
        await budget.acquire()
        granted.append(time.monotonic())

    started = time.monotonic()
    try:
        await asyncio.gather(*(take(replicas[n % 2]) for n in range(4)))
    finally:
        for budget in replicas:
            await budget.close()

    interval = 20 * 1.05 / 20
    _, second, third, fourth = sorted(t - started for t in granted)
    assert second < interval  # the burst did not wait for the pace
    # Then the pace, whichever replica asks (a little slack for the two clocks).
    assert third >= interval - 0.05
    assert fourth >= 2 * interval - 0.05


async def test_a_lone_request_after_a_quiet_spell_goes_at_once(database_url: str) -> None:
    budget = SendBudget.open(database_url, max_requests=3, window_seconds=3)
    try:
        await budget.acquire()
        await asyncio.sleep(3 * 1.05 / 3)  # its turn in the pace has come
        started = time.monotonic()
        await budget.acquire()
        waited = time.monotonic() - started
        await budget.acquire()  # too soon: paced
        paced = time.monotonic() - started
    finally:
        await budget.close()

    assert waited < 0.5
    assert paced >= 1.05 - 0.05


async def test_a_budget_table_from_before_pacing_gains_its_column(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old-budget.sqlite3'}"
    old = create_engine(url)
    with old.begin() as connection:
        connection.execute(
            text(
                "CREATE TABLE mailer_send_budgets (name VARCHAR(64) PRIMARY KEY, "
                "blocked_until FLOAT NOT NULL)"
            )
        )
        connection.execute(text("INSERT INTO mailer_send_budgets VALUES ('mailtrap', 0)"))
    old.dispose()

    budget = SendBudget.open(url, max_requests=3, window_seconds=3)
    try:
        started = time.monotonic()
        await budget.acquire()  # the row's pace is unknown (NULL): now
        assert time.monotonic() - started < 0.5
        await budget.acquire()
        assert time.monotonic() - started >= 1.05 - 0.05
    finally:
        await budget.close()


# --- the real SDK against a rate-limited stand-in ---------------------------------


@pytest.fixture
def stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MailtrapStub]:
    stub = MailtrapStub(tmp_path)
    # Requests reach the provider a little after the budget grants them (a TLS
    # handshake, a thread hop, a loaded machine): the budget's WINDOW_MARGIN
    # covers that on Mailtrap's 10 s window (0.5 s); on this 1 s one, the
    # stand-in's window is 5% shorter to leave room for the same jitter.
    stub.rate_limit = (LIMIT, SDK_WINDOW * 0.95)
    stub.start()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(stub.ca_bundle))
    yield stub
    stub.stop()


def mailer(stub: MailtrapStub, budget: SendBudget | None) -> MailtrapTransport:
    return MailtrapTransport(
        token=stub.token,
        api_host=stub.host,
        inbox_id=None,
        concurrency=4,
        timeout_seconds=5,
        budget=budget,
    )


async def test_two_mailers_on_one_budget_are_never_answered_429(
    stub: MailtrapStub, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    mailers = [
        mailer(stub, SendBudget.open(url, max_requests=LIMIT, window_seconds=SDK_WINDOW))
        for _ in range(2)
    ]
    emails = [compose_email(data_processed(), SENDER) for _ in range(12)]
    try:
        receipts = await asyncio.gather(
            *(mailers[n % 2].send(email) for n, email in enumerate(emails))
        )
    finally:
        for transport in mailers:
            await transport.close()

    assert all(isinstance(receipt, Receipt) for receipt in receipts)
    assert stub.rate_limited == 0
    assert sorted(stub.deliveries_by_job().values()) == [1] * 12


async def test_without_a_shared_budget_the_limit_is_hit_and_a_429_defers_without_loss(
    stub: MailtrapStub,
) -> None:
    transport = mailer(stub, None)
    emails = [compose_email(data_processed(), SENDER) for _ in range(8)]
    try:
        outcomes = await asyncio.gather(
            *(transport.send(email) for email in emails), return_exceptions=True
        )
    finally:
        await transport.close()

    deferred = [o for o in outcomes if isinstance(o, Deferred)]
    assert stub.rate_limited == len(deferred) > 0
    assert all(0 < d.wait_seconds <= SDK_WINDOW for d in deferred)
    # What was deferred was not taken: sent later, it is sent once.
    assert len(stub.delivered) == len(emails) - len(deferred)


async def test_a_send_its_handler_gave_up_on_while_the_budget_held_it_never_goes_out(
    stub: MailtrapStub, tmp_path: Path
) -> None:
    # A 429 can hold every request for minutes. A handler that times out meanwhile
    # has its message retried; if the held request then went out, the retry's
    # search of the Email Logs could miss it and the email would go twice.
    budget = SendBudget.open(
        f"sqlite:///{tmp_path / 'shared.sqlite3'}", max_requests=LIMIT, window_seconds=SDK_WINDOW
    )
    transport = mailer(stub, budget)
    held, later = (compose_email(data_processed(), SENDER) for _ in range(2))
    try:
        await budget.block_for(1.0)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(transport.send(held), 0.2)
        # The held request is dropped once the block ends; the next one goes.
        receipt = await asyncio.wait_for(transport.send(later), 10)
        await asyncio.sleep(0.3)  # time enough for a send behind it to reach the stand-in
    finally:
        await transport.close()

    assert isinstance(receipt, Receipt)
    assert list(stub.deliveries_by_job()) == [later.job_id]
