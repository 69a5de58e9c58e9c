"""The README stays true: every setting is in its table, and its commands exist."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic_settings import BaseSettings

from api_service.settings import ApiSettings, StatusSettings
from mailer_service.settings import MailerSettings
from processor_service.settings import ProcessorSettings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _settings_variables(*classes: type[BaseSettings]) -> set[str]:
    return {name.upper() for cls in classes for name in cls.model_fields}


def test_every_setting_of_every_service_is_in_the_readme_settings_table() -> None:
    table = set(re.findall(r"^\| `([A-Z_]+)` \|", README, flags=re.MULTILINE))

    expected = _settings_variables(ApiSettings, StatusSettings, ProcessorSettings, MailerSettings)

    assert expected - table == set(), "settings missing from the README table"
    # OpenTelemetry's own variables are read by its SDK (pipeline_shared.tracing).
    standard = {name for name in table if name.startswith("OTEL_")}
    assert table - expected - standard == set(), "README lists settings no service reads"


def test_the_readme_puts_the_two_commands_first() -> None:
    first_block = README.split("```sh", 1)[1].split("```", 1)[0]
    assert "make run" in first_block
    assert "make test" in first_block


def test_every_make_target_the_readme_names_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, flags=re.MULTILINE))
    named = set(re.findall(r"`make ([a-z-]+)`", README))
    assert named, "the README names no make target"
    assert named - targets == set()
