"""API keys: parsing the setting, checking a presented key, and who must configure them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydantic import SecretStr

from api_service.auth import (
    ANONYMOUS,
    ApiKeys,
    InvalidApiKeySetting,
    is_loopback,
    parse_api_keys,
)
from api_service.settings import ApiSettings
from mailer_service.settings import MailerSettings
from pipeline_shared.settings import PipelineSettings, load_settings
from unit.settings_env import clean_environment, exit_message  # noqa: F401

KEY = "k3y-for-ada-0123456789"
OTHER_KEY = "k3y-for-bob-9876543210"
KEY_DIGEST = hashlib.sha256(KEY.encode()).hexdigest()


pytestmark = pytest.mark.usefixtures("clean_environment")


# --- parse_api_keys ------------------------------------------------------------


def test_a_plain_key_is_kept_as_its_sha256_digest() -> None:
    assert parse_api_keys(KEY) == (KEY_DIGEST,)


def test_a_sha256_entry_is_kept_as_the_digest_it_names() -> None:
    assert parse_api_keys(f"sha256:{KEY_DIGEST}") == (KEY_DIGEST,)


def test_a_sha256_entry_in_upper_case_hex_is_accepted() -> None:
    assert parse_api_keys(f"sha256:{KEY_DIGEST.upper()}") == (KEY_DIGEST,)


def test_keys_are_comma_separated_with_blanks_and_spaces_ignored() -> None:
    digests = parse_api_keys(f" {KEY} ,, sha256:{KEY_DIGEST[::-1]} ,")

    assert digests == (KEY_DIGEST, KEY_DIGEST[::-1])


@pytest.mark.parametrize("value", ["", " ", ",", " , ,"])
def test_an_empty_setting_has_no_keys(value: str) -> None:
    assert parse_api_keys(value) == ()


def test_a_plain_key_of_sixteen_characters_is_accepted() -> None:
    assert len(parse_api_keys("x" * 16)) == 1


def test_a_plain_key_shorter_than_sixteen_characters_is_rejected() -> None:
    with pytest.raises(InvalidApiKeySetting, match="at least 16 characters"):
        parse_api_keys(f"{KEY},{'x' * 15}")


@pytest.mark.parametrize(
    "digest",
    [KEY_DIGEST[:-1], KEY_DIGEST + "0", "z" * 64, "", f"{KEY_DIGEST[:-2]} 0"],
    ids=["63-chars", "65-chars", "not-hex", "empty", "with-a-space"],
)
def test_a_sha256_entry_that_is_not_64_hex_characters_is_rejected(digest: str) -> None:
    with pytest.raises(InvalidApiKeySetting, match="64 hexadecimal characters"):
        parse_api_keys(f"sha256:{digest}")


def test_an_invalid_key_setting_error_does_not_echo_the_key() -> None:
    with pytest.raises(InvalidApiKeySetting) as caught:
        parse_api_keys("short-secret")

    assert "short-secret" not in str(caught.value)


# --- ApiKeys.caller_of ----------------------------------------------------------


def test_a_configured_plain_key_identifies_a_caller() -> None:
    keys = ApiKeys(parse_api_keys(KEY))

    assert keys.required
    assert keys.caller_of(f"Bearer {KEY}") is not None


def test_a_key_configured_as_its_sha256_digest_identifies_the_same_caller() -> None:
    plain = ApiKeys(parse_api_keys(KEY))
    hashed = ApiKeys(parse_api_keys(f"sha256:{KEY_DIGEST}"))

    caller = hashed.caller_of(f"Bearer {KEY}")

    assert caller is not None
    assert caller == plain.caller_of(f"Bearer {KEY}")


def test_the_bearer_scheme_is_matched_case_insensitively() -> None:
    keys = ApiKeys(parse_api_keys(KEY))

    assert keys.caller_of(f"bearer {KEY}") == keys.caller_of(f"Bearer {KEY}") is not None


def test_each_configured_key_is_a_different_caller() -> None:
    keys = ApiKeys(parse_api_keys(f"{KEY},{OTHER_KEY}"))

    ada, bob = keys.caller_of(f"Bearer {KEY}"), keys.caller_of(f"Bearer {OTHER_KEY}")

    assert ada is not None
    assert bob is not None
    assert ada != bob


def test_a_wrong_key_is_refused() -> None:
    keys = ApiKeys(parse_api_keys(KEY))

    assert keys.caller_of(f"Bearer {OTHER_KEY}") is None
    assert keys.caller_of(f"Bearer {KEY}x") is None
    assert keys.caller_of(f"Bearer {KEY_DIGEST}") is None  # the digest is not the key


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", KEY, f"Basic {KEY}", f"Token {KEY}"],
    ids=["missing", "empty", "scheme-only", "scheme-and-space", "no-scheme", "basic", "token"],
)
def test_a_missing_header_or_another_scheme_is_refused(header: str | None) -> None:
    assert ApiKeys(parse_api_keys(KEY)).caller_of(header) is None


@pytest.mark.parametrize("header", [None, "", f"Bearer {KEY}", "Basic whatever"])
def test_without_configured_keys_every_caller_is_anonymous(header: str | None) -> None:
    keys = ApiKeys(())

    assert not keys.required
    assert keys.caller_of(header) == ANONYMOUS == "anonymous"


def test_the_caller_id_reveals_neither_the_key_nor_its_full_digest() -> None:
    caller = ApiKeys(parse_api_keys(KEY)).caller_of(f"Bearer {KEY}")

    assert caller is not None
    assert KEY not in caller
    assert KEY_DIGEST not in caller
    assert len(caller) <= 64  # fits JobRequested.submitted_by and the store's column


# --- is_loopback ------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_a_loopback_host_is_loopback(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "10.0.0.1", "192.168.1.20", "api.example.com", "localhost.evil.com"]
)
def test_a_host_that_is_not_loopback_is_not(host: str) -> None:
    assert not is_loopback(host)


# --- ApiSettings: keys required off loopback ----------------------------------------


def test_the_api_refuses_to_listen_on_all_interfaces_without_api_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("API_HOST", "0.0.0.0")

    message = exit_message(ApiSettings, "api-service")

    assert "\n" not in message
    assert message.startswith("api-service: invalid setting: API_KEYS ")
    assert "0.0.0.0" in message
    assert "loopback" in message


def test_the_api_refuses_a_setting_of_only_blank_keys_off_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("API_HOST", "10.0.0.1")
    monkeypatch.setenv("API_KEYS", " , ")

    assert "API_KEYS " in exit_message(ApiSettings, "api-service")


def test_the_api_listens_on_all_interfaces_when_api_keys_are_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("API_HOST", "0.0.0.0")
    monkeypatch.setenv("API_KEYS", KEY)

    settings = load_settings(ApiSettings, "api-service")

    assert settings.api_host == "0.0.0.0"
    assert settings.keys.caller_of(f"Bearer {KEY}") is not None


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_the_api_on_loopback_needs_no_keys_and_takes_everyone_as_anonymous(
    host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("API_HOST", host)

    settings = load_settings(ApiSettings, "api-service")

    assert not settings.keys.required
    assert settings.keys.caller_of(None) == ANONYMOUS


def test_an_invalid_api_key_is_named_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", "too-short-key")

    message = exit_message(ApiSettings, "api-service")

    assert message == (
        "api-service: invalid setting: API_KEYS a plain key must be at least 16 characters long"
    )


def test_api_keys_read_from_the_dot_env_file_are_used(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"API_HOST=0.0.0.0\nAPI_KEYS=sha256:{KEY_DIGEST}\n")

    settings = ApiSettings()

    assert settings.keys.caller_of(f"Bearer {KEY}") is not None
    assert KEY_DIGEST not in repr(settings)


# --- secret_values: what the log formatter must hide ---------------------------------


def test_pipeline_secret_values_are_the_rabbitmq_password_as_written_and_decoded() -> None:
    settings = PipelineSettings(
        _env_file=None, rabbitmq_url="amqp://pipeline:p%40ss-w0rd@rabbit:5672/"
    )

    assert set(settings.secret_values()) == {"p%40ss-w0rd", "p@ss-w0rd"}


def test_pipeline_secret_values_are_empty_without_a_password() -> None:
    settings = PipelineSettings(_env_file=None, rabbitmq_url="amqp://rabbit:5672/")

    assert settings.secret_values() == []


def test_mailer_secret_values_include_the_token_and_both_passwords(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RABBITMQ_URL", "amqp://pipeline:rabbit-secret@rabbit/")
    monkeypatch.setenv("MAILTRAP_TOKEN", "mailtrap-token-123")
    monkeypatch.setenv("DATABASE_URL", "postgresql://mailer:db-secret@db/mailer")

    secrets = set(MailerSettings().secret_values())

    assert {"rabbit-secret", "mailtrap-token-123", "db-secret"} <= secrets


def test_api_secret_values_include_plain_keys_and_both_passwords_but_not_digests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RABBITMQ_URL", "amqp://pipeline:rabbit-secret@rabbit/")
    monkeypatch.setenv("DATABASE_URL", "postgresql://api:db-secret@db/api")
    monkeypatch.setenv("API_KEYS", f" {KEY} , sha256:{KEY_DIGEST[::-1]}")

    secrets = ApiSettings().secret_values()

    assert {"rabbit-secret", KEY, "db-secret"} <= set(secrets)
    assert not any("sha256:" in secret or KEY_DIGEST[::-1] in secret for secret in secrets)


def test_api_secret_values_without_keys_or_passwords_are_empty() -> None:
    settings = ApiSettings(
        _env_file=None, rabbitmq_url="amqp://rabbit/", database_url="sqlite:///jobs.sqlite3"
    )

    assert settings.secret_values() == []


def test_api_keys_are_a_secret_value_type_and_not_shown_in_repr() -> None:
    settings = ApiSettings(_env_file=None, api_keys=SecretStr(KEY))

    assert KEY not in repr(settings)
    assert KEY not in str(settings)
