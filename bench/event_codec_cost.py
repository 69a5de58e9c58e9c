"""What decoding, validating and encoding one event costs, today and with the alternatives.

    python bench/event_codec_cost.py [--repeat 3000] [--extra-path DIR]

Every hop of the pipeline decodes an event with full validation (the input
contract's walk of ``data``, ``email_validator`` on the address) and encodes
the next one with pydantic. This times, per call, in CPU microseconds of this
thread (``time.thread_time``), with the benchmark's job (``pipeline_throughput.job_body``):

* today's calls: ``JobRequested``/``DataProcessed`` ``model_validate_json``,
  ``any_event_adapter.validate_json`` (the api's read model), constructing an
  event from Python values (the intake, the processor, the mailer),
  ``model_dump_json``, and the parts: ``check_json_data`` (the contract's
  walk) and ``check_address`` (``email_validator``);
* a trusting decode: a model of only the fields a consumer uses, without the
  contract's validators (``data`` as plain JSON), what "validate at the edge,
  trust inside" would run downstream;
* the standard library's ``json`` and, when importable (``--extra-path``
  pointing at a folder where ``pip install --target DIR orjson msgspec`` put
  them), ``orjson`` and ``msgspec`` (decoding into a typed ``Struct``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict

from pipeline_shared.contract import check_address, check_json_data
from pipeline_shared.events import DataProcessed, EmailSent, JobRequested, any_event_adapter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_throughput import job_body


class TrustedDataProcessed(BaseModel):
    """What the mailer reads of a DataProcessed, trusting the envelope's schema version."""

    model_config = ConfigDict(extra="ignore")
    job_id: UUID
    schema_version: int
    email: str
    subject: str | None = None
    step: str
    data: dict[str, Any]
    result: dict[str, Any]


def per_call(function: Callable[[], object], repeat: int) -> float:
    """CPU microseconds per call of ``function`` (best of three rounds)."""
    best = float("inf")
    for _ in range(3):
        started = time.thread_time()
        for _ in range(repeat):
            function()
        best = min(best, (time.thread_time() - started) / repeat)
    return best * 1e6


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3000)
    parser.add_argument("--extra-path", type=Path, help="a folder holding orjson and msgspec")
    args = parser.parse_args(argv)
    if args.extra_path:
        sys.path.insert(0, str(args.extra_path))

    body = job_body(7)
    job_id = uuid4()
    requested = JobRequested(
        job_id=job_id, email=body["email"], subject=body["subject"], data=body["data"]
    )
    result = {
        "field_count": 3,
        "numeric_fields": ["score"],
        "numeric_summary": {"min": 10.5, "max": 10.5, "mean": 10.5},
        "list_lengths": {"visits": 3},
    }
    processed = DataProcessed(
        job_id=job_id,
        email=requested.email,
        subject=requested.subject,
        step="summarise",
        data=requested.data,
        result=result,
    )
    requested_json = requested.model_dump_json().encode()
    processed_json = processed.model_dump_json().encode()
    print(
        f"event sizes: JobRequested {len(requested_json)} bytes, "
        f"DataProcessed {len(processed_json)} bytes; repeat {args.repeat}"
    )
    print(f"load average: {Path('/proc/loadavg').read_text().strip()}")

    rows: list[tuple[str, Callable[[], object]]] = [
        (
            "JobRequested.model_validate_json (processor decode)",
            lambda: JobRequested.model_validate_json(requested_json),
        ),
        (
            "DataProcessed.model_validate_json (mailer decode)",
            lambda: DataProcessed.model_validate_json(processed_json),
        ),
        (
            "any_event_adapter.validate_json(JobRequested) (api read model)",
            lambda: any_event_adapter.validate_json(requested_json),
        ),
        (
            "any_event_adapter.validate_json(DataProcessed) (api read model)",
            lambda: any_event_adapter.validate_json(processed_json),
        ),
        (
            "JobRequested(...) from Python values (api intake)",
            lambda: JobRequested(
                job_id=job_id, email=body["email"], subject=body["subject"], data=body["data"]
            ),
        ),
        (
            "DataProcessed(...) from Python values (processor)",
            lambda: DataProcessed(
                job_id=job_id,
                email=requested.email,
                subject=requested.subject,
                step="summarise",
                data=requested.data,
                result=result,
            ),
        ),
        (
            "EmailSent(...) from Python values (mailer)",
            lambda: EmailSent(
                job_id=job_id, email=requested.email, transport="mailtrap", provider_message_id="m"
            ),
        ),
        ("JobRequested.model_dump_json", requested.model_dump_json),
        ("DataProcessed.model_dump_json", processed.model_dump_json),
        ("  part: check_json_data(data) (contract walk)", lambda: check_json_data(requested.data)),
        ("  part: check_address(email) (email_validator)", lambda: check_address(body["email"])),
        (
            "trusting decode: TrustedDataProcessed.model_validate_json",
            lambda: TrustedDataProcessed.model_validate_json(processed_json),
        ),
        ("stdlib json.loads(DataProcessed)", lambda: json.loads(processed_json)),
        (
            "stdlib json.dumps(DataProcessed as dict)",
            lambda: json.dumps(processed.model_dump(mode="json")),
        ),
    ]
    try:
        import orjson

        plain = processed.model_dump(mode="json")
        rows += [
            ("orjson.loads(DataProcessed)", lambda: orjson.loads(processed_json)),
            ("orjson.dumps(DataProcessed as dict)", lambda: orjson.dumps(plain)),
        ]
    except ImportError:
        print("orjson not importable: its rows are left out (see --extra-path)")
    try:
        import msgspec

        class DataProcessedStruct(msgspec.Struct):
            job_id: UUID
            schema_version: int
            email: str
            step: str
            data: dict[str, Any]
            result: dict[str, Any]
            subject: str | None = None

        decoder = msgspec.json.Decoder(DataProcessedStruct)
        decoded = decoder.decode(processed_json)
        encoder = msgspec.json.Encoder()
        rows += [
            ("msgspec Decoder(DataProcessedStruct).decode", lambda: decoder.decode(processed_json)),
            ("msgspec Encoder.encode(DataProcessedStruct)", lambda: encoder.encode(decoded)),
        ]
    except ImportError:
        print("msgspec not importable: its rows are left out (see --extra-path)")

    print(f"{'call':<68} {'CPU µs':>8}")
    for name, function in rows:
        print(f"{name:<68} {per_call(function, args.repeat):8.1f}", flush=True)


if __name__ == "__main__":
    main()
