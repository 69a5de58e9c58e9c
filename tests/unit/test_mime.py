"""Building the RFC 5322 email: no field's content is ever read as header syntax."""

from __future__ import annotations

import email
import email.policy
import re
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mailer_service.compose import OutgoingEmail, Sender
from mailer_service.mime import to_mime
from mailer_service.outbox import OutboxTransport
from pipeline_shared.contract import check_single_line
from pipeline_shared.errors import PermanentFailure
from support.mailbox import OUTBOX_HEADERS

pytestmark = pytest.mark.unit

HEADERS = set(OUTBOX_HEADERS)

INJECTIONS = [
    "=?utf-8?q?Hi=0D=0ABcc:_evil@x.com?=",
    "=?utf-8?b?eA0KQ29udGVudC1UeXBlOiB0ZXh0L2h0bWwNCg0KPGgxPnB3bjwvaDE+?=",
    "Hi =?UTF-8?Q?=0ATo:_eve@example.com?= there",
    "=?iso-8859-1?q?=0D=0AContent-Type:_text/html?=",
    "Bcc: evil@example.com",
    '"quoted" <eve@example.com>, mallory@example.com',
]


def build(subject: str, name: str = "Email pipeline", text: str = "Hello\n") -> EmailMessage:
    outgoing = OutgoingEmail(
        job_id="7f8e3c1a-0000-4000-8000-000000000001",
        sender=Sender(email="pipeline@example.com", name=name, category="background-job"),
        to="ada@xn--bcher-kva.de",
        subject=subject,
        text=text,
    )
    raw = to_mime(outgoing, "<7f8e3c1a@outbox.local>").as_bytes()
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def sender_name(message: EmailMessage) -> str:
    """The From header's display name as an RFC 2047 reader shows it.

    The standard library's address parser puts a space between two adjacent
    encoded-words of a phrase, which RFC 2047 says to join; ``decode_header``
    joins them, so it is the reader used here.
    """
    raw = email.message_from_bytes(message.as_bytes(), policy=email.policy.compat32)
    assert isinstance(raw, Message)
    unfolded = re.sub(r"\r?\n(?=[ \t])", "", str(raw["From"]))
    if "=?" not in unfolded:
        # A plain (possibly quoted) name: the standard parser reads it right.
        name: str = message["From"].addresses[0].display_name
        return name
    shown = str(make_header(decode_header(unfolded)))
    encoded_name, _, address = shown.rpartition(" <")
    assert address == "pipeline@example.com>"
    return encoded_name


def assert_only_our_headers(message: EmailMessage) -> None:
    assert set(message.keys()) == HEADERS
    assert len(message.keys()) == len(HEADERS)
    assert [a.addr_spec for a in message["To"].addresses] == ["ada@xn--bcher-kva.de"]
    assert [a.addr_spec for a in message["From"].addresses] == ["pipeline@example.com"]
    assert message.get_content_type() == "text/plain"


@pytest.mark.parametrize("subject", INJECTIONS)
def test_an_encoded_word_in_the_subject_stays_the_subjects_text(subject: str) -> None:
    message = build(subject)

    assert_only_our_headers(message)
    assert message["Subject"] == subject


@pytest.mark.parametrize("name", INJECTIONS)
def test_an_encoded_word_in_the_sender_name_stays_the_names_text(name: str) -> None:
    message = build("Report", name=name)

    assert_only_our_headers(message)
    assert sender_name(message) == name


def test_the_body_cannot_end_the_headers_or_change_the_content_type() -> None:
    text = "\r\n\r\nContent-Type: text/html\r\n\r\n<h1>pwn</h1>\n=?utf-8?q?x?=\n"

    message = build("Report", text=text)

    assert_only_our_headers(message)
    assert message.get_content().replace("\r\n", "\n") == text.replace("\r\n", "\n")


def test_a_plain_subject_is_written_as_it_is() -> None:
    outgoing = OutgoingEmail(
        job_id="j",
        sender=Sender(email="p@example.com", name="Email pipeline", category="c"),
        to="ada@example.com",
        subject="Your weekly report",
        text="x",
    )

    assert b"\nSubject: Your weekly report\n" in to_mime(outgoing, "<j@outbox.local>").as_bytes()


@pytest.mark.parametrize(
    "subject",
    ["https://reports.example.com/weekly/" + "a" * 40 + " is ready", "x" * 200, "a," * 100],
)
def test_a_long_unbroken_plain_subject_is_not_folded_into_a_leading_space(subject: str) -> None:
    message = build(subject, name="N" * 100)

    assert message["Subject"] == subject
    assert sender_name(message) == "N" * 100


single_lines = (
    st.text(min_size=1, max_size=200)
    | st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=60, max_size=200)
).filter(lambda s: not _raises(check_single_line, s))


def _raises(check: object, value: str) -> bool:
    try:
        check(value)  # type: ignore[operator]
    except ValueError:
        return True
    return False


@given(subject=single_lines, name=single_lines)
@example(subject="=?utf-8?q?Hi=0D=0ABcc:_evil@x.com?=", name="=?utf-8?q?a=0AB:_c?=")
@example(subject="Ünïcödé " * 20, name='Zoë, "the" <pipeline>')
def test_any_subject_and_name_within_the_contract_come_back_exactly(
    subject: str, name: str
) -> None:
    message = build(subject, name=name)

    assert_only_our_headers(message)
    assert message["Subject"] == subject
    assert sender_name(message) == name


async def test_an_email_that_cannot_be_built_is_a_permanent_failure(tmp_path: Path) -> None:
    # Not reachable through the contract (it refuses lone surrogates); if it
    # ever were, retrying would fail the same way.
    broken = OutgoingEmail(
        job_id="j",
        sender=Sender(email="p@example.com", name="n", category="c"),
        to="ada@example.com",
        subject="x",
        text="\ud800",
    )

    with pytest.raises(PermanentFailure, match="could not build the email"):
        await OutboxTransport(tmp_path).send(broken)
    assert list(tmp_path.iterdir()) == []
