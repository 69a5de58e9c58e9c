"""Make sure a RabbitMQ broker answers at RABBITMQ_URL before `make run` starts the services.

If none answers, the URL points at this machine and `rabbitmq-server` is
installed, start it; otherwise say in one line how to get one.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

from pipeline_shared.settings import PipelineSettings, redact_url

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
START_TIMEOUT_SECONDS = 60


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def main() -> int:
    url = PipelineSettings().rabbitmq_url
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    if answers(host, port):
        return 0
    server = shutil.which("rabbitmq-server")
    if host not in LOCAL_HOSTS or server is None:
        print(
            f"No RabbitMQ answers at {redact_url(url)}; start one with `docker compose up -d "
            "rabbitmq` and set RABBITMQ_URL=amqp://admin:admin-dev@localhost:5672/",
            file=sys.stderr,
        )
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
