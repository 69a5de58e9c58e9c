"""Logging set-up: one plain line per record, on stderr, for every service."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Send every logger's records to stderr at ``level``; quieten chatty libraries."""
    logging.basicConfig(level=level, format=FORMAT, stream=sys.stderr, force=True)
    # The AMQP libraries log each lost connection with a traceback; the
    # messaging layer logs losing and regaining the broker in one line each.
    for noisy in ("aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.ERROR))
