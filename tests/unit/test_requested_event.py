"""The api's JobRequested is built from the validated request without walking its data again."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

from hypothesis import given
from hypothesis import strategies as st

from api_service.intake import requested_event
from api_service.schemas import JobRequest
from pipeline_shared.contract import TRUSTED
from pipeline_shared.events import JobRequested

text = st.text(st.characters(exclude_categories=["Cs", "Cc"]), max_size=8)
json_data = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=12,
)
requests = st.fixed_dictionaries(
    {
        "email": st.sampled_from(["ada@example.com", "Grace.H+x@Bücher.example", "a@b.co"]),
        "data": st.dictionaries(text, json_data, max_size=4),
    },
    optional={
        "subject": st.one_of(st.none(), st.sampled_from(["Hi", "=?utf-8?q?x?=", "Ünïcode"])),
        "step": st.sampled_from(["summarise", "echo"]),
    },
)


@given(requests)
def test_the_event_is_the_one_validation_would_build_and_reads_back_the_same(
    body: dict[str, Any],
) -> None:
    job = JobRequest.model_validate(body)
    job_id = uuid4()

    built = requested_event(job, job_id, "caller-1")

    validated = JobRequested.model_validate(
        {
            **job.model_dump(),
            "job_id": job_id,
            "submitted_by": "caller-1",
            "event_id": built.event_id,
            "occurred_at": built.occurred_at,
        },
        context=TRUSTED,
    )
    assert built == validated
    assert JobRequested.model_validate_json(built.model_dump_json()) == built
    assert built.model_dump_json() == validated.model_dump_json()
