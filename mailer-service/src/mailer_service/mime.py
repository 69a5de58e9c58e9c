"""An email as RFC 5322 bytes, built so that no field's content is read as header syntax.

The standard library's ``EmailMessage`` parses every header value it is given:
an RFC 2047 encoded-word in a subject (``=?utf-8?q?Hi=0D=0ABcc:...?=``) is
decoded, and its CR LF becomes a new header. Here nothing is parsed: each
header is written from values that are already checked (addresses by
``pipeline_shared.contract``), and any free text that is not plain printable
ASCII, or that merely looks like an encoded-word, is itself encoded as
base64 encoded-words, so a reader shows it as the text it was.
"""

from __future__ import annotations

import re
from email.charset import BASE64, QP, Charset
from email.header import Header
from email.message import Message
from email.utils import formataddr, formatdate
from typing import TypeAlias

from mailer_service.compose import OutgoingEmail

# Printable ASCII that a reader gives back as it was: no encoded-word look-alike,
# and no edge or repeated spaces, which unfolding and parsing may change.
_PLAIN = re.compile(r"(?!.*=\?)(?!.*  )[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")

_HEADER_UTF8 = Charset("utf-8")
_HEADER_UTF8.header_encoding = BASE64

_BODY_UTF8 = Charset("utf-8")
_BODY_UTF8.body_encoding = QP


def _is_plain(text: str) -> bool:
    return _PLAIN.fullmatch(text) is not None


class _Unfolded(Header):
    """Plain text, written on one line: folding before a long word would put a space in
    front of it. The contract keeps every such field far below RFC 5322's 998 characters."""

    def encode(
        self, splitchars: str = ";, \t", maxlinelen: int | None = None, linesep: str = "\n"
    ) -> str:
        return super().encode(splitchars, maxlinelen=0, linesep=linesep)


def unstructured(text: str, header_name: str) -> Header:
    """A header value that says ``text`` and nothing else (subject, category)."""
    if _is_plain(text):
        return _Unfolded(text, "us-ascii", header_name=header_name)
    return Header(text, _HEADER_UTF8, header_name=header_name)


def mailbox(name: str, address: str, header_name: str) -> Header | str:
    """``Name <address>``; ``address`` must already be a checked ASCII address."""
    if not name:
        return address
    if _is_plain(name):
        # formataddr quotes and escapes a plain name that holds specials.
        return _Unfolded(formataddr((name, address)), "us-ascii", header_name=header_name)
    header = Header(header_name=header_name)
    header.append(name, _HEADER_UTF8)
    header.append(f"<{address}>", "us-ascii")
    return header


# The compat32 model stores header values as given, never parsed.
MimeMessage: TypeAlias = "Message[str, Header | str]"


def to_mime(email: OutgoingEmail, message_id: str) -> MimeMessage:
    message: MimeMessage = Message()
    message["From"] = mailbox(email.sender.name, email.sender.email, "From")
    message["To"] = email.to
    message["Subject"] = unstructured(email.subject, "Subject")
    message["Date"] = formatdate(localtime=False, usegmt=True)
    message["Message-ID"] = message_id
    message["X-Job-Id"] = email.job_id
    message["X-Category"] = unstructured(email.sender.category, "X-Category")
    # Sets MIME-Version, Content-Type (text/plain; charset="utf-8") and the
    # quoted-printable Content-Transfer-Encoding.
    message.set_payload(email.text, _BODY_UTF8)
    return message
