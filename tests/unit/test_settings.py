"""Settings: parsing, validation, defaults, and the one-line error at start."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from api_service.settings import ApiSettings
from mailer_service.settings import BATCHING_PREFETCH, MailerSettings
from pipeline_shared.settings import (
    PipelineSettings,
    describe_settings_error,
    load_settings,
    redact_url,
)
from processor_service.settings import ProcessorSettings
from unit.settings_env import clean_environment, exit_message  # noqa: F401

pytestmark = pytest.mark.usefixtures("clean_environment")


# --- defaults and sources ---------------------------------------------------


def test_settings_have_working_defaults_with_an_empty_environment() -> None:
    settings = PipelineSettings()

    assert settings.rabbitmq_url == "amqp://guest:guest@localhost:5672/"
    assert settings.log_level == "INFO"
    assert settings.retry_delays == (1, 5, 30, 120, 600)


def test_explicit_keyword_arguments_build_settings_without_reading_an_env_file(
    tmp_path: Path,
) -> None:
    (tmp_path / ".env").write_text("LOG_LEVEL=ERROR\n")

    settings = PipelineSettings(_env_file=None, log_level="DEBUG")  # type: ignore[call-arg]
    without_file = PipelineSettings(_env_file=None)  # type: ignore[call-arg]

    assert settings.log_level == "DEBUG"
    assert without_file.log_level == "INFO"


def test_a_dot_env_file_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("LOG_LEVEL=WARNING\nMAILER_CONCURRENCY=3\n")

    assert MailerSettings().log_level == "WARNING"
    assert MailerSettings().mailer_concurrency == 3


def test_an_environment_variable_wins_over_the_dot_env_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("LOG_LEVEL=WARNING\n")
    monkeypatch.setenv("LOG_LEVEL", "ERROR")

    assert PipelineSettings().log_level == "ERROR"


def test_settings_are_immutable() -> None:
    settings = PipelineSettings()

    with pytest.raises(ValidationError):
        settings.log_level = "DEBUG"  # type: ignore[misc]


# --- retry delays -----------------------------------------------------------


def test_retry_delays_are_read_comma_separated_with_spaces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RETRY_DELAYS", "1, 5,30")

    assert PipelineSettings().retry_delays == (1.0, 5.0, 30.0)


def test_retry_delays_may_be_fractions_and_empty_parts_are_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RETRY_DELAYS", "0.25,,2 ,")

    assert PipelineSettings().retry_delays == (0.25, 2.0)


@pytest.mark.parametrize("value", ["0", "1,0,5", "-1", "5,-0.5"])
def test_a_retry_delay_that_is_not_positive_is_rejected(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RETRY_DELAYS", value)

    with pytest.raises(ValidationError, match="every delay must be a positive number of seconds"):
        PipelineSettings()


def test_a_retry_delay_that_is_not_a_number_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRY_DELAYS", "1,soon")

    with pytest.raises(ValidationError) as caught:
        PipelineSettings()

    assert caught.value.errors()[0]["loc"] == ("retry_delays", 1)


def test_retry_delays_given_as_a_tuple_are_kept() -> None:
    settings = PipelineSettings(_env_file=None, retry_delays=(2, 4))  # type: ignore[call-arg]

    assert settings.retry_delays == (2.0, 4.0)


# --- the broker URL ---------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:guest@rabbit:5672/",
        "amqps://user:pw@broker.example.com/vhost",
        "amqp://rabbit",
    ],
)
def test_an_amqp_or_amqps_url_is_accepted(url: str) -> None:
    assert PipelineSettings(_env_file=None, rabbitmq_url=url).rabbitmq_url == url  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "url", ["http://guest:guest@rabbit:5672/", "rabbit:5672", "amqp:///vhost", "", "amqp://"]
)
def test_a_url_that_is_not_amqp_with_a_host_is_rejected(url: str) -> None:
    with pytest.raises(ValidationError, match=r"must be an amqp:// or amqps:// URL with a host"):
        PipelineSettings(_env_file=None, rabbitmq_url=url)  # type: ignore[call-arg]


@pytest.mark.parametrize("url", ["amqp://guest:guest@rabbit:notaport/", "amqp://rabbit:99999/"])
def test_a_url_with_an_invalid_port_is_rejected(url: str) -> None:
    with pytest.raises(ValidationError):
        PipelineSettings(_env_file=None, rabbitmq_url=url)  # type: ignore[call-arg]


# --- load_settings: one line naming the variable ----------------------------


def test_load_settings_returns_the_settings_when_they_are_valid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAILER_CONCURRENCY", "4")

    settings = load_settings(MailerSettings, "mailer-service")

    assert isinstance(settings, MailerSettings)
    assert settings.mailer_concurrency == 4


def test_load_settings_exits_with_one_line_naming_the_upper_case_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAILER_CONCURRENCY", "lots-and-lots")

    message = exit_message(MailerSettings, "mailer-service")

    assert "\n" not in message
    assert message.startswith("mailer-service: invalid setting: MAILER_CONCURRENCY ")
    assert "lots-and-lots" not in message


def test_load_settings_names_every_invalid_variable_on_the_same_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("API_PORT", "70000")
    monkeypatch.setenv("LOG_LEVEL", "CHATTY")

    message = exit_message(ApiSettings, "api-service")

    assert "\n" not in message
    assert "API_PORT " in message
    assert "LOG_LEVEL " in message
    assert "70000" not in message
    assert "CHATTY" not in message


def test_load_settings_does_not_echo_a_password_from_a_rejected_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RABBITMQ_URL", "http://admin:hunter2-secret@rabbit:5672/")

    message = exit_message(ProcessorSettings, "processor-service")

    assert message == (
        "processor-service: invalid setting: "
        "RABBITMQ_URL must be an amqp:// or amqps:// URL with a host"
    )


def test_describe_settings_error_names_a_list_item_by_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RETRY_DELAYS", "1,0")

    with pytest.raises(ValidationError) as caught:
        PipelineSettings()

    assert describe_settings_error(caught.value) == (
        "invalid setting: RETRY_DELAYS every delay must be a positive number of seconds"
    )


# --- redact_url -------------------------------------------------------------


def test_redact_url_hides_the_password() -> None:
    redacted = redact_url("amqps://pipeline:s3cr3t@rabbit.example.com:5671/prod")

    assert redacted == "amqps://pipeline:***@rabbit.example.com:5671/prod"
    assert "s3cr3t" not in redacted


def test_redact_url_leaves_a_url_without_password_alone() -> None:
    for url in ("amqp://rabbit:5672/", "amqp://guest@rabbit/"):
        assert redact_url(url) == url


def test_redact_url_hides_a_password_containing_an_at_sign() -> None:
    redacted = redact_url("amqp://user:p@ss@rabbit/")

    assert redacted == "amqp://user:***@rabbit/"


def test_redact_url_keeps_an_ipv6_host_in_brackets() -> None:
    assert redact_url("amqp://user:pw@[::1]:5672/") == "amqp://user:***@[::1]:5672/"


# --- the mailer's settings --------------------------------------------------


def test_the_api_refuses_events_too_small_to_carry_the_requests_it_accepts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAX_REQUEST_BYTES", "1048576")

    message = exit_message(ApiSettings, "api-service")

    assert "MAX_EVENT_BYTES (4194304) must be at least 10 times MAX_REQUEST_BYTES" in message
    assert "MAX_EVENT_BYTES=10485760" in message


def test_the_default_event_limit_carries_the_default_request_limit() -> None:
    settings = ApiSettings()

    assert settings.max_event_bytes >= 10 * settings.max_request_bytes


def test_the_api_refuses_a_batch_body_limit_smaller_than_one_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAX_BATCH_REQUEST_BYTES", "4096")

    message = exit_message(ApiSettings, "api-service")

    assert "MAX_BATCH_REQUEST_BYTES (4096) must be at least MAX_REQUEST_BYTES (262144)" in message


def test_a_mailer_handler_timeout_too_short_for_a_send_is_refused_naming_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HANDLER_TIMEOUT_SECONDS", "35")

    message = exit_message(MailerSettings, "mailer-service")

    assert "HANDLER_TIMEOUT_SECONDS (35) must be longer than MAILTRAP_TIMEOUT_SECONDS" in message
    assert "HANDLER_TIMEOUT_SECONDS=80" in message


def test_a_processor_may_have_a_short_handler_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HANDLER_TIMEOUT_SECONDS", "5")

    assert ProcessorSettings().handler_timeout_seconds == 5


def test_a_mailer_renews_its_claims_three_times_per_lease() -> None:
    assert MailerSettings().send_lease_seconds == 15
    assert MailerSettings(send_lease_seconds=6).heartbeat_seconds == 2


def test_short_retry_delays_alone_give_a_mailer_that_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A busy claim no longer spends an attempt, so the lease need not fit
    # inside the retry delays.
    monkeypatch.setenv("RETRY_DELAYS", "1,1,2")

    assert MailerSettings().retry_delays == (1, 1, 2)


def test_a_lease_shorter_than_the_provider_timeout_is_fine_since_live_claims_are_renewed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SEND_LEASE_SECONDS", "10")

    settings = MailerSettings()

    assert settings.send_lease_seconds < settings.mailtrap_timeout_seconds


def test_a_lease_under_a_second_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEND_LEASE_SECONDS", "0.5")

    assert "SEND_LEASE_SECONDS " in exit_message(MailerSettings, "mailer-service")


@pytest.mark.parametrize(
    "address", ["pipeline@example.com", "pipeline@mailer.test", "noreply@host.local"]
)
def test_mail_from_may_use_a_reserved_domain(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    monkeypatch.setenv("MAIL_FROM", address)

    assert MailerSettings().mail_from == address


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MAIL_FROM", "=?utf-8?q?eve?=@example.com"),
        ("MAIL_FROM", "pipeline@example.com, eve@example.com"),
        ("MAIL_FROM_NAME", "Pipeline\u2028Bcc: eve@example.com"),
        ("MAIL_CATEGORY", "jobs\x85more"),
    ],
)
def test_sender_settings_that_could_reach_a_header_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)

    message = exit_message(MailerSettings, "mailer-service")

    assert message.startswith(f"mailer-service: invalid setting: {variable} ")


def test_the_mailer_writes_to_the_outbox_when_no_token_is_set() -> None:
    settings = MailerSettings()

    assert settings.mailtrap_token is None
    assert settings.transport == "outbox"


def test_the_mailer_sends_through_mailtrap_when_a_token_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAILTRAP_TOKEN", "tok-123")

    settings = MailerSettings()

    assert settings.transport == "mailtrap"
    assert settings.mailtrap_token is not None
    assert settings.mailtrap_token.get_secret_value() == "tok-123"
    assert "tok-123" not in repr(settings)


def test_an_empty_mailtrap_token_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILTRAP_TOKEN", "")

    settings = MailerSettings()

    assert settings.mailtrap_token is None
    assert settings.transport == "outbox"


def test_an_empty_mailtrap_token_in_the_dot_env_file_counts_as_unset(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MAILTRAP_TOKEN=\n")

    assert MailerSettings().transport == "outbox"


def test_an_explicit_outbox_transport_wins_over_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILTRAP_TOKEN", "tok-123")
    monkeypatch.setenv("MAILER_TRANSPORT", "outbox")

    assert MailerSettings().transport == "outbox"


@pytest.mark.parametrize("token", [None, ""])
def test_the_mailtrap_transport_without_a_token_is_an_error_naming_mailtrap_token(
    token: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILER_TRANSPORT", "mailtrap")
    if token is not None:
        monkeypatch.setenv("MAILTRAP_TOKEN", token)

    message = exit_message(MailerSettings, "mailer-service")

    assert message == (
        "mailer-service: invalid setting: MAILTRAP_TOKEN is required when MAILER_TRANSPORT=mailtrap"
    )


def test_an_unknown_transport_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILER_TRANSPORT", "smtp")

    assert "MAILER_TRANSPORT " in exit_message(MailerSettings, "mailer-service")


@pytest.mark.parametrize("host", ["sandbox.api.mailtrap.io", "127.0.0.1:8443", "localhost"])
def test_a_mailtrap_api_host_as_host_or_host_and_port_is_accepted(host: str) -> None:
    settings = MailerSettings(_env_file=None, mailtrap_api_host=host)  # type: ignore[call-arg]

    assert settings.mailtrap_api_host == host


@pytest.mark.parametrize(
    "host", ["https://send.api.mailtrap.io", "send.api.mailtrap.io/api", "host:port", "a b"]
)
def test_a_mailtrap_api_host_with_a_scheme_or_path_is_rejected(host: str) -> None:
    with pytest.raises(ValidationError, match="must be host or host:port"):
        MailerSettings(_env_file=None, mailtrap_api_host=host)  # type: ignore[call-arg]


def test_a_mailtrap_api_host_with_a_trailing_newline_is_rejected() -> None:
    with pytest.raises(ValidationError):
        MailerSettings(_env_file=None, mailtrap_api_host="send.api.mailtrap.io\n")  # type: ignore[call-arg]


def test_the_mailer_prefetch_defaults_to_twice_the_concurrency(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAILER_CONCURRENCY", "5")

    settings = MailerSettings()

    assert settings.mailer_prefetch is None
    assert settings.prefetch == 10


def test_a_batching_mailer_holds_enough_messages_for_provider_latency_to_cost_no_throughput(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAILTRAP_TOKEN", "a-token")
    monkeypatch.setenv("MAILER_CONCURRENCY", "5")

    settings = MailerSettings()

    assert settings.batching
    assert settings.prefetch == BATCHING_PREFETCH == 250


def test_an_explicit_mailer_prefetch_wins_over_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILER_CONCURRENCY", "5")
    monkeypatch.setenv("MAILER_PREFETCH", "3")

    assert MailerSettings().prefetch == 3


def test_the_processors_prefetch_in_a_shared_environment_does_not_change_the_mailers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAILER_CONCURRENCY", "5")
    monkeypatch.setenv("PROCESSOR_PREFETCH", "7")

    assert MailerSettings().prefetch == 10
    assert ProcessorSettings().processor_prefetch == 7


@pytest.mark.parametrize("name", ["Pipeline\r\nBcc: eve@example.com", "Pipe\nline"])
def test_a_sender_name_with_a_line_break_is_rejected(name: str) -> None:
    with pytest.raises(ValidationError, match="must be a single line"):
        MailerSettings(_env_file=None, mail_from_name=name)  # type: ignore[call-arg]


def test_an_invalid_sender_address_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAIL_FROM", "pipeline-at-example")

    assert "MAIL_FROM " in exit_message(MailerSettings, "mailer-service")


# --- the other services -----------------------------------------------------


def test_a_worker_refuses_a_max_event_size_under_one_kibibyte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAX_EVENT_BYTES", "1023")

    assert "MAX_EVENT_BYTES " in exit_message(ProcessorSettings, "processor-service")


def test_the_processor_reads_its_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCESSING_THREADS", "2")
    monkeypatch.setenv("PROCESSOR_PREFETCH", "7")
    monkeypatch.setenv("PROCESSING_DELAY_SECONDS", "0.5")

    settings = ProcessorSettings()

    assert (settings.processing_threads, settings.processor_prefetch) == (2, 7)
    assert settings.processing_delay_seconds == 0.5


def test_the_api_refuses_a_request_limit_under_one_kibibyte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAX_REQUEST_BYTES", "100")

    assert "MAX_REQUEST_BYTES " in exit_message(ApiSettings, "api-service")
