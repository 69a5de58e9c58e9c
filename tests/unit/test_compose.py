"""Composing the email, rendering it as RFC 5322, and the outbox transport."""

from __future__ import annotations

import email
import email.policy
import json
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailer_service.compose import (
    DEFAULT_SUBJECT,
    PRETTY_LIMIT,
    OutgoingEmail,
    Sender,
    compose_email,
    render_text,
)
from mailer_service.handlers import SendEmail
from mailer_service.outbox import OutboxTransport, to_mime
from pipeline_shared.errors import TransientFailure
from pipeline_shared.events import EmailSent
from unit.fakes import FIXED_JOB_ID, FakeLedger, FakePublisher, data_processed

SENDER = Sender(email="pipeline@example.com", name="Email Pipeline", category="background-job")
LEASE = 15.0


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def outgoing(**overrides: object) -> OutgoingEmail:
    fields: dict[str, object] = {
        "job_id": str(FIXED_JOB_ID),
        "sender": SENDER,
        "to": "ada@example.com",
        "subject": "Your report",
        "text": "Hello Ada,\n\nhere it is.\n",
        "custom_variables": {"job_id": str(FIXED_JOB_ID)},
    }
    return OutgoingEmail(**{**fields, **overrides})  # type: ignore[arg-type]


# --- compose_email ----------------------------------------------------------


def test_the_email_goes_to_the_jobs_address_from_the_sender() -> None:
    event = data_processed(email="grace@example.org")

    composed = compose_email(event, SENDER)

    assert composed.to == "grace@example.org"
    assert composed.sender == SENDER
    assert composed.job_id == str(event.job_id)


def test_the_given_subject_is_used() -> None:
    assert compose_email(data_processed(subject="Weekly visits"), SENDER).subject == "Weekly visits"


def test_without_a_subject_the_default_subject_is_used() -> None:
    composed = compose_email(data_processed(subject=None), SENDER)

    assert composed.subject == DEFAULT_SUBJECT == "Your data has been processed"


def test_the_custom_variables_carry_the_job_id() -> None:
    event = data_processed()

    assert compose_email(event, SENDER).custom_variables == {"job_id": str(event.job_id)}


def test_the_text_includes_the_result_and_the_input_data() -> None:
    event = data_processed(data={"name": "Ada", "visits": 3}, result={"field_count": 2})

    text = compose_email(event, SENDER).text

    assert '"name": "Ada"' in text
    assert '"visits": 3' in text
    assert '"field_count": 2' in text
    assert str(event.job_id) in text
    assert "'summarise'" in text


def test_the_text_shows_the_result_before_the_data() -> None:
    text = render_text(data_processed())

    assert text.index("Result:") < text.index("Your data:")


def test_large_deep_data_is_written_compactly_so_the_email_stays_near_its_size() -> None:
    deep: Any = [123456] * 20_000
    for _ in range(29):
        deep = [deep]
    event = data_processed(data={"x": deep}, result={"x": deep})

    text = render_text(event)

    compact_size = len(json.dumps({"x": deep}, separators=(",", ":")))
    assert compact_size > PRETTY_LIMIT
    assert len(text) < 3 * compact_size
    assert json.loads(text.split("Result:\n")[1].split("\n\nYour data:")[0]) == {"x": deep}


def test_small_data_is_indented_for_reading() -> None:
    text = render_text(data_processed(data={"visits": [3, 5]}))

    assert '\n  "visits": [\n' in text


def test_the_text_keeps_non_ascii_characters_readable() -> None:
    text = render_text(data_processed(data={"city": "Zürich"}, result={"größe": 1}))

    assert "Zürich" in text
    assert "größe" in text
    assert "\\u" not in text


# --- to_mime ----------------------------------------------------------------


def test_the_mime_message_parses_back_with_its_headers() -> None:
    raw = bytes(to_mime(outgoing(), "<abc.123@outbox.local>"))

    message = parse(raw)

    sender = message["From"].addresses[0]
    assert (sender.display_name, sender.addr_spec) == ("Email Pipeline", "pipeline@example.com")
    assert message["To"].addresses[0].addr_spec == "ada@example.com"
    assert message["Subject"] == "Your report"
    assert message["Message-ID"] == "<abc.123@outbox.local>"
    assert message["X-Job-Id"] == str(FIXED_JOB_ID)
    assert message["X-Category"] == "background-job"
    assert message["Date"] is not None
    assert message["Date"].datetime.utcoffset().total_seconds() == 0


def test_the_mime_message_body_is_the_plain_text() -> None:
    message = parse(bytes(to_mime(outgoing(text="Line one\nLine two\n"), "<id@outbox.local>")))

    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    assert body.get_content() == "Line one\nLine two\n"
    assert message.get_content_type() == "text/plain"


