"""Make sure a RabbitMQ broker answers at RABBITMQ_URL before `make run` starts the services.

If none answers, the URL points at this machine and `rabbitmq-server` is
installed, start it; otherwise print the commands that start the broker of
docker-compose.yml and point the services at it, ready to paste:

- compose interpolates the whole file whichever service it starts, and the
  file requires API_KEYS (for the api's container), so the command sets it;
- that broker loads rabbitmq/definitions.json, which has no guest user: the
  services, run here, need a RABBITMQ_URL with its admin user, who may
  declare the topology as `make run`'s services do.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

from dotenv import dotenv_values

from pipeline_shared.settings import PipelineSettings, redact_url

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
START_TIMEOUT_SECONDS = 60

# The variables docker-compose.yml requires (${NAME:?...}) that its broker does
# not use, with a value that says so.
COMPOSE_REQUIRED = {"API_KEYS": "not-needed-for-rabbitmq"}
COMPOSE_UP = (
    " ".join(f"{name}={value}" for name, value in COMPOSE_REQUIRED.items())
    + " docker compose up --wait rabbitmq"
)
# The compose broker's administrator, with the password of the committed
# rabbitmq/definitions.json, on the port compose publishes on loopback.
COMPOSE_RABBITMQ_URL = "amqp://admin:admin-dev@localhost:5672/"


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def compose_instructions() -> str:
    """How to run the broker of docker-compose.yml and point `make run` at it."""
    lines = [
        "To run the broker of docker-compose.yml instead (compose requires API_KEYS even for",
        "the broker alone, which does not use it) and let the services log in as its admin",
        "user (it has no guest user), run here:",
        "",
        f"    {COMPOSE_UP}",
        f"    export RABBITMQ_URL={COMPOSE_RABBITMQ_URL}",
        "    make run",
    ]
    if _setting("RABBITMQ_DEFINITIONS_FILE"):
        lines += [
            "",
            "RABBITMQ_DEFINITIONS_FILE is set: put your RABBITMQ_ADMIN_PASSWORD in place of",
            "admin-dev, the password of the committed rabbitmq/definitions.json.",
        ]
    return "\n".join(lines)


def _setting(name: str) -> str | None:
    """A variable as docker compose sees it: from the environment, else from ./.env."""
    return os.environ.get(name) or dotenv_values(".env").get(name) or None


def main() -> int:
    url = PipelineSettings().rabbitmq_url
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    if answers(host, port):
        return 0
    server = shutil.which("rabbitmq-server")
    if host not in LOCAL_HOSTS or server is None:
        why = "rabbitmq-server is not installed" if host in LOCAL_HOSTS else "start it"
        print(f"No RabbitMQ answers at {redact_url(url)}; {why}.", file=sys.stderr)
        print(compose_instructions(), file=sys.stderr)
        return 1
    print(
        f"No RabbitMQ answers at {host}:{port}; starting the local rabbitmq-server", file=sys.stderr
    )
    subprocess.run([server, "-detached"], check=False)  # noqa: S603
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if answers(host, port):
            return 0
        time.sleep(0.5)
    print(f"rabbitmq-server did not answer within {START_TIMEOUT_SECONDS} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
