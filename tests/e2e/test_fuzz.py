"""Fuzz the running api from its own OpenAPI document with schemathesis."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from e2e.conftest import Pipeline

PipelineFactory = Callable[..., Pipeline]
SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")
KEY = "fuzz-key-0123456789abcdef"


# The longest test, about a minute: on a busy machine, with the suite running two
# tests at a time, it has passed the suite's 120 s.
@pytest.mark.timeout(300)
def test_no_fuzzed_request_gets_a_500_and_every_answer_matches_the_openapi_document(
    pipeline_factory: PipelineFactory, tmp_path: Path
) -> None:
    pipeline = pipeline_factory(API_KEYS=KEY)
    pipeline.api.start()
    pipeline.api.wait_ready()

    result = subprocess.run(
        [
            SCHEMATHESIS,
            "run",
            f"{pipeline.api.url}/openapi.json",
            "--checks",
            "all",
            # Our validation is deliberately stricter than JSON Schema can say
            # (email-validator refuses reserved domains such as .test, a
            # subject may not be blank), so a schema-valid request may be
            # refused with a 422; every other check applies.
            "--exclude-checks",
            "positive_data_acceptance",
            "--header",
            f"Authorization: Bearer {KEY}",
            "--max-examples",
            "40",
            "--seed",
            "20261128",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )

    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout
    assert pipeline.api.running
