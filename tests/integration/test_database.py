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


def test_a_sqlite_connection_left_read_only_is_replaced_not_kept(tmp_path: Path) -> None:
    # SQLite opens a file it may not write read-only, and the connection stays so
    # after an operator mends the permissions (seen running as an unprivileged user;
    # root ignores them, so PRAGMA query_only stands in for them here). The api then
    # answered 503 until restarted: the pool kept handing out that connection.
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from pipeline_shared.database import build_engine

    engine = build_engine(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (n INTEGER)"))
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA query_only = ON")  # back to the pool so

    with pytest.raises(OperationalError, match="readonly database"), engine.begin() as connection:
        connection.execute(text("INSERT INTO t VALUES (1)"))
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO t VALUES (2)"))
        rows = connection.execute(text("SELECT n FROM t")).scalars().all()
    engine.dispose()

    assert rows == [2]
