"""The broker's definitions: the topology as RabbitMQ imports it, and the users.

``scripts/render_definitions.py`` writes ``rabbitmq/definitions.json`` from
this module, and docker compose's RabbitMQ imports that file at every boot
(``load_definitions``). It holds:

* the whole topology, exactly as ``messaging.declare_topology`` declares it
  (both exchanges, every stage's queues with the same arguments, every binding),
  so a service whose broker user may not configure finds it in place;
* an ``admin`` user (tag ``administrator``) for the management UI and
  ``pipeline-admin``;
* one user per service, with the least privilege it needs: it configures
  nothing (``^$``), writes only to the two exchanges, reads only its own work
  queue, and RabbitMQ's topic permissions confine the routing keys it may
  publish: its own events on ``events``, its own stage's queues on
  ``pipeline.queues``.

Passwords are stored the way RabbitMQ stores them
(``rabbit_password_hashing_sha256``): base64 of a 4-byte salt followed by
SHA-256 of the salt and the UTF-8 password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline_shared.events import DataProcessed, EmailSent, Event, JobFailed, JobRequested
from pipeline_shared.messaging import DEFAULT_RETRY_DELAYS
from pipeline_shared.topology import (
    EXCHANGE,
    MAILER,
    PROCESSOR,
    QUEUE_EXCHANGE,
    STAGES,
    STATUS,
    Stage,
    stage_queues,
)

DEFAULT_VHOST = "/"
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
SALT_BYTES = 4

ADMIN_USER = "admin"
ADMIN_PASSWORD_VARIABLE = "RABBITMQ_ADMIN_PASSWORD"  # noqa: S105 (a variable's name)
NOTHING = "^$"
"""The regular expression RabbitMQ reads as "no resource at all"."""
EVERYTHING = ".*"


def exactly(*names: str) -> str:
    """A regular expression matching exactly the given names and nothing else (with
    no names, ``NOTHING``)."""
    escaped = [re.escape(name) for name in names]
    if not escaped:
        return NOTHING
    return f"^{escaped[0]}$" if len(escaped) == 1 else f"^({'|'.join(escaped)})$"


def queue_family(queue: str) -> str:
    """A regular expression matching ``queue`` and the queues named after it
    (``.dlq``, ``.retry.<delay>``), whatever the retry delays."""
    return rf"^{re.escape(queue)}(\..+)?$"


@dataclass(frozen=True, slots=True)
class ServiceUser:
    """One service's broker user, and what it may do."""

    name: str
    consumes: Stage | None
    """The stage whose work queue it reads (None: it reads nothing); it retries and
    dead-letters into that stage's queues through ``pipeline.queues``."""
    publishes: tuple[type[Event], ...]
    """The events it publishes itself (``JobFailed`` comes with a stage that
    reports failures)."""

    @property
    def password_variable(self) -> str:
        """The variable holding its password, e.g. ``PROCESSOR_SERVICE_RABBITMQ_PASSWORD``."""
        return f"{self.name.upper().replace('-', '_')}_RABBITMQ_PASSWORD"

    @property
    def routing_keys(self) -> tuple[str, ...]:
        """The routing keys it may publish on ``events``."""
        keys = [event.routing_key for event in self.publishes]
        if self.consumes is not None and self.consumes.reports_failures:
            keys.append(JobFailed.routing_key)
        return tuple(dict.fromkeys(keys))

    def permissions(self) -> dict[str, str]:
        """configure, write and read, as regular expressions over resource names."""
        written = [EXCHANGE] if self.routing_keys else []
        if self.consumes is not None:
            written.append(QUEUE_EXCHANGE)
        return {
            "configure": NOTHING,
            "write": exactly(*written),
            "read": exactly(self.consumes.queue) if self.consumes is not None else NOTHING,
        }

    def topic_permissions(self) -> dict[str, dict[str, str]]:
        """Per topic exchange, the routing keys it may publish (write) and bind (read)."""
        return {
            EXCHANGE: {"write": exactly(*self.routing_keys), "read": NOTHING},
            QUEUE_EXCHANGE: {
                "write": queue_family(self.consumes.queue) if self.consumes else NOTHING,
                "read": NOTHING,
            },
        }


SERVICE_USERS: tuple[ServiceUser, ...] = (
    # The api publishes jobs and reads nothing; status-service, the api's second
    # process, reads the job events into the read model and publishes nothing.
    ServiceUser("api-service", None, (JobRequested,)),
    ServiceUser("status-service", STATUS, ()),
    ServiceUser("processor-service", PROCESSOR, (DataProcessed,)),
    ServiceUser("mailer-service", MAILER, (EmailSent,)),
)


