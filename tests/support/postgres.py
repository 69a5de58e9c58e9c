"""Throw-away PostgreSQL databases for the tests, on the server at TEST_POSTGRES_URL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from pipeline_shared.database import engine_url

ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@contextmanager
def temporary_database(prefix: str, password: str | None = None) -> Iterator[str | None]:
    """Create a database of its own and yield its URL (with ``password`` in it, which
    trust authentication ignores), or None if no server answers; drop it afterwards."""
    admin = create_engine(engine_url(ADMIN_URL), isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError:
        admin.dispose()
        yield None
        return
    base = ADMIN_URL.rsplit("/", 1)[0]
    if password is not None:
        base = base.replace("://postgres@", f"://postgres:{password}@", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
