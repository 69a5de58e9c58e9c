"""The api's settings, read once at start."""

from __future__ import annotations

from pydantic import Field

from pipeline_shared.settings import PipelineSettings


class ApiSettings(PipelineSettings):
    api_host: str = Field(default="127.0.0.1", description="Address the API listens on.")
    api_port: int = Field(default=8000, ge=1, le=65535, description="Port the API listens on.")
    max_request_bytes: int = Field(
        default=256 * 1024, ge=1024, description="Largest request body accepted; bigger gets 413."
    )
