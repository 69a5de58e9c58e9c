"""Write rabbitmq/definitions.json, which docker compose's RabbitMQ imports at boot.

    .venv/bin/python scripts/render_definitions.py            # the committed file
    .venv/bin/python scripts/render_definitions.py --check    # is it up to date?

The file holds the pipeline's topology, built from ``pipeline_shared.topology``
exactly as the services declare it, and the broker users: ``admin`` (management
UI, pipeline-admin) and one least-privilege user per service (see
``pipeline_shared.definitions``).

Passwords come from RABBITMQ_ADMIN_PASSWORD, API_SERVICE_RABBITMQ_PASSWORD,
STATUS_SERVICE_RABBITMQ_PASSWORD, PROCESSOR_SERVICE_RABBITMQ_PASSWORD and
MAILER_SERVICE_RABBITMQ_PASSWORD (the
environment, then ``--env-file``); an unset one is the development password,
the user's name followed by ``-dev``. The committed file holds only those. For
other passwords, set them in .env (compose puts the same variables in the
services' URLs), write a file of your own (``*.local.json`` is ignored by git)
and point RABBITMQ_DEFINITIONS_FILE in .env at it:

    .venv/bin/python scripts/render_definitions.py --env-file .env \\
        --output rabbitmq/definitions.local.json

A user's hash is kept when it still matches its password, so rendering again
changes nothing unless a password or the topology did.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from pipeline_shared.definitions import development_password, passwords_from, render_definitions
from pipeline_shared.messaging import DEFAULT_RETRY_DELAYS

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "rabbitmq" / "definitions.json"


def delays(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError("positive numbers of seconds, comma-separated")
    return values


def passwords(env_file: Path | None) -> dict[str, str]:
    from_file = {k: v for k, v in dotenv_values(env_file).items() if v} if env_file else {}
    return passwords_from({**from_file, **os.environ})


def render_text(
    passwords: dict[str, str], previous: dict[str, Any] | None, retry_delays: tuple[float, ...]
) -> str:
    definitions = render_definitions(passwords, retry_delays=retry_delays, previous=previous)
    return json.dumps(definitions, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=COMMITTED)
    parser.add_argument("--env-file", type=Path, help="read the password variables from it too")
    parser.add_argument(
        "--retry-delays",
        type=delays,
        default=DEFAULT_RETRY_DELAYS,
        help="the services' RETRY_DELAYS: one retry queue per delay (default: %(default)s)",
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; fail if the file is not up to date"
    )
    args = parser.parse_args(argv)
    output: Path = args.output
    chosen = passwords(args.env_file)
    custom = sorted(user for user, pw in chosen.items() if pw != development_password(user))
    if custom and output.resolve() == COMMITTED:
        print(
            f"{COMMITTED.relative_to(ROOT)} holds only the development passwords, and it is "
            f"committed; write the passwords of {', '.join(custom)} to a file of your own with "
            "--output rabbitmq/definitions.local.json",
            file=sys.stderr,
        )
        return 2
    current = output.read_text(encoding="utf-8") if output.exists() else None
    rendered = render_text(chosen, json.loads(current) if current else None, args.retry_delays)
    if args.check:
        if rendered != current:
            print(f"{output} is out of date: run scripts/render_definitions.py", file=sys.stderr)
            return 1
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(rendered, encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
