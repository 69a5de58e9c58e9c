"""Settings tests see only what they set: no developer's or CI's variables, no stray .env."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from api_service.settings import ApiSettings
from mailer_service.settings import MailerSettings
from pipeline_shared.settings import PipelineSettings, WorkerSettings, load_settings
from processor_service.settings import ProcessorSettings

ALL_SETTINGS = (PipelineSettings, WorkerSettings, ApiSettings, ProcessorSettings, MailerSettings)
VARIABLES = {name for cls in ALL_SETTINGS for name in cls.model_fields}


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.lower() in VARIABLES:
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def exit_message(cls: type[PipelineSettings], service: str) -> str:
    """The one line ``load_settings`` exits with."""
    with pytest.raises(SystemExit) as caught:
        load_settings(cls, service)
    assert isinstance(caught.value.code, str)
    return caught.value.code
