"""The services' least-privilege broker users of rabbitmq/definitions.json, made on the test broker.

Each test gets its own users, named after the file's (``processor-service-1a2b3c4d``),
with the file's permissions and topic permissions applied to the test's vhost,
and a password hashed the way the file's are.
"""

from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from pipeline_shared.definitions import ADMIN_USER, HASHING_ALGORITHM, hash_password
from support.rabbit import BROKER_URL, Management

ROOT = Path(__file__).resolve().parents[2]
DEFINITIONS_FILE = ROOT / "rabbitmq" / "definitions.json"
TOPOLOGY_KEYS = ("exchanges", "queues", "bindings")


def committed_definitions() -> dict[str, Any]:
    definitions: dict[str, Any] = json.loads(DEFINITIONS_FILE.read_text(encoding="utf-8"))
    return definitions


def topology_of(definitions: dict[str, Any]) -> dict[str, Any]:
    """Only the exchanges, queues and bindings of a definitions file."""
    return {key: definitions[key] for key in TOPOLOGY_KEYS}


def service_user_names(definitions: dict[str, Any]) -> list[str]:
    """The services' users of the file (every user but the administrator)."""
    return [user["name"] for user in definitions["users"] if user["name"] != ADMIN_USER]


def amqp_url(user: str, password: str, vhost: str) -> str:
    """The test broker's AMQP URL, logging in as ``user`` on ``vhost``."""
    parts = urlsplit(BROKER_URL)
    credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
    netloc = f"{credentials}@{parts.hostname}:{parts.port or 5672}"
    return urlunsplit(parts._replace(netloc=netloc, path="/" + quote(vhost, safe="")))


@dataclass
class ServiceUsers:
    """The test's copies of the file's service users, by the file's user name."""

    management: Management
    definitions: dict[str, Any]
    names: dict[str, str] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, management: Management, definitions: dict[str, Any]) -> ServiceUsers:
        users = cls(management, definitions)
        suffix = uuid.uuid4().hex[:8]
        for service in service_user_names(definitions):
            name, password = f"{service}-{suffix}", secrets.token_urlsafe(16)
            management.create_user(name, hash_password(password), HASHING_ALGORITHM)
            users.names[service], users.passwords[service] = name, password
        return users

    def grant(self, vhost: str) -> None:
        """Give each user, on ``vhost``, the permissions the file gives it on its vhost."""
        for rule in self.definitions["permissions"]:
            if rule["user"] in self.names:
                self.management.set_permissions(
                    vhost, self.names[rule["user"]], rule["configure"], rule["write"], rule["read"]
                )
        for rule in self.definitions["topic_permissions"]:
            if rule["user"] in self.names:
                self.management.set_topic_permissions(
                    vhost, self.names[rule["user"]], rule["exchange"], rule["write"], rule["read"]
                )

    def url(self, service: str, vhost: str) -> str:
        """An AMQP URL logging in as the service's user, on ``vhost``."""
        return amqp_url(self.names[service], self.passwords[service], vhost)

    def delete(self) -> None:
        for name in self.names.values():
            self.management.delete_user(name)
