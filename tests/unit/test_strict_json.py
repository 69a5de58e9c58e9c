"""The api's strict JSON body parser and its 422 answers."""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from api_service.problems import validation_problems
from api_service.strict_json import MAX_BODY_DEPTH, InvalidJsonBody, parse_json_body
from pipeline_shared.contract import MAX_REPORTED_PROBLEMS

pytestmark = pytest.mark.unit


def problems_of(body: str | bytes) -> list[dict[str, Any]]:
    raw = body.encode() if isinstance(body, str) else body
    with pytest.raises(InvalidJsonBody) as caught:
        parse_json_body(raw)
    assert caught.value.status_code == 422
    detail: list[dict[str, Any]] = caught.value.detail  # type: ignore[assignment]
    return detail


def test_a_duplicate_key_is_refused_naming_the_key() -> None:
    [problem] = problems_of('{"email": "ada@example.com", "email": "eve@example.com"}')

    assert problem == {
        "type": "duplicate_key",
        "loc": ["body", "email"],
        "msg": "duplicate key 'email'",
    }


def test_a_duplicate_key_deep_inside_is_refused_with_its_path() -> None:
    [problem] = problems_of('{"data": {"rows": [{"a": 1}, {"b": 1, "b": 2}]}}')

    assert problem["loc"] == ["body", "data", "rows", 1, "b"]


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused_where_they_stand(constant: str) -> None:
    [problem] = problems_of(f'{{"data": {{"x": [1, {constant}]}}}}')

    assert problem["loc"] == ["body", "data", "x", 1]
    assert "not a JSON number" in problem["msg"]


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "1.5E+309"])
def test_a_number_beyond_a_doubles_range_is_refused_not_made_infinite(literal: str) -> None:
    [problem] = problems_of(f'{{"data": {{"x": {literal}}}}}')

    assert problem["loc"] == ["body", "data", "x"]
    assert "out of range" in problem["msg"]


@pytest.mark.parametrize("literal", ["1e-400", "-0.0000001e-330"])
def test_a_number_too_small_to_represent_is_refused_not_made_zero(literal: str) -> None:
    [problem] = problems_of(f'{{"x": {literal}}}')

    assert "too small" in problem["msg"]


@pytest.mark.parametrize("literal", ["0", "0.0", "-0.0", "0e10", "5e-324", "1e308", "-1.5"])
def test_ordinary_numbers_keep_their_value(literal: str) -> None:
    assert parse_json_body(f'{{"x": {literal}}}'.encode()) == {"x": json.loads(literal)}


@pytest.mark.parametrize(
    ("literal", "carried"),
    [
        ("0.1000000000000000055511151231257827", "0.1"),
        ("0." + "1" * 100_000, "0.1111111111111111"),
        ("3.14159265358979323846", "3.141592653589793"),
        ("12345678901234567890.0", "1.2345678901234567e+19"),
        ("1.23456789e-320", "1.2347e-320"),  # a subnormal keeps fewer digits
    ],
)
def test_a_number_a_double_cannot_carry_as_written_is_refused_not_rounded(
    literal: str, carried: str
) -> None:
    [problem] = problems_of(f'{{"data": {{"x": {literal}}}}}')

    assert problem["loc"] == ["body", "data", "x"]
    assert problem["msg"] == (
        f"number has more digits than a double keeps (it would be carried as {carried})"
    )


@pytest.mark.parametrize("literal", ["1.50000000000000000000", "0.30000000000000004", "1e22"])
def test_digits_that_change_nothing_are_accepted(literal: str) -> None:
    assert parse_json_body(f'{{"x": {literal}}}'.encode()) == {"x": float(literal)}


@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_a_number_accepted_is_carried_as_the_number_written(number: Decimal) -> None:
    literal = f"{number:e}" if number.adjusted() > 20 or number.adjusted() < -20 else str(number)
    if "." not in literal and "e" not in literal.lower():
        literal += ".0"  # a float literal, not an integer one
    try:
        parsed = parse_json_body(f'{{"x": {literal}}}'.encode())
    except InvalidJsonBody:
        return
    assert Decimal(repr(parsed["x"])) == Decimal(literal)


@pytest.mark.parametrize(
    ("literal", "value"), [("0e99999999999999999999", 0.0), ("-0.000E-99999999999999999", -0.0)]
)
def test_zero_with_an_exponent_beyond_decimals_reach_is_zero(literal: str, value: float) -> None:
    assert parse_json_body(f'{{"x": {literal}}}'.encode()) == {"x": value}


@given(st.from_regex(r"\A-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,25})?\Z"))
def test_any_json_number_is_read_or_refused_with_a_422_never_an_error(literal: str) -> None:
    with contextlib.suppress(InvalidJsonBody):
        parse_json_body(f'{{"x": {literal}}}'.encode())


