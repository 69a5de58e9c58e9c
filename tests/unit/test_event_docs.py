"""The published event contract (docs/asyncapi.yaml, docs/schemas/): what the models and
the topology build, committed up to date, and valid by real validators."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn
from uuid import uuid4

import jsonschema_rs  # schemathesis's validator, already among the dev tools
import pytest
import yaml
from pydantic import Field, ValidationError, create_model

from pipeline_shared.event_docs import (
    JSON_SCHEMA_DIALECT,
    build_asyncapi,
    event_json_schema,
    event_json_schemas,
    example_events,
)
from pipeline_shared.events import EVENT_TYPES, EmailSent, Event, JobFailed, JobRequested
from pipeline_shared.messaging import bundle
from unit.fakes import data_processed, job_requested

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SCRIPT = ROOT / "scripts" / "render_event_docs.py"
VALIDATOR = ROOT / "tools" / "asyncapi" / "validate.cjs"
PARSER_PREFIX = ROOT / ".venv" / "asyncapi"
"""Where `make install` puts @asyncapi/parser (tools/asyncapi/package-lock.json)."""
ERROR, WARNING = 0, 1
"""The parser's severities that fail the document; 2 (information) and 3 (hints) do not."""
REGENERATE = "the event contract is stale: run `make docs` and commit docs/"


def committed_asyncapi() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DOCS / "asyncapi.yaml").read_text("utf-8"))
    return document


def committed_schemas() -> dict[str, dict[str, Any]]:
    return {
        path.stem: json.loads(path.read_text("utf-8"))
        for path in sorted((DOCS / "schemas").glob("*.json"))
    }


def wire_body(event: Event) -> Any:
    """The message body exactly as the messaging layer publishes it."""
    return json.loads(event.model_dump_json())


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_event_docs", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the committed files are what the code builds ---------------------------------------------


def test_the_committed_asyncapi_document_is_what_the_models_and_topology_build() -> None:
    assert committed_asyncapi() == build_asyncapi(), REGENERATE


def test_each_event_has_a_committed_schema_file_equal_to_its_models_schema() -> None:
    assert committed_schemas() == event_json_schemas(), REGENERATE


@pytest.mark.parametrize("hash_seed", ["0", "4242"])
def test_the_script_renders_the_committed_files_byte_for_byte_whatever_the_hash_seed(
    hash_seed: str,
) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"{result.stderr.strip()}\n{REGENERATE}"


def test_a_field_added_to_an_event_changes_its_schema_and_the_asyncapi_document() -> None:
    changed = create_model(
        "JobFailed",
        __base__=JobFailed,
        retry_after=(int | None, Field(default=None, description="Seconds to wait.")),
    )
    events = [changed if event is JobFailed else event for event in EVENT_TYPES]

    assert event_json_schema(changed) != committed_schemas()["JobFailed"]
    assert build_asyncapi(events) != committed_asyncapi()


