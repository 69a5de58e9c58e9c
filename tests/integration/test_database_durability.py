"""Which commits wait for the disk: the durable engine's, not the relaxed one's."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from pipeline_shared.database import build_engine, for_writing


@pytest.mark.parametrize("durable", [True, False])
def test_only_the_relaxed_engine_commits_without_waiting_for_the_disk(
    database_url: str, durable: bool
) -> None:
    engine = build_engine(database_url, durable=durable)
    try:
        # Inside a writing transaction, on a connection used before: a setting the
        # pool's reset or a new transaction undid would show here.
        for _ in range(2):
            with for_writing(engine).begin() as connection:
                if engine.dialect.name == "postgresql":
                    setting = connection.execute(text("SHOW synchronous_commit")).scalar()
                    assert setting == ("on" if durable else "off")
                else:
                    level = connection.execute(text("PRAGMA synchronous")).scalar()
                    assert level == (2 if durable else 1)  # FULL, NORMAL
    finally:
        engine.dispose()