def test_an_integer_with_more_digits_than_python_reads_is_refused() -> None:
    [problem] = problems_of('{"x": ' + "9" * 5000 + "}")

    assert "too many digits" in problem["msg"]


def test_a_300_digit_integer_is_read_exactly() -> None:
    assert parse_json_body(b'{"x": ' + b"7" * 300 + b"}") == {"x": int("7" * 300)}


def test_nesting_deeper_than_python_can_parse_is_a_422_not_a_crash() -> None:
    [problem] = problems_of("[" * 100_000 + "]" * 100_000)

    assert problem["loc"] == ["body"]
    assert "nested too deeply" in problem["msg"]


def test_a_body_that_is_not_utf8_is_refused() -> None:
    [problem] = problems_of(b'{"x": "\xff"}')

    assert "UTF-8" in problem["msg"]


def test_a_syntax_error_names_its_position() -> None:
    [problem] = problems_of('{"x": }')

    assert problem["loc"] == ["body", 6]
    assert problem["msg"].startswith("not valid JSON")


def test_many_problems_are_reported_up_to_a_bound() -> None:
    body = "{" + ", ".join(f'"k{i}": NaN' for i in range(5000)) + "}"

    problems = problems_of(body)

    assert len(problems) == MAX_REPORTED_PROBLEMS + 1
    assert problems[-1]["msg"] == f"and {5000 - MAX_REPORTED_PROBLEMS} more problems"


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
        ),
        max_leaves=30,
    )
)
def test_json_without_duplicates_or_special_numbers_reads_as_json_loads_reads_it(
    value: Any,
) -> None:
    raw = json.dumps(value).encode()
    if "Infinity" in raw.decode():
        return  # json.dumps writes Infinity, which is not JSON
    assert parse_json_body(raw) == json.loads(raw)


# --- the 422 answer ---------------------------------------------------------


def test_a_422_never_echoes_the_input_and_escapes_what_utf8_cannot_carry() -> None:
    errors = [
        {
            "type": "value_error",
            "loc": ("body", "data", "\ud800" * 100),
            "msg": "bad \udfff",
            "input": "x" * 10**6,
        }
    ]

    [shown] = validation_problems(errors)

    assert set(shown) == {"type", "loc", "msg"}
    json.dumps(shown, ensure_ascii=False).encode("utf-8")
    assert len(shown["loc"][2]) < 100 * 6 + 10


def test_a_422_lists_a_bounded_number_of_problems_and_counts_the_rest() -> None:
    errors = [
        {"type": "missing", "loc": ("body", f"f{i}"), "msg": "Field required"} for i in range(100)
    ]

    shown = validation_problems(errors)

    assert len(shown) == MAX_REPORTED_PROBLEMS + 1
    assert shown[-1]["msg"] == f"and {100 - MAX_REPORTED_PROBLEMS} more problems"


def test_a_body_of_many_problems_is_described_by_the_first_few_and_a_count() -> None:
    # A million duplicate keys took two seconds of the event loop to describe
    # one by one; only the first few are shown, the rest counted.
    body = b'{"data": {' + b",".join([b'"a": 1'] * 100_000) + b"}}"

    with pytest.raises(InvalidJsonBody) as caught:
        parse_json_body(body)

    assert len(caught.value.problems) == MAX_REPORTED_PROBLEMS
    assert caught.value.total == 99_999
    detail = caught.value.detail
    assert detail[0]["loc"] == ["body", "data", "a"]
    assert detail[-1] == {
        "type": "too_many_errors",
        "loc": [],
        "msg": f"and {99_999 - MAX_REPORTED_PROBLEMS} more problems",
    }


@pytest.mark.parametrize("depth", [MAX_BODY_DEPTH + 1, 975, 5_000])
def test_a_body_nested_past_the_bound_is_refused_in_any_thread(depth: int) -> None:
    # How deep json.loads gets depends on the stack it starts from: a worker
    # thread's is shallower, and a body it read at 975 levels made later code
    # fail with a 500. The bound does not depend on the thread.
    body = b'{"jobs": [' + b"[" * depth + b"]" * depth + b"]}"

    def parse() -> BaseException | None:
        try:
            parse_json_body(body)
        except InvalidJsonBody as exc:
            return exc
        return None

    for caught in (parse(), ThreadPoolExecutor(1).submit(parse).result()):
        assert isinstance(caught, InvalidJsonBody)
        assert "nested too deeply" in caught.detail[0]["msg"]


def test_a_body_at_the_depth_bound_is_read() -> None:
    inner = MAX_BODY_DEPTH - 2
    body = b'{"jobs": [' + b"[" * inner + b"]" * inner + b"]}"

    assert parse_json_body(body)["jobs"]
