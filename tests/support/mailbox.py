"""What an email looked like when it left the pipeline, whichever transport carried it.

The outbox's ``.eml`` files are read the way a mail client reads them
(``email.policy.default``, which decodes encoded-words); the Mailtrap
stand-in's emails are the JSON requests the real SDK sent it.
"""

from __future__ import annotations

from dataclasses import dataclass
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Protocol

from support.mailtrap_stub import MailtrapStub
from support.waiting import wait_for

OUTBOX_HEADERS = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "X-Job-Id",
    "X-Category",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
)
"""Every header the outbox writes, once each, and nothing else."""

MAILTRAP_FIELDS = ("from", "to", "subject", "text", "category", "custom_variables")
"""Every field of the send request the mailer makes, and nothing else."""


@dataclass(frozen=True)
class Email:
    """One email as it left the pipeline."""

    transport: str
    fields: tuple[str, ...]
    """The header names in order (outbox), or the request's keys (Mailtrap)."""
    recipients: tuple[str, ...]
    """Every address in To, Cc and Bcc (outbox), or in to, cc and bcc (Mailtrap)."""
    sender: str
    subject: str
    text: str
    content_type: str
    raw: Any
    """The parsed message (outbox) or the request's JSON (Mailtrap), for messages."""


class Mailbox(Protocol):
    transport: str

    def email_of(self, job_id: str, timeout: float = 20.0) -> Email:
        """The job's email, waiting for it up to ``timeout`` seconds."""
        ...

    def has_email(self, job_id: str) -> bool: ...


class OutboxMailbox:
    transport = "outbox"

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def has_email(self, job_id: str) -> bool:
        return (self.folder / f"{job_id}.eml").exists()

    def email_of(self, job_id: str, timeout: float = 20.0) -> Email:
        path = self.folder / f"{job_id}.eml"
        wait_for(path.exists, timeout=timeout, what=f"{path.name} in the outbox")
        return parse_eml(path.read_bytes())


def parse_eml(raw: bytes) -> Email:
    message = message_from_bytes(raw, policy=email_policy.default)
    assert isinstance(message, EmailMessage)
    recipients = tuple(
        address.addr_spec
        for name in ("To", "Cc", "Bcc")
        for header in message.get_all(name, [])
        for address in header.addresses
    )
    (sender,) = message["From"].addresses
    body = message.get_body(preferencelist=("plain",))
    return Email(
        transport="outbox",
        fields=tuple(message.keys()),
        recipients=recipients,
        sender=sender.addr_spec,
        subject=str(message["Subject"]),
        text=body.get_content() if body is not None else "",
        content_type=message.get_content_type(),
        raw=message,
    )


class StubMailbox:
    transport = "mailtrap"

    def __init__(self, stub: MailtrapStub) -> None:
        self.stub = stub

    def has_email(self, job_id: str) -> bool:
        return self.stub.deliveries_by_job()[job_id] > 0

    def email_of(self, job_id: str, timeout: float = 20.0) -> Email:
        wait_for(
            lambda: self.has_email(job_id), timeout=timeout, what=f"job {job_id}'s send request"
        )
        (request,) = [r for r in self.stub.delivered if r.job_id == job_id]
        payload = request.payload
        recipients = tuple(
            str(entry.get("email"))
            for key in ("to", "cc", "bcc")
            for entry in payload.get(key) or []
        )
        return Email(
            transport="mailtrap",
            fields=tuple(payload),
            recipients=recipients,
            sender=str(payload["from"]["email"]),
            subject=str(payload["subject"]),
            text=str(payload.get("text", "")),
            content_type="text/html" if "html" in payload else "text/plain",
            raw=payload,
        )
