"""Throw-away PostgreSQL databases for the tests, on the server at TEST_POSTGRES_URL.

Where no server answers, a test that needs one is skipped (or falls back to
SQLite), so that a developer without PostgreSQL can still run the suite; but
under ``CI=true`` it fails, since there ``.ci/run`` has started the machine's
server, and a skip would quietly drop the PostgreSQL half of every test that
runs on both databases.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import OperationalError

from pipeline_shared.database import engine_url

ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
CONNECT_TIMEOUT_SECONDS = 5


def in_ci() -> bool:
    """``CI=true`` (as CI services and ``.ci/run`` set it): PostgreSQL must answer."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def shown_url() -> str:
    """TEST_POSTGRES_URL as it can be shown: without its password."""
    return make_url(ADMIN_URL).render_as_string(hide_password=True)


def unavailable(error: OperationalError) -> None:
    """No server answers: under CI, fail the test, saying why; elsewhere, return."""
    if in_ci():
        cause = str(error.orig or error).strip().splitlines()[0]
        pytest.fail(
            f"no PostgreSQL answers at TEST_POSTGRES_URL ({shown_url()}): {cause}\n"
            "Under CI=true a test that needs PostgreSQL fails instead of skipping: "
            "start the server (.ci/run does) or point TEST_POSTGRES_URL at one.",
            pytrace=False,
        )


@contextmanager
def temporary_database(prefix: str, password: str | None = None) -> Iterator[str | None]:
    """Create a database of its own and yield its URL (with ``password`` in it, which
    trust authentication ignores), or None if no server answers (under CI=true the
    test fails instead); drop it afterwards."""
    admin = create_engine(
        engine_url(ADMIN_URL),
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS},
    )
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    refused: OperationalError | None = None
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as error:
        refused = error
    if refused is not None:
        admin.dispose()
        unavailable(refused)  # outside the except block: a failure shows no chained traceback
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
