"""One provider request budget for every mailer replica, on real databases, and the real
SDK against a stand-in that enforces Mailtrap's per-token limit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mailer_service.compose import Sender, compose_email
from mailer_service.mailtrap_transport import MailtrapTransport
from mailer_service.send_budget import SendBudget
from mailer_service.transport import Receipt
from pipeline_shared.errors import Deferred
from support.mailtrap_stub import MailtrapStub
from unit.fakes import data_processed

SENDER = Sender(email="pipeline@example.com", name="Pipeline", category="test")
LIMIT, WINDOW = 4, 0.5
SDK_WINDOW = 1.0


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

    async def take(budget: SendBudget) -> None:
        await budget.acquire()
        granted.append(time.monotonic())

    started = time.monotonic()
    await asyncio.gather(*(take(replicas[n % 3]) for n in range(16)))

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