def development_password(user: str) -> str:
    """The password a user has when none is given: not a secret."""
    return f"{user}-dev"


def password_variables() -> dict[str, str]:
    """Each user's password variable, by user name."""
    return {
        ADMIN_USER: ADMIN_PASSWORD_VARIABLE,
        **{user.name: user.password_variable for user in SERVICE_USERS},
    }


def passwords_from(environ: Mapping[str, str]) -> dict[str, str]:
    """Each user's password: its variable in ``environ`` if set, else the development one."""
    return {
        user: environ.get(variable) or development_password(user)
        for user, variable in password_variables().items()
    }


# --- passwords -----------------------------------------------------------------------------------


def hash_password(password: str, salt: bytes | None = None) -> str:
    """``password`` hashed as RabbitMQ's ``rabbit_password_hashing_sha256`` does."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    if len(salt) != SALT_BYTES:
        raise ValueError(f"the salt must be {SALT_BYTES} bytes")
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


def password_matches(password_hash: str, password: str) -> bool:
    """Whether ``password_hash`` (as ``hash_password`` makes it) is ``password``'s."""
    try:
        raw = base64.b64decode(password_hash, validate=True)
    except ValueError:
        return False
    if len(raw) != SALT_BYTES + hashlib.sha256().digest_size:
        return False
    return hmac.compare_digest(hash_password(password, raw[:SALT_BYTES]), password_hash)


# --- the definitions ------------------------------------------------------------------------------


def topology_definitions(
    retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS, vhost: str = DEFAULT_VHOST
) -> dict[str, list[dict[str, Any]]]:
    """The exchanges, queues and bindings ``declare_topology`` declares, as definitions."""
    exchanges = [
        {
            "name": name,
            "vhost": vhost,
            "type": "topic",
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": {},
        }
        for name in (EXCHANGE, QUEUE_EXCHANGE)
    ]
    queues: list[dict[str, Any]] = []
    bindings: list[dict[str, Any]] = []

    def bind(source: str, queue: str, routing_key: str) -> None:
        bindings.append(
            {
                "source": source,
                "vhost": vhost,
                "destination": queue,
                "destination_type": "queue",
                "routing_key": routing_key,
                "arguments": {},
            }
        )

    for stage in STAGES.values():
        for spec in stage_queues(stage, retry_delays):
            queues.append(
                {
                    "name": spec.name,
                    "vhost": vhost,
                    "durable": True,
                    "auto_delete": False,
                    "arguments": spec.arguments,
                }
            )
            if spec.name == stage.queue:
                for routing_key in stage.routing_keys:
                    bind(EXCHANGE, spec.name, routing_key)
            bind(QUEUE_EXCHANGE, spec.name, spec.name)
    return {"exchanges": exchanges, "queues": queues, "bindings": bindings}


def render_definitions(
    passwords: Mapping[str, str],
    *,
    retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
    vhost: str = DEFAULT_VHOST,
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole definitions file.

    ``passwords`` maps every user to its password. A user's hash in
    ``previous`` (the file as it was) is kept when it still matches the
    password, so rendering again changes nothing unless something changed.
    """
    kept = {
        user["name"]: user["password_hash"]
        for user in (previous or {}).get("users", [])
        if user.get("hashing_algorithm") == HASHING_ALGORITHM
        and password_matches(user.get("password_hash", ""), passwords.get(user["name"], ""))
    }

    def user(name: str, tags: list[str]) -> dict[str, Any]:
        if name not in passwords:
            raise KeyError(f"no password for user {name}")
        return {
            "name": name,
            "password_hash": kept.get(name) or hash_password(passwords[name]),
            "hashing_algorithm": HASHING_ALGORITHM,
            "tags": tags,
        }

    users = [user(ADMIN_USER, ["administrator"])]
    permissions = [
        {
            "user": ADMIN_USER,
            "vhost": vhost,
            "configure": EVERYTHING,
            "write": EVERYTHING,
            "read": EVERYTHING,
        }
    ]
    topic_permissions: list[dict[str, str]] = []
    for service in SERVICE_USERS:
        users.append(user(service.name, []))
        permissions.append({"user": service.name, "vhost": vhost, **service.permissions()})
        topic_permissions.extend(
            {"user": service.name, "vhost": vhost, "exchange": exchange, **rules}
            for exchange, rules in service.topic_permissions().items()
        )
    return {
        "users": users,
        "vhosts": [{"name": vhost}],
        "permissions": permissions,
        "topic_permissions": topic_permissions,
        **topology_definitions(retry_delays, vhost),
    }
