"""API keys: who is calling, checked in constant time.

``API_KEYS`` lists keys, each either plain or ``sha256:<hex digest>`` of the
key (so the settings need not hold the key itself). A presented key is
hashed and compared with every configured digest using
``hmac.compare_digest``. The caller's identity is a short prefix of the
key's digest: it scopes idempotency keys and job visibility, and never
reveals the key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass

ANONYMOUS = "anonymous"
"""The caller when no API key is configured (loopback development only)."""

_DIGEST_PREFIX = "sha256:"


class InvalidApiKeySetting(ValueError):
    pass


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_api_keys(value: str) -> tuple[str, ...]:
    """The configured keys as sha256 hex digests."""
    digests = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        if item.startswith(_DIGEST_PREFIX):
            hexdigest = item.removeprefix(_DIGEST_PREFIX).lower()
            if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
                raise InvalidApiKeySetting("a sha256: entry must be 64 hexadecimal characters")
            digests.append(hexdigest)
        else:
            if len(item) < 16:
                raise InvalidApiKeySetting("a plain key must be at least 16 characters long")
            digests.append(digest(item))
    return tuple(digests)


@dataclass(frozen=True, slots=True)
class ApiKeys:
    digests: tuple[str, ...]

    @property
    def required(self) -> bool:
        return bool(self.digests)

    def caller_of(self, authorization: str | None) -> str | None:
        """The caller id for an ``Authorization`` header value, or None if not valid."""
        if not self.required:
            return ANONYMOUS
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return None
        presented_digest = digest(presented.strip())
        matched = False
        for candidate in self.digests:
            # Compare with every key, so the time taken says nothing about which.
            matched |= hmac.compare_digest(presented_digest, candidate)
        return f"key-{presented_digest[:16]}" if matched else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
