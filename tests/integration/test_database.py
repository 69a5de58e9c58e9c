"""Services that share a database may start at the same moment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

OPEN_STORE = """
import sys
from api_service.store import JobStore
from mailer_service.ledger import SqlLedger

url, which = sys.argv[1], sys.argv[2]
if which == "api":
    JobStore.open(url)
else:
    SqlLedger.open(url, lease_seconds=5)
"""


@pytest.mark.parametrize("round_", range(3))
def test_the_api_and_mailers_opening_one_new_sqlite_file_at_once_all_start(
    tmp_path: Path, round_: int
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_STORE, url, which],
            stderr=subprocess.PIPE,
            text=True,
        )
        for which in ("api", "mailer", "api", "mailer", "mailer", "api")
    ]
    failures = []
    for process in processes:
        _, stderr = process.communicate(timeout=60)
        if process.returncode != 0:
            failures.append(stderr[-500:])
    assert failures == []
