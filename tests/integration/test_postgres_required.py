"""Tests that need PostgreSQL skip where no server answers, and fail under CI=true.

A developer without PostgreSQL still runs the suite; CI, where ``.ci/run``
starts the server, must not pass by skipping the PostgreSQL half of the tests.
Each case runs pytest in a subprocess on the first test below, with
TEST_POSTGRES_URL pointing at a port where nothing listens.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from pipeline_shared.database import build_engine
from support.services import free_port

ROOT = Path(__file__).resolve().parents[2]
NEEDS_POSTGRES = "test_a_database_of_the_modules_own_takes_queries"


def test_a_database_of_the_modules_own_takes_queries(postgres_database: str) -> None:
    engine = build_engine(postgres_database)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()


def run_with_no_server(ci: str | None) -> subprocess.CompletedProcess[str]:
    """pytest on the test above, with ``CI`` set to ``ci`` (or unset) and no server."""
    env = {k: v for k, v in os.environ.items() if k not in {"CI", "PYTEST_ADDOPTS"}}
    if ci is not None:
        env["CI"] = ci
    env["TEST_POSTGRES_URL"] = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            f"{Path(__file__).relative_to(ROOT)}::{NEEDS_POSTGRES}",
            "-p",
            "no:cacheprovider",
            "-rs",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("ci", [None, "false"], ids=["unset", "false"])
def test_without_ci_a_test_that_needs_postgresql_is_skipped_saying_why(ci: str | None) -> None:
    result = run_with_no_server(ci)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "1 skipped" in result.stdout, report
    assert "no PostgreSQL answers at TEST_POSTGRES_URL (postgresql://" in result.stdout, report


def test_under_ci_true_a_test_that_needs_postgresql_fails_saying_why() -> None:
    result = run_with_no_server("true")
    report = result.stdout + result.stderr
    assert result.returncode == 1, report
    assert "skipped" not in result.stdout, report
    assert "1 error" in result.stdout, report
    assert "no PostgreSQL answers at TEST_POSTGRES_URL (postgresql://" in result.stdout, report
    assert "Under CI=true a test that needs PostgreSQL fails instead of skipping" in result.stdout