def test_a_non_ascii_subject_and_sender_name_survive_the_round_trip() -> None:
    sender = Sender(email="pipeline@example.com", name="Équipe Données", category="c")
    raw = bytes(to_mime(outgoing(sender=sender, subject="Résumé prêt à lire"), "<id@outbox.local>"))

    message = parse(raw)

    assert raw.isascii()
    assert message["Subject"] == "Résumé prêt à lire"
    assert message["From"].addresses[0].display_name == "Équipe Données"


# --- OutboxTransport --------------------------------------------------------


async def test_the_outbox_writes_one_eml_file_named_after_the_job(tmp_path: Path) -> None:
    transport = OutboxTransport(tmp_path / "outbox")

    receipt = await transport.send(outgoing())

    files = sorted((tmp_path / "outbox").iterdir())
    assert [path.name for path in files] == [f"{FIXED_JOB_ID}.eml"]
    message = parse(files[0].read_bytes())
    assert message["Message-ID"] == receipt.message_id
    assert message["Subject"] == "Your report"
    assert transport.name == "outbox"


async def test_the_outbox_message_id_names_the_job_and_the_outbox_domain(tmp_path: Path) -> None:
    receipt = await OutboxTransport(tmp_path).send(outgoing())

    assert receipt.message_id is not None
    assert receipt.message_id.startswith("<")
    assert receipt.message_id.endswith("@outbox.local>")
    assert str(FIXED_JOB_ID) in receipt.message_id


async def test_sending_the_same_job_again_replaces_its_file(tmp_path: Path) -> None:
    transport = OutboxTransport(tmp_path)

    await transport.send(outgoing(subject="First try"))
    second = await transport.send(outgoing(subject="Second try"))

    files = list(tmp_path.iterdir())
    assert [path.name for path in files] == [f"{FIXED_JOB_ID}.eml"]
    message = parse(files[0].read_bytes())
    assert message["Subject"] == "Second try"
    assert message["Message-ID"] == second.message_id


async def test_different_jobs_get_different_files(tmp_path: Path) -> None:
    transport = OutboxTransport(tmp_path)

    await transport.send(outgoing(job_id="job-one"))
    await transport.send(outgoing(job_id="job-two"))

    assert sorted(path.name for path in tmp_path.iterdir()) == ["job-one.eml", "job-two.eml"]


async def test_an_outbox_that_cannot_be_written_is_a_transient_failure(tmp_path: Path) -> None:
    in_the_way = tmp_path / "outbox"
    in_the_way.write_text("a file where the folder should be")

    with pytest.raises(TransientFailure, match="could not write to the outbox"):
        await OutboxTransport(in_the_way).send(outgoing())


async def test_closing_the_outbox_does_nothing_harmful(tmp_path: Path) -> None:
    transport = OutboxTransport(tmp_path)

    await transport.close()
    await transport.send(outgoing())

    assert len(list(tmp_path.iterdir())) == 1


async def test_the_mailer_handler_through_the_outbox_publishes_the_files_message_id(
    tmp_path: Path,
) -> None:
    publisher = FakePublisher()
    event = data_processed(subject="Weekly visits")

    await SendEmail(
        OutboxTransport(tmp_path), publisher, FakeLedger(), SENDER, lease_seconds=LEASE
    )(event)

    written = parse((tmp_path / f"{event.job_id}.eml").read_bytes())
    [sent] = publisher.published
    assert isinstance(sent, EmailSent)
    assert sent.transport == "outbox"
    assert sent.provider_message_id == written["Message-ID"]
    assert written["Subject"] == "Weekly visits"
    assert written["To"].addresses[0].addr_spec == event.email


# Text as job data may hold it: no control characters, no lone surrogates.
text = st.text(st.characters(exclude_categories=["Cs", "Cc"]), max_size=10)
json_data = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**40), 10**40)  # beyond 64 bits too: job data holds any up to 1.8e308
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(text, json_data, max_size=4))
def test_the_data_shown_reads_back_as_the_data_sent(data: dict[str, Any]) -> None:
    text = render_text(data_processed(data=data, result={"echo": data}))

    shown = text.split("Your data:\n")[1].split("\n\n-- \n")[0]
    assert json.loads(shown) == data


def test_numbers_beyond_64_bits_are_shown_whole() -> None:
    text = render_text(data_processed(data={"big": 2**64 + 1, "small": -(2**70)}))

    assert '"big": 18446744073709551617' in text
    assert '"small": -1180591620717411303424' in text
