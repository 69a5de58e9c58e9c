"""What a publish's failure means to its caller, and how a service reports its two
connections (``pipeline_shared.messaging.broker``)."""

from __future__ import annotations

import logging

import pytest

from pipeline_shared.errors import BrokerUnavailable, PublishOutcomeUnknown
from pipeline_shared.messaging import Broker
from pipeline_shared.messaging.broker import publish_failure
from pipeline_shared.messaging.publish_connection import (
    ChannelClosed,
    ConfirmTimeout,
    ConnectionLost,
    Nacked,
    NotSent,
    Unroutable,
)

NOT_TAKEN = BrokerUnavailable
MAYBE_TAKEN = PublishOutcomeUnknown


@pytest.mark.parametrize(
    ("outcome", "routing_key", "meaning", "words"),
    [
        (Unroutable("NO_ROUTE (reply code 312)"), "job.requested", NOT_TAKEN, "no queue is bound"),
        (Nacked("nack"), "job.requested", NOT_TAKEN, "nack"),
        # data.processed goes to the mailer's and status-service's queues: a nack
        # says one refused it, not that the other did.
        (Nacked("nack"), "data.processed", MAYBE_TAKEN, "one of its queues"),
        (
            ChannelClosed(403, "ACCESS_REFUSED - write", outcome_known=True),
            "job.requested",
            NOT_TAKEN,
            "refused to let this service publish",
        ),
        (
            ChannelClosed(404, "NOT_FOUND - no exchange", outcome_known=True),
            "job.requested",
            NOT_TAKEN,
            "NOT_FOUND",
        ),
        (
            ChannelClosed(403, "ACCESS_REFUSED - write", outcome_known=False),
            "job.requested",
            MAYBE_TAKEN,
            "awaited its confirm",
        ),
        (ConfirmTimeout("late"), "job.requested", MAYBE_TAKEN, "within 10 s"),
        (ConnectionLost("gone"), "job.requested", MAYBE_TAKEN, "while publishing"),
        (NotSent("not connected"), "job.requested", NOT_TAKEN, "not connected"),
        (RuntimeError("a bug"), "job.requested", MAYBE_TAKEN, "a bug"),
    ],
)
def test_each_failure_says_whether_the_broker_took_the_message(
    outcome: BaseException, routing_key: str, meaning: type[Exception], words: str
) -> None:
    failure = publish_failure(outcome, "pipeline", routing_key, 10)
    assert type(failure) is meaning
    assert words in str(failure)
    assert failure.__cause__ is outcome


def test_a_service_says_once_that_it_lost_the_broker_and_once_that_it_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = Broker("amqp://guest:guest@127.0.0.1/", app_id="test")
    caplog.set_level(logging.DEBUG, logger="pipeline.messaging")
    broker.went_down("consuming", "ConnectionResetError")
    broker.went_down("publishing", "ConnectionResetError")
    broker.went_down("publishing", "ConnectionRefusedError")  # a failed attempt
    broker.came_back("publishing")
    broker.came_back("publishing")  # told twice: changes nothing
    broker.came_back("consuming")

    levels = [(r.levelname, r.getMessage().split(" (")[0]) for r in caplog.records]
    assert levels == [
        ("WARNING", "lost the broker connection"),
        ("DEBUG", "still no broker connection"),
        ("DEBUG", "still no broker connection"),
        ("INFO", "reconnected to amqp://guest:***@127.0.0.1/; topology and consumers restored"),
    ]
