"""The test broker: one throw-away vhost per test, made through the management HTTP API."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from pipeline_shared.events import any_event_adapter
from pipeline_shared.messaging import bundle

BROKER_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
MANAGEMENT_URL = os.environ.get("RABBITMQ_MANAGEMENT_URL", "http://127.0.0.1:15672")


def _credentials() -> tuple[str, str]:
    parts = urlsplit(BROKER_URL)
    return parts.username or "guest", parts.password or "guest"


@dataclass
class Management:
    """A small client for the parts of the management API the tests use."""

    client: httpx.Client

    @classmethod
    def connect(cls) -> Management:
        return cls(httpx.Client(base_url=MANAGEMENT_URL, auth=_credentials(), timeout=10))

    def available(self) -> bool:
        try:
            return self.client.get("/api/overview").status_code == 200
        except httpx.HTTPError:
            return False

    def create_vhost(self, name: str) -> None:
        self.client.put(f"/api/vhosts/{quote(name, safe='')}").raise_for_status()
        user = _credentials()[0]
        self.client.put(
            f"/api/permissions/{quote(name, safe='')}/{quote(user, safe='')}",
            json={"configure": ".*", "write": ".*", "read": ".*"},
        ).raise_for_status()

    def delete_vhost(self, name: str) -> None:
        response = self.client.delete(f"/api/vhosts/{quote(name, safe='')}")
        if response.status_code not in (204, 404):
            response.raise_for_status()

    def set_policy(self, vhost: str, name: str, pattern: str, definition: dict[str, Any]) -> None:
        """A queue policy in ``vhost`` (gone with the vhost)."""
        self.client.put(
            f"/api/policies/{quote(vhost, safe='')}/{quote(name, safe='')}",
            json={"pattern": pattern, "definition": definition, "apply-to": "queues"},
        ).raise_for_status()

    def delete_queue(self, vhost: str, queue: str) -> None:
        path = f"/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}"
        self.client.delete(path).raise_for_status()

    def queue(self, vhost: str, queue: str) -> dict[str, Any] | None:
        """The queue as the management API shows it, or None if there is none.

        Its depth (``messages``, ``messages_ready``, ``messages_unacknowledged``)
        is a snapshot the broker refreshes every statistics interval (5 s by
        default): read just after a publish it may still be the zero of before,
        or missing. Read the depth now with ``messages_ready_now`` instead.
        """
        response = self.client.get(f"/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        info: dict[str, Any] = response.json()
        return info

    def consumers(self, vhost: str, queue: str) -> int:
        """Consumers of ``queue`` now (the consumer list is current; the queue's
        own ``consumers`` figure lags by the statistics interval)."""
        response = self.client.get(f"/api/consumers/{quote(vhost, safe='')}")
        response.raise_for_status()
        return sum(1 for c in response.json() if c["queue"]["name"] == queue)

    def peek(self, vhost: str, queue: str, count: int = 100) -> list[dict[str, Any]]:
        """Up to ``count`` messages of ``queue``, left in place (requeued)."""
        response = self.client.post(
            f"/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}/get",
            json={"count": count, "ackmode": "ack_requeue_true", "encoding": "auto"},
        )
        response.raise_for_status()
        messages: list[dict[str, Any]] = response.json()
        return messages

    def definitions(self, vhost: str) -> dict[str, Any]:
        """The vhost's exchanges, queues, bindings and policies, as RabbitMQ exports them."""
        response = self.client.get(f"/api/definitions/{quote(vhost, safe='')}")
        response.raise_for_status()
        exported: dict[str, Any] = response.json()
        return exported

    def load_definitions(self, vhost: str, definitions: dict[str, Any]) -> None:
        """Import exchanges, queues and bindings into ``vhost`` (their own ``vhost`` is ignored)."""
        self.client.post(
            f"/api/definitions/{quote(vhost, safe='')}", json=definitions
        ).raise_for_status()

    def create_user(self, name: str, password_hash: str, hashing_algorithm: str) -> None:
        self.client.put(
            f"/api/users/{quote(name, safe='')}",
            json={
                "password_hash": password_hash,
                "hashing_algorithm": hashing_algorithm,
                "tags": [],
            },
        ).raise_for_status()

    def delete_user(self, name: str) -> None:
        response = self.client.delete(f"/api/users/{quote(name, safe='')}")
        if response.status_code not in (204, 404):
            response.raise_for_status()

    def set_permissions(self, vhost: str, user: str, configure: str, write: str, read: str) -> None:
        self.client.put(
            f"/api/permissions/{quote(vhost, safe='')}/{quote(user, safe='')}",
            json={"configure": configure, "write": write, "read": read},
        ).raise_for_status()

    def set_topic_permissions(
        self, vhost: str, user: str, exchange: str, write: str, read: str
    ) -> None:
        self.client.put(
            f"/api/topic-permissions/{quote(vhost, safe='')}/{quote(user, safe='')}",
            json={"exchange": exchange, "write": write, "read": read},
        ).raise_for_status()

    def topic_permissions(self, vhost: str, user: str) -> list[dict[str, Any]]:
        response = self.client.get(
            f"/api/users/{quote(user, safe='')}/topic-permissions",
        )
        response.raise_for_status()
        return [p for p in response.json() if p["vhost"] == vhost]

    def close(self) -> None:
        self.client.close()


async def messages_ready_now(channel: AbstractChannel, queue: str) -> int:
    """Messages ready in ``queue`` at this moment, from the broker itself (a
    passive declare), not the management API's periodic snapshot."""
    underlay = await channel.get_underlay_channel()
    declared = await underlay.queue_declare(queue, passive=True)
    return declared.message_count or 0


def job_ids_of(message: AbstractIncomingMessage) -> list[str]:
    """The job of each event a message carries, alone or in a bundle."""
    events = bundle.decode_all(message.body, message.headers, any_event_adapter, 1 << 30)
    return [str(event.job_id) for event in events]


def new_vhost_name(prefix: str = "test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def url_for_vhost(vhost: str, base: str = BROKER_URL) -> str:
    """``base`` with its vhost replaced by ``vhost``."""
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))
