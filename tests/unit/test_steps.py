"""Processing steps, their registry, and the processor's ProcessJob handler."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline_shared.errors import PermanentFailure
from pipeline_shared.events import DataProcessed
from pipeline_shared.messaging import delivery_size
from processor_service.handlers import ProcessJob, describe_failure
from processor_service.steps import (
    INLINE_STEPS,
    STEPS,
    Step,
    UnknownStep,
    echo,
    get_step,
    step,
    summarise,
    word_count,
)
from unit.fakes import FakePublisher, job_requested

# --- summarise --------------------------------------------------------------


def test_summarise_counts_fields_and_summarises_the_numeric_ones() -> None:
    result = summarise({"a": 1, "b": 2.5, "name": "Ada", "visits": [3, 5, 8]})

    assert result == {
        "field_count": 4,
        "numeric_fields": ["a", "b"],
        "numeric_summary": {"min": 1.0, "max": 2.5, "mean": 1.75},
        "list_lengths": {"visits": 3},
    }


def test_summarise_does_not_count_booleans_as_numbers() -> None:
    result = summarise({"ok": True, "failed": False, "n": 10})

    assert result["numeric_fields"] == ["n"]
    assert result["numeric_summary"] == {"min": 10.0, "max": 10.0, "mean": 10.0}
    assert result["field_count"] == 3


def test_summarise_without_numbers_has_no_numeric_summary() -> None:
    result = summarise({"ok": True, "name": "Ada", "nothing": None})

    assert result["numeric_fields"] == []
    assert result["numeric_summary"] is None


def test_summarise_of_empty_data_is_an_empty_summary() -> None:
    assert summarise({}) == {
        "field_count": 0,
        "numeric_fields": [],
        "numeric_summary": None,
        "list_lengths": {},
    }


def test_summarise_reports_the_length_of_every_list_including_empty_ones() -> None:
    result = summarise({"empty": [], "three": [1, 2, 3], "nested": [[1], [2]]})

    assert result["list_lengths"] == {"empty": 0, "three": 3, "nested": 2}
    assert result["numeric_summary"] is None


def test_summarise_handles_negative_numbers_in_its_statistics() -> None:
    result = summarise({"a": -4, "b": 0, "c": 10})

    assert result["numeric_summary"] == {"min": -4.0, "max": 10.0, "mean": 2.0}


def test_summarise_keeps_large_integers_exact_and_its_mean_finite() -> None:
    # Integers near a double's limit: float() of their sum would overflow.
    big = 10**308
    result = summarise({"a": big, "b": big + 1, "c": -(10**307)})

    assert result["numeric_fields"] == ["a", "b", "c"]
    summary = result["numeric_summary"]
    assert summary["min"] == -(10**307)
    assert summary["max"] == big + 1
    assert summary["mean"] == pytest.approx((2 * big - 10**307) / 3)


def test_summarise_of_one_integer_beyond_float_precision_reports_it_exactly() -> None:
    value = 2**53 + 1

    assert summarise({"n": value})["numeric_summary"]["max"] == value


def test_word_count_counts_the_words_of_the_text_field() -> None:
    assert word_count({"text": "the quick  brown\nfox"}) == {"words": 4}
    assert word_count({}) == {"words": 0}


def test_echo_returns_a_copy_of_the_data() -> None:
    data = {"name": "Ada", "visits": [3, 5]}

    result = echo(data)

    assert result == data
    assert result is not data


# --- the registry -----------------------------------------------------------


@pytest.fixture
def restore_steps() -> Iterator[None]:
    """Let a test register steps in the global registry and take them out again."""
    before = dict(STEPS)
    try:
        yield
    finally:
        STEPS.clear()
        STEPS.update(before)


def test_the_built_in_steps_are_registered_by_name() -> None:
    assert STEPS["summarise"] is summarise
    assert STEPS["echo"] is echo


@pytest.mark.usefixtures("restore_steps")
def test_the_step_decorator_registers_the_function_and_returns_it_unchanged() -> None:
    def count_keys(data: Mapping[str, Any]) -> dict[str, Any]:
        return {"keys": len(data)}

    decorated = step("count_keys")(count_keys)

    assert decorated is count_keys
    assert get_step("count_keys") is count_keys


@pytest.mark.usefixtures("restore_steps")
def test_registering_a_second_step_under_a_taken_name_is_refused() -> None:
    def impostor(data: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    with pytest.raises(
        ValueError, match="a processing step named 'summarise' is already registered"
    ):
        step("summarise")(impostor)

    assert STEPS["summarise"] is summarise


def test_get_step_looks_up_a_given_registry() -> None:
    def local(data: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    assert get_step("local", {"local": local}) is local


def test_an_unknown_step_is_refused_listing_the_known_names_in_order() -> None:
    def noop(data: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    with pytest.raises(UnknownStep) as caught:
        get_step("nope", {"zeta": noop, "alpha": noop})

    assert str(caught.value) == "unknown processing step 'nope' (known: alpha, zeta)"


def test_an_unknown_step_in_an_empty_registry_says_none_are_known() -> None:
    with pytest.raises(UnknownStep, match=r"\(known: none\)"):
        get_step("summarise", {})


def test_an_unknown_step_in_the_default_registry_lists_the_built_in_steps() -> None:
    with pytest.raises(UnknownStep, match="echo, summarise"):
        get_step("translate")


# --- ProcessJob -------------------------------------------------------------


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2, thread_name_prefix="step") as pool:
        yield pool


def returns_a_list(data: Mapping[str, Any]) -> Any:
    return [1, 2, 3]


def explodes(data: Mapping[str, Any]) -> dict[str, Any]:
    raise ZeroDivisionError("division by zero in the report")


class NotJson:
    pass


def returns_an_object(data: Mapping[str, Any]) -> dict[str, Any]:
    return {"when": NotJson()}


def returns_non_string_keys(data: Mapping[str, Any]) -> dict[Any, Any]:
    return {1: "one"}


TEST_STEPS: dict[str, Step] = {
    "summarise": summarise,
    "echo": echo,
    "explodes": explodes,
    "returns_a_list": returns_a_list,
    "returns_an_object": returns_an_object,
    "returns_non_string_keys": returns_non_string_keys,
}


async def test_a_job_is_processed_and_data_processed_is_published(
    executor: ThreadPoolExecutor,
) -> None:
    publisher = FakePublisher()
    job = job_requested(
        data={"a": 1, "b": 3, "tags": ["x"]}, step="summarise", submitted_by="key-ada"
    )

    await ProcessJob(publisher, executor, steps=TEST_STEPS)(job)

    assert len(publisher.published) == 1
    processed = publisher.published[0]
    assert isinstance(processed, DataProcessed)
    assert processed.job_id == job.job_id
    assert processed.email == job.email
    assert processed.subject == job.subject
    assert processed.step == "summarise"
    assert processed.data == {"a": 1, "b": 3, "tags": ["x"]}
    assert processed.result == summarise(job.data)
    assert processed.event_id != job.event_id
    assert processed.requested_at == job.occurred_at
    assert processed.submitted_by == "key-ada"  # the read model's owner, carried on


async def test_the_step_runs_in_the_executor_not_on_the_event_loop(
    executor: ThreadPoolExecutor,
) -> None:
    threads: list[str] = []

    def records_thread(data: Mapping[str, Any]) -> dict[str, Any]:
        threads.append(threading.current_thread().name)
        return {}

    publisher = FakePublisher()
    await ProcessJob(publisher, executor, steps={"records": records_thread})(
        job_requested(step="records")
    )

    assert len(threads) == 1
    assert threads[0].startswith("step")
    assert threads[0] != threading.current_thread().name


def thread_recorder(threads: list[str]) -> Step:
    def records_thread(data: Mapping[str, Any]) -> dict[str, Any]:
        threads.append(threading.current_thread().name)
        return {}

    return records_thread


async def test_an_inline_step_runs_on_the_event_loop_for_a_small_job(
    executor: ThreadPoolExecutor,
) -> None:
    threads: list[str] = []
    steps = {"records": thread_recorder(threads)}
    process = ProcessJob(FakePublisher(), executor, steps=steps, inline={"records"})

    delivery_size.set(300)
    await process(job_requested(step="records"))

    assert threads == [threading.current_thread().name]


async def test_an_inline_step_goes_to_a_thread_for_a_large_job(
    executor: ThreadPoolExecutor,
) -> None:
    threads: list[str] = []
    steps = {"records": thread_recorder(threads)}
    process = ProcessJob(FakePublisher(), executor, steps=steps, inline={"records"})

    delivery_size.set(50_000)
    await process(job_requested(step="records"))

    assert len(threads) == 1
    assert threads[0].startswith("step")


def test_the_built_in_steps_are_inline() -> None:
    assert {"summarise", "word_count", "echo"} <= INLINE_STEPS


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), json_values, max_size=6))
def test_an_inline_step_never_changes_its_input(data: dict[str, Any]) -> None:
    # The promise that lets an inline step run without a copy of the data.
    for name in INLINE_STEPS:
        before = repr(data)
        # A step may refuse the data; it must still not change it.
        with contextlib.suppress(Exception):
            STEPS[name](data)
        assert repr(data) == before, name


async def test_the_step_is_taken_from_the_given_registry(executor: ThreadPoolExecutor) -> None:
    publisher = FakePublisher()

    await ProcessJob(publisher, executor, steps=TEST_STEPS)(
        job_requested(step="echo", data={"name": "Ada"})
    )

    assert publisher.published[0].result == {"name": "Ada"}  # type: ignore[attr-defined]


async def test_an_unknown_step_is_a_permanent_failure_and_nothing_is_published(
    executor: ThreadPoolExecutor,
) -> None:
    publisher = FakePublisher()

    with pytest.raises(PermanentFailure) as caught:
        await ProcessJob(publisher, executor, steps={"echo": echo})(job_requested(step="nope"))

    assert caught.value.reason == "unknown processing step 'nope' (known: echo)"
    assert isinstance(caught.value.__cause__, UnknownStep)
    assert publisher.published == []


async def test_a_step_that_raises_is_a_permanent_failure_with_the_reason(
    executor: ThreadPoolExecutor,
) -> None:
    publisher = FakePublisher()

    with pytest.raises(PermanentFailure) as caught:
        await ProcessJob(publisher, executor, steps=TEST_STEPS)(job_requested(step="explodes"))

    assert caught.value.reason == ("step 'explodes' failed: division by zero in the report")
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
    assert publisher.published == []


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (KeyError("text"), "the data has no field 'text'"),
        (ValueError(""), "the step raised an error without a message"),
        (RecursionError("maximum recursion depth exceeded"), "too large or too deep"),
        (OverflowError("int too large to convert to float"), "int too large to convert"),
    ],
)
def test_a_steps_failure_is_described_in_words_without_its_class_name(
    exc: Exception, words: str
) -> None:
    described = describe_failure(exc)

    assert words in described
    assert type(exc).__name__ not in described


async def test_a_result_too_large_to_carry_fails_the_job_in_words_before_publishing(
    executor: ThreadPoolExecutor,
) -> None:
    publisher = FakePublisher()
    process = ProcessJob(publisher, executor, steps=TEST_STEPS, max_event_bytes=4096)

    with pytest.raises(PermanentFailure, match="too large to carry") as caught:
        await process(job_requested(step="echo", data={"x": [1e15] * 300}))

    assert "over MAX_EVENT_BYTES (4096)" in caught.value.reason
    assert publisher.published == []


async def test_a_step_that_returns_something_other_than_a_dict_is_a_permanent_failure(
    executor: ThreadPoolExecutor,
) -> None:
    publisher = FakePublisher()

    with pytest.raises(PermanentFailure) as caught:
        await ProcessJob(publisher, executor, steps=TEST_STEPS)(
            job_requested(step="returns_a_list")
        )

    assert caught.value.reason == "step 'returns_a_list' returned list, not a dict"
    assert publisher.published == []


async def test_a_result_with_non_string_keys_is_a_permanent_failure(
    executor: ThreadPoolExecutor,
) -> None:
    publisher = FakePublisher()

    with pytest.raises(PermanentFailure, match="returned a result that is not JSON"):
        await ProcessJob(publisher, executor, steps=TEST_STEPS)(
            job_requested(step="returns_non_string_keys")
        )

    assert publisher.published == []


async def test_a_result_that_cannot_be_serialised_to_json_is_a_permanent_failure(
    executor: ThreadPoolExecutor,
) -> None:
    publisher = FakePublisher()

    with pytest.raises(PermanentFailure, match="returned a result that is not JSON"):
        await ProcessJob(publisher, executor, steps=TEST_STEPS)(
            job_requested(step="returns_an_object")
        )

    assert publisher.published == []


def _nested(depth: int) -> dict[str, object]:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return {"deep": value}


@pytest.mark.parametrize(
    ("result", "problem"),
    [
        ({"mean": math.nan}, "result.mean"),
        (_nested(40), "deeper"),
        ({"line": "a\x00b"}, "control character"),
    ],
    ids=["nan", "too-deep", "nul"],
)
async def test_a_result_outside_the_limits_of_a_job_fails_though_its_input_is_trusted(
    executor: ThreadPoolExecutor, result: dict[str, object], problem: str
) -> None:
    publisher = FakePublisher()
    steps = {"produces": lambda data: result}

    with pytest.raises(PermanentFailure, match="returned a result that is not JSON") as caught:
        await ProcessJob(publisher, executor, steps=steps)(job_requested(step="produces"))

    assert problem in caught.value.reason
    assert publisher.published == []


async def test_outside_a_delivery_an_inline_step_still_goes_to_a_thread(
    executor: ThreadPoolExecutor,
) -> None:
    # An unknown size is no small size.
    threads: list[str] = []
    steps = {"records": thread_recorder(threads)}
    process = ProcessJob(FakePublisher(), executor, steps=steps, inline={"records"})

    await process(job_requested(step="records"))

    assert len(threads) == 1
    assert threads[0].startswith("step")
