"""The outbox transport: each email becomes an RFC 5322 ``.eml`` file in a folder.

It lets the pipeline run with no email account, and shows what would be sent.
"""

from __future__ import annotations

import asyncio
import os
from email.message import EmailMessage
from email.utils import formataddr, formatdate, make_msgid
from pathlib import Path

from mailer_service.compose import OutgoingEmail
from mailer_service.transport import Receipt
from pipeline_shared.errors import TransientFailure


def to_mime(email: OutgoingEmail, message_id: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = formataddr((email.sender.name, email.sender.email))
    message["To"] = email.to
    message["Subject"] = email.subject
    message["Date"] = formatdate(localtime=False, usegmt=True)
    message["Message-ID"] = message_id
    message["X-Job-Id"] = email.job_id
    message["X-Category"] = email.sender.category
    message.set_content(email.text)
    return message


class OutboxTransport:
    name = "outbox"

    def __init__(self, folder: Path) -> None:
        self._folder = folder

    async def send(self, email: OutgoingEmail) -> Receipt:
        try:
            message_id = await asyncio.to_thread(self._write, email)
        except OSError as exc:
            raise TransientFailure(f"could not write to the outbox: {exc}") from exc
        return Receipt(message_id=message_id)

    def _write(self, email: OutgoingEmail) -> str:
        self._folder.mkdir(parents=True, exist_ok=True)
        message_id = make_msgid(idstring=email.job_id, domain="outbox.local")
        target = self._folder / f"{email.job_id}.eml"
        # Write then rename, so a reader never sees half a file; one file per
        # job, so writing a job again replaces its file instead of adding one.
        partial = target.with_suffix(".eml.partial")
        partial.write_bytes(bytes(to_mime(email, message_id)))
        os.replace(partial, target)
        return message_id

    async def close(self) -> None:
        return None
