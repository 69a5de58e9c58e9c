"""The outbox transport: each email becomes an RFC 5322 ``.eml`` file in a folder.

It lets the pipeline run with no email account, and shows what would be sent.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from mailer_service.compose import OutgoingEmail
from mailer_service.mime import to_mime
from mailer_service.transport import Receipt
from pipeline_shared.errors import PermanentFailure, TransientFailure


class OutboxTransport:
    name = "outbox"

    def __init__(self, folder: Path) -> None:
        self._folder = folder

    async def send(self, email: OutgoingEmail) -> Receipt:
        message_id = _message_id(email)
        try:
            raw = to_mime(email, message_id).as_bytes()
        except Exception as exc:
            # The same email fails the same way every time: retrying cannot help.
            raise PermanentFailure(f"could not build the email: {exc}") from exc
        try:
            await asyncio.to_thread(self._write, email.job_id, raw)
        except OSError as exc:
            raise TransientFailure(f"could not write to the outbox: {exc}") from exc
        return Receipt(message_id=message_id)

    def _write(self, job_id: str, raw: bytes) -> None:
        self._folder.mkdir(parents=True, exist_ok=True)
        target = self._folder / f"{job_id}.eml"
        # Write then rename, so a reader never sees half a file; one file per
        # job, so writing a job again replaces its file instead of adding one.
        partial = target.with_suffix(".eml.partial")
        partial.write_bytes(raw)
        os.replace(partial, target)

    # A file in the outbox is there at once: uncertain sends (a mailer that died
    # while writing) are settled by looking, without waiting.
    reconciles = True
    settle_seconds = 0.0

    async def find_sent(self, email: OutgoingEmail, since: float) -> Receipt | None:
        exists = await asyncio.to_thread((self._folder / f"{email.job_id}.eml").exists)
        return Receipt(message_id=_message_id(email)) if exists else None

    async def close(self) -> None:
        return None


def _message_id(email: OutgoingEmail) -> str:
    # One id per job: a job written again is the same email, and says so.
    return f"<{email.job_id}@outbox.local>"
