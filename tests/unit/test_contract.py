"""The limits of a job (pipeline_shared.contract): what every edge accepts."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from pipeline_shared.contract import (
    MAX_DATA_DEPTH,
    TRUSTED,
    ContractViolation,
    EmailAddress,
    JobData,
    SenderAddress,
    Subject,
    check_address,
    check_json_data,
    check_sender_address,
    check_single_line,
    render_path,
)
from pipeline_shared.events import JobRequested

pytestmark = pytest.mark.unit

# Every character str.splitlines() breaks on.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def nested(depth: int) -> dict[str, Any]:
    """An object nested ``depth`` levels deep (the object itself is level 1)."""
    data: dict[str, Any] = {}
    inner = data
    for _ in range(depth - 1):
        inner["a"] = {}
        inner = inner["a"]
    return data


# --- single-line fields -----------------------------------------------------


@pytest.mark.parametrize("char", list(LINE_BREAKS))
def test_every_character_splitlines_breaks_on_is_refused_in_a_single_line_field(
    char: str,
) -> None:
    with pytest.raises(ValueError, match="single line"):
        check_single_line(f"Hello{char}Bcc: evil@example.com")


@given(st.text(max_size=50))
@example("Hi\u2028there")
@example("=?utf-8?q?Hi=0D=0ABcc:_evil@x.com?=")
@example("\ud800")
def test_a_value_accepted_as_a_single_line_is_one_line_of_printable_text(value: str) -> None:
    try:
        accepted = check_single_line(value)
    except ValueError:
        return
    assert accepted == value
    assert len(value.splitlines()) == 1
    assert all(ord(char) >= 0x20 and not 0x7F <= ord(char) <= 0x9F for char in value)
    value.encode("utf-8")  # no lone surrogate


def test_an_encoded_word_in_a_subject_is_kept_as_text() -> None:
    class Model(BaseModel):
        subject: Subject

    subject = "=?utf-8?q?Hi=0D=0ABcc:_evil@x.com?="

    assert Model(subject=subject).subject == subject


def test_a_refused_control_character_is_named_in_the_message() -> None:
    with pytest.raises(ValueError, match=r"U\+2028 LINE SEPARATOR"):
        check_single_line("a\u2028b")
    with pytest.raises(ValueError, match=r"U\+0085 NEXT LINE"):
        check_single_line("a\x85b")


@pytest.mark.parametrize(
    "char", ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2069", "\ufeff"]
)
def test_a_character_that_reorders_what_a_line_shows_is_refused(char: str) -> None:
    # "invoice<RLO>gnp.exe" shows as "invoiceexe.png" in a mail client.
    with pytest.raises(ValueError, match=rf"bidirectional.*U\+{ord(char):04X}"):
        check_single_line(f"invoice{char}gnp.exe")


@pytest.mark.parametrize(
    "text",
    [
        "\u05e9\u05dc\u05d5\u05dd report",  # Hebrew, laid out by the reader's own rules
        "price\u200e 42",  # LEFT-TO-RIGHT MARK
        "family \U0001f468\u200d\U0001f469\u200d\U0001f467",  # emoji joined by ZWJ
    ],
)
def test_right_to_left_text_marks_and_joiners_stay_allowed(text: str) -> None:
    assert check_single_line(text) == text


def test_a_blank_single_line_field_is_refused() -> None:
    with pytest.raises(ValueError, match="blank"):
        check_single_line("   ")


# --- recipient addresses ----------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "=?utf-8?q?evil=40attacker.com=2C_x?=@example.com",
        "ada@=?utf-8?q?example.com?=",
        "ada @example.com",
        "ada@example.com, eve@example.com",
        "ada,eve@example.com",
        "ada@example.com\r\nBcc: eve@example.com",
        '"ada eve"@example.com',
        "Ada <ada@example.com>",
        "jörg@example.com",
        "ada@[127.0.0.1]",
        "ada@localhost",
        "ada@example.local",
        "",
    ],
)
def test_an_address_that_is_not_one_plain_mailbox_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match=r"address|single line|blank|encoded-word"):
        check_address(address)


def test_an_internationalised_domain_is_carried_in_its_idna_form() -> None:
    assert check_address("ada@bücher.de") == "ada@xn--bcher-kva.de"
    assert check_address("ada@BÜCHER.de") == "ada@xn--bcher-kva.de"


def test_a_plain_address_is_kept_as_it_was_sent() -> None:
    assert check_address("Ada.Lovelace+jobs@example.com") == "Ada.Lovelace+jobs@example.com"


@given(st.emails())
def test_an_accepted_address_is_one_ascii_mailbox(address: str) -> None:
    try:
        accepted = check_address(address)
    except ValueError:
        return
    assert accepted.isascii()
    assert accepted.count("@") == 1
    assert "=?" not in accepted
    assert not any(char.isspace() or char in ',<>"()' for char in accepted)


class _Recipient(BaseModel):
    email: EmailAddress


def test_the_address_type_normalises_and_refuses_overlong_input() -> None:
    assert _Recipient(email="ada@bücher.de").email == "ada@xn--bcher-kva.de"
    with pytest.raises(ValidationError):
        _Recipient(email="a" * 250 + "@example.com")


# --- sender addresses -------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("pipeline@example.com", "pipeline@example.com"),
        ("pipeline@mailer.test", "pipeline@mailer.test"),
        ("pipeline@host.local", "pipeline@host.local"),
        ("pipeline@localhost", "pipeline@localhost"),
        ("pipeline@Bücher.DE", "pipeline@xn--bcher-kva.de"),
    ],
)
def test_a_sender_may_use_any_syntactically_valid_domain(address: str, expected: str) -> None:
    assert check_sender_address(address) == expected

    class Settings(BaseModel):
        sender: SenderAddress

    assert Settings(sender=address).sender == expected


@pytest.mark.parametrize(
    "address",
    [
        "pipeline",
        "=?utf-8?q?x?=@example.com",
        "pipe line@example.com",
        "pipeline@exa_mple.com",
        "pipeline@-example.com",
        "pipeline@example..com",
        "jörg@example.com",
        "a@b@example.com",
    ],
)
def test_a_sender_address_that_is_not_valid_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match=r"address|encoded-word|whitespace"):
        check_sender_address(address)


# --- job data ---------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, MAX_DATA_DEPTH - 1, MAX_DATA_DEPTH])
def test_data_nested_up_to_the_limit_is_accepted(depth: int) -> None:
    data = nested(depth)

    assert check_json_data(data) is data


@pytest.mark.parametrize("depth", [MAX_DATA_DEPTH + 1, 500])
def test_data_nested_beyond_the_limit_is_refused_naming_where(depth: int) -> None:
    with pytest.raises(ContractViolation, match=f"nested deeper than {MAX_DATA_DEPTH}") as caught:
        check_json_data(nested(depth))

    assert caught.value.path == ("a",) * MAX_DATA_DEPTH


def test_lists_count_towards_the_depth_too() -> None:
    data: dict[str, Any] = {"l": []}
    inner: list[Any] = data["l"]
    for _ in range(MAX_DATA_DEPTH - 1):
        inner.append([])
        inner = inner[0]

    with pytest.raises(ContractViolation, match="nested deeper"):
        check_json_data(data)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"x": math.nan}, "finite"),
        ({"x": [1, math.inf]}, "finite"),
        ({"x": -math.inf}, "finite"),
        ({"x": 10**400}, "out of range"),
        ({"x": -(10**309)}, "out of range"),
        ({"x": "a\x00b"}, "NULL"),
        ({"x": "a\x1bb"}, "ESCAPE"),
        ({"x": "a\u2028b"}, "LINE SEPARATOR"),
        ({"x": "\ud800"}, "lone surrogate"),
        ({"\ud800": 1}, "lone surrogate"),
        ({"key\n": 1}, "key contains"),
        ({"x": {"y": b"bytes"}}, "not a JSON value"),
    ],
)
def test_data_outside_the_limits_is_refused_with_the_reason(
    data: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ContractViolation, match=problem):
        check_json_data(data)


def test_large_integers_within_a_doubles_range_are_carried_exactly() -> None:
    big = 10**300 + 7

    class Model(BaseModel):
        data: JobData

    carried = Model.model_validate_json(Model(data={"n": big}).model_dump_json())

    assert carried.data["n"] == big


def test_free_text_may_hold_tabs_and_line_breaks() -> None:
    data = {"letter": "Dear Ada,\r\n\tthank you.\n"}

    assert check_json_data(data) == data


def test_the_path_of_a_problem_names_list_indexes_and_quotes_odd_keys() -> None:
    with pytest.raises(ContractViolation) as caught:
        check_json_data({"items": [1, {"a b": [math.nan]}]})

    assert caught.value.path == ("items", 1, "a b", 0)
    assert str(caught.value).startswith('at items.1."a b".0: ')


def test_a_rendered_path_escapes_control_characters_and_surrogates() -> None:
    rendered = render_path(("k\r\nBcc: x", "\ud800"))

    assert "\r" not in rendered
    assert "\n" not in rendered
    rendered.encode("utf-8")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**320), max_value=10**320)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=5), json_values, max_size=4))
def test_data_within_the_limits_survives_the_event_round_trip_unchanged(
    data: dict[str, Any],
) -> None:
    class Model(BaseModel):
        data: JobData

    try:
        check_json_data(data)
    except ContractViolation:
        with pytest.raises(ValidationError):
            Model(data=data)
        return
    carried = Model.model_validate_json(Model(data=data).model_dump_json()).data
    # Same values and the same types (an integer stays an integer).
    assert json.dumps(carried, sort_keys=True) == json.dumps(data, sort_keys=True)


# --- trusted events: validated once, at the edge --------------------------------


def _requested_json(**overrides: object) -> str:
    body = {
        "job_id": "3f2b8c1e-0d4a-4f6b-9a57-2c1e8d9b7a60",
        "email": "ada@example.com",
        "subject": "Your report",
        "data": {"visits": [1, 2]},
        **overrides,
    }
    return json.dumps(body)


def test_a_trusted_event_is_not_parsed_again_for_its_address_or_walked_for_its_data() -> None:
    # What the api would have refused (a reserved domain, data deeper than the
    # limit) passes downstream: it was validated where it came in.
    deep: dict[str, object] = {}
    node = deep
    for _ in range(MAX_DATA_DEPTH + 5):
        node["x"] = {}
        node = node["x"]  # type: ignore[assignment]
    body = _requested_json(email="ada@localhost", data=deep)

    event = JobRequested.model_validate_json(body, context=TRUSTED)

    assert event.email == "ada@localhost"
    with pytest.raises(ValidationError):
        JobRequested.model_validate_json(body)


@pytest.mark.parametrize(
    "email",
    ["ada@example.com\r\nBcc: eve@example.com", "=?utf-8?q?x?=@example.com", "ada", "a b@c.d"],
    ids=["crlf", "encoded-word", "no-at", "space"],
)
def test_a_trusted_event_still_refuses_an_address_that_could_break_a_header(email: str) -> None:
    with pytest.raises(ValidationError):
        JobRequested.model_validate_json(_requested_json(email=email), context=TRUSTED)


def test_a_trusted_event_still_refuses_a_subject_of_two_lines() -> None:
    body = _requested_json(subject="Report\nBcc: eve@example.com")

    with pytest.raises(ValidationError):
        JobRequested.model_validate_json(body, context=TRUSTED)