def test_check_mode_names_every_stale_file_and_writes_nothing(
    script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert script.main(["--docs", str(tmp_path)]) == 0
    (tmp_path / "schemas" / "EmailSent.json").write_text("{}\n", encoding="utf-8")
    (tmp_path / "schemas" / "JobCancelled.json").write_text("{}\n", encoding="utf-8")
    (tmp_path / "asyncapi.yaml").unlink()
    capsys.readouterr()

    assert script.main(["--docs", str(tmp_path), "--check"]) == 1

    errors = capsys.readouterr().err
    assert f"{tmp_path / 'schemas' / 'EmailSent.json'} is out of date" in errors
    assert f"{tmp_path / 'schemas' / 'JobCancelled.json'} belongs to no event" in errors
    assert f"{tmp_path / 'asyncapi.yaml'} is missing" in errors
    assert "JobRequested.json" not in errors
    assert (tmp_path / "schemas" / "EmailSent.json").read_text(encoding="utf-8") == "{}\n"


def test_writing_again_restores_every_file_and_removes_orphans(
    script: ModuleType, tmp_path: Path
) -> None:
    assert script.main(["--docs", str(tmp_path)]) == 0
    (tmp_path / "schemas" / "EmailSent.json").write_text("{}\n", encoding="utf-8")
    (tmp_path / "schemas" / "JobCancelled.json").write_text("{}\n", encoding="utf-8")

    assert script.main(["--docs", str(tmp_path)]) == 0

    assert not (tmp_path / "schemas" / "JobCancelled.json").exists()
    assert script.main(["--docs", str(tmp_path), "--check"]) == 0


# --- the AsyncAPI document, by the official parser ---------------------------------------------


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def parser_unavailable(why: str) -> NoReturn:
    message = f"{why}; `make install` installs @asyncapi/parser when npm is on PATH"
    if in_ci():
        pytest.fail(f"{message} (under CI=true this test fails instead of skipping)", pytrace=False)
    pytest.skip(message)


def broken_document() -> str:
    """The committed document with one operation pointing at a channel that does not exist."""
    document = committed_asyncapi()
    operation = next(iter(document["operations"].values()))
    operation["channel"] = {"$ref": "#/channels/no.such.channel"}
    return yaml.safe_dump(document, sort_keys=False)


@pytest.fixture(scope="module")
def parser_report() -> dict[str, list[dict[str, Any]]]:
    """The parser's diagnostics for the committed document and for a broken one, in
    one run (loading the parser is most of its cost)."""
    node = shutil.which("node")
    if node is None:
        parser_unavailable("node is not on PATH")
    if not (PARSER_PREFIX / "node_modules" / "@asyncapi" / "parser").is_dir():
        parser_unavailable(f"@asyncapi/parser is not installed in {PARSER_PREFIX}")
    documents = {
        "committed": (DOCS / "asyncapi.yaml").read_text("utf-8"),
        "broken": broken_document(),
    }
    result = subprocess.run(
        [str(node), str(VALIDATOR), str(PARSER_PREFIX)],
        input=json.dumps(documents),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, list[dict[str, Any]]] = json.loads(result.stdout)
    return report


def test_the_asyncapi_document_has_no_error_or_warning_from_the_official_parser(
    parser_report: dict[str, list[dict[str, Any]]],
) -> None:
    problems = [d for d in parser_report["committed"] if d["severity"] in (ERROR, WARNING)]
    assert problems == []


def test_the_parser_rejects_an_operation_on_a_channel_that_does_not_exist(
    parser_report: dict[str, list[dict[str, Any]]],
) -> None:
    errors = [d for d in parser_report["broken"] if d["severity"] == ERROR]
    assert "'#/channels/no.such.channel' does not exist" in [d["message"] for d in errors]


# --- the JSON Schema files, by a Draft 2020-12 validator ----------------------------------------


def schema_validator(name: str) -> jsonschema_rs.Draft202012Validator:
    schema = json.loads((DOCS / "schemas" / f"{name}.json").read_text("utf-8"))
    return jsonschema_rs.Draft202012Validator(
        schema, validate_formats=True, ignore_unknown_formats=False, offline=True
    )


@pytest.mark.parametrize("event", EVENT_TYPES, ids=lambda event: event.__name__)
def test_each_schema_file_is_a_valid_draft_2020_12_schema(event: type[Event]) -> None:
    schema = json.loads((DOCS / "schemas" / f"{event.__name__}.json").read_text("utf-8"))

    assert schema["$schema"] == JSON_SCHEMA_DIALECT
    jsonschema_rs.meta.validate(schema)


def real_events() -> list[Event]:
    return [
        *example_events(),
        job_requested(),
        job_requested(subject=None, submitted_by=None, data={}),
        data_processed(result={"nested": [{"deep": None}, 1.5, "text", True]}),
        EmailSent(job_id=uuid4(), email="bo@example.org", transport="outbox"),
        JobFailed(job_id=uuid4(), stage="mailer-service", reason="x", error_type="Poison"),
    ]


@pytest.mark.parametrize(
    "event", real_events(), ids=[f"{type(e).__name__}-{i}" for i, e in enumerate(real_events())]
)
def test_real_events_validate_against_their_schema_files(event: Event) -> None:
    schema_validator(type(event).__name__).validate(wire_body(event))


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"email": "not-an-address"}, "an email format"),
        ({"job_id": "not-a-uuid"}, "a uuid format"),
        ({"occurred_at": "yesterday"}, "a date-time format"),
        ({"step": "Not A Step"}, "a step name pattern"),
        ({"data": [1, 2]}, "data must be an object"),
        ({"event_type": "EmailSent"}, "the event type is a constant"),
    ],
)
def test_the_schema_files_reject_bodies_the_models_reject(change: dict[str, Any], why: str) -> None:
    body = {**wire_body(job_requested()), **change}
    with pytest.raises(ValidationError):
        JobRequested.model_validate(body)

    assert not schema_validator("JobRequested").is_valid(body), why


# --- bundles, as the AsyncAPI document describes them ---------------------------------------------


def asyncapi_validator(pointer: str) -> jsonschema_rs.Draft202012Validator:
    """A validator for the schema at ``pointer`` in the built AsyncAPI document."""
    document = build_asyncapi()
    return jsonschema_rs.Draft202012Validator(
        {"$ref": pointer, "components": document["components"]},
        validate_formats=True,
        ignore_unknown_formats=False,
        offline=True,
    )


@pytest.mark.parametrize("traced", [False, True])
def test_a_bundle_the_broker_writes_is_what_the_asyncapi_document_describes(traced: bool) -> None:
    events = [job_requested(), job_requested(subject=None, data={})]
    trace = {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"} if traced else {}
    message = bundle.bundle_message(
        [event.model_dump_json().encode() for event in events],
        [trace, {}],
        "JobRequested",
        "api-service",
    )

    asyncapi_validator("#/components/messages/JobRequestedBundle/payload").validate(
        json.loads(message.body)
    )
    asyncapi_validator("#/components/messages/JobRequestedBundle/headers").validate(
        json.loads(json.dumps(message.headers))
    )
    with pytest.raises(jsonschema_rs.ValidationError):
        asyncapi_validator("#/components/messages/JobRequestedBundle/payload").validate(
            [wire_body(events[0]), {"event_type": "JobRequested"}]
        )
