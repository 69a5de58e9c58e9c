"""Log lines carry no secrets and, unless asked, no recipient addresses."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline_shared.logs import (
    _ADDRESS_OR_CREDENTIALS,
    PrivateDataFormatter,
    _mask,
    configure_logging,
    is_reconnection_noise,
    mask_addresses,
)

TOKEN = "mt-token-5f1e2d3c"
PASSWORD = "hunter2-rabbit"


class CapturedLog:
    """A logger of its own whose lines go through the private-data formatter into a buffer."""

    def __init__(self, name: str, secrets: Iterable[str], show_addresses: bool) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(PrivateDataFormatter("%(message)s", secrets, show_addresses))
        self.logger = logging.getLogger(name)
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.propagate = True


@pytest.fixture
def captured(request: pytest.FixtureRequest) -> Iterator[CapturedLog]:
    log = CapturedLog(f"test-logs.{request.node.name}", (TOKEN, PASSWORD), show_addresses=False)
    yield log
    log.close()


def capture(
    request: pytest.FixtureRequest, secrets: Iterable[str], *, show_addresses: bool
) -> CapturedLog:
    log = CapturedLog(f"test-logs.{request.node.name}", secrets, show_addresses)
    request.addfinalizer(log.close)
    return log


# --- secrets ----------------------------------------------------------------------


def test_a_secret_in_a_message_is_replaced(captured: CapturedLog) -> None:
    captured.logger.info("calling mailtrap with token %s", TOKEN)

    assert captured.text == "calling mailtrap with token ***\n"


def test_every_secret_and_every_occurrence_is_replaced(captured: CapturedLog) -> None:
    captured.logger.warning("%s then %s then %s again", PASSWORD, TOKEN, PASSWORD)

    assert captured.text == "*** then *** then *** again\n"


def test_a_secret_inside_an_exception_traceback_is_replaced(captured: CapturedLog) -> None:
    try:
        raise ConnectionError(f"could not log in to amqp://pipeline:{PASSWORD}@rabbit/")
    except ConnectionError:
        captured.logger.exception("broker lost")

    assert "Traceback (most recent call last)" in captured.text
    assert "amqp://pipeline:***@rabbit/" in captured.text
    assert PASSWORD not in captured.text


def test_a_secret_in_the_exception_of_a_chained_error_is_replaced(captured: CapturedLog) -> None:
    try:
        try:
            raise ValueError(f"bad token {TOKEN}")
        except ValueError as inner:
            raise RuntimeError("send failed") from inner
    except RuntimeError:
        captured.logger.error("mailer", exc_info=True)

    assert "bad token ***" in captured.text
    assert TOKEN not in captured.text


def test_a_secret_that_contains_another_is_replaced_whole(request: pytest.FixtureRequest) -> None:
    log = capture(request, ("s3cret", "s3cret-and-more"), show_addresses=False)

    log.logger.info("value s3cret-and-more")

    assert log.text == "value ***\n"


def test_a_secret_shorter_than_four_characters_is_not_replaced(
    request: pytest.FixtureRequest,
) -> None:
    log = capture(request, ("abc", "abcd"), show_addresses=False)

    log.logger.info("abc is not hidden, abcd is")

    assert log.text == "abc is not hidden, *** is\n"


def test_without_secrets_the_line_is_unchanged(request: pytest.FixtureRequest) -> None:
    log = capture(request, (), show_addresses=False)

    log.logger.info("job %s: JobRequested published", "3f2b8c1e")

    assert log.text == "job 3f2b8c1e: JobRequested published\n"


# --- addresses ----------------------------------------------------------------------


def test_an_address_in_a_message_is_masked(captured: CapturedLog) -> None:
    captured.logger.info("sending to %s", "ada.lovelace@example.com")

    assert captured.text == "sending to a***@example.com\n"


def test_an_url_encoded_address_in_an_access_log_line_is_masked(captured: CapturedLog) -> None:
    captured.logger.info(
        '127.0.0.1:50412 - "POST /tasks?email=ada%40example.com&subject=Hi HTTP/1.1" 202'
    )

    assert captured.text == (
        '127.0.0.1:50412 - "POST /tasks?email=a***%40example.com&subject=Hi HTTP/1.1" 202\n'
    )
    assert "ada%40" not in captured.text


def test_an_address_inside_a_traceback_is_masked(captured: CapturedLog) -> None:
    try:
        raise ValueError("mailbox ada@example.com is full")
    except ValueError:
        captured.logger.exception("send failed")

    assert "mailbox a***@example.com is full" in captured.text
    assert "ada@" not in captured.text


def test_addresses_are_shown_when_asked(request: pytest.FixtureRequest) -> None:
    log = capture(request, (TOKEN,), show_addresses=True)

    log.logger.info("to ada@example.com, token %s, query email=bob%%40example.org", TOKEN)

    assert log.text == "to ada@example.com, token ***, query email=bob%40example.org\n"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("ada@example.com", "a***@example.com"),
        ("Ada.Lovelace+news@mail.example.co.uk", "A***@mail.example.co.uk"),
        ("<ada@example.com>", "<a***@example.com>"),
        ("email=ada%40example.com&x=1", "email=a***%40example.com&x=1"),
        ("ada@example.com and bob@example.org", "a***@example.com and b***@example.org"),
        ("a@example.com", "a***@example.com"),
    ],
)
def test_mask_addresses_keeps_the_first_letter_and_the_domain(text: str, masked: str) -> None:
    assert mask_addresses(text) == masked


@pytest.mark.parametrize(
    "text", ["no address here", "user@localhost", "50% off @ noon", "job 3f2b8c1e failed"]
)
def test_mask_addresses_leaves_text_without_an_address_alone(text: str) -> None:
    assert mask_addresses(text) == text


@given(
    st.text(st.sampled_from("ab.-_+%40@:/ Z9"), max_size=40)
    | st.text(max_size=40)
    | st.builds("{}@{}.{}".format, st.text(max_size=8), st.text(max_size=8), st.text(max_size=4))
)
def test_mask_addresses_is_the_pattern_applied_to_any_text(text: str) -> None:
    # Its shortcut for lines without "@" or "%40" must change nothing.
    assert mask_addresses(text) == _ADDRESS_OR_CREDENTIALS.sub(_mask, text)


# --- addresses and the credentials of URLs ------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://pipeline:***@db.internal:5432/jobs",
        "postgresql://pipeline@db.internal:5432/jobs",
        "postgresql+psycopg://pipeline:s3cret@db.example.com/jobs",
        "amqp://processor-service:***@rabbitmq.example.com:5672/",
        "amqps://user.name+tag:p%40ss@broker.example.com/%2F",
        "https://ada@example.com/",
    ],
)
def test_the_credentials_of_a_url_are_not_an_address(url: str) -> None:
    assert mask_addresses(url) == url
    assert mask_addresses(f"connecting to {url} now") == f"connecting to {url} now"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (
            "postgresql://pipeline:***@db.internal:5432/jobs for ada@example.com",
            "postgresql://pipeline:***@db.internal:5432/jobs for a***@example.com",
        ),
        (
            "https://api:***@api.example.com/send?to=ada%40example.com&cc=bob@example.org",
            "https://api:***@api.example.com/send?to=a***%40example.com&cc=b***@example.org",
        ),
        ("https://example.com/users/ada@example.com", "https://example.com/users/a***@example.com"),
        ("mailto:ada@example.com", "mailto:a***@example.com"),
    ],
)
def test_addresses_beside_or_inside_a_url_are_still_masked(text: str, masked: str) -> None:
    assert mask_addresses(text) == masked


def test_a_logged_url_keeps_its_user_and_loses_its_password(request: pytest.FixtureRequest) -> None:
    log = capture(request, (PASSWORD,), show_addresses=False)

    log.logger.info("ledger at postgresql://pipeline:%s@db.internal:5432/jobs", PASSWORD)

    assert log.text == "ledger at postgresql://pipeline:***@db.internal:5432/jobs\n"


_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_label = st.text(_ALNUM + "-", min_size=1, max_size=12).filter(lambda s: s[0] != "-")
_domains = st.lists(_label, min_size=2, max_size=4).map(".".join)
# What RFC 3986 allows in a user name or password, less the delimiters.
_userinfo = st.text(_ALNUM + "._~!$&*+,;=-", min_size=1, max_size=16)
_schemes = st.sampled_from(["postgresql", "postgresql+psycopg", "amqp", "amqps", "https", "redis"])
_paths = st.text(_ALNUM + "/._-", max_size=20).map(lambda s: "/" + s)
_locals = st.tuples(st.sampled_from(_ALNUM), st.text(_ALNUM + "._+-", min_size=1, max_size=16)).map(
    "".join
)


@given(
    scheme=_schemes,
    user=_userinfo,
    password=st.none() | _userinfo,
    host=_domains,
    port=st.none() | st.integers(1, 65535),
    path=_paths,
)
def test_no_url_is_changed_by_its_credentials(
    scheme: str, user: str, password: str | None, host: str, port: int | None, path: str
) -> None:
    credentials = user if password is None else f"{user}:{password}"
    url = f"{scheme}://{credentials}@{host}{'' if port is None else f':{port}'}{path}"

    assert mask_addresses(f"using {url}") == f"using {url}"


@given(
    scheme=_schemes,
    user=_userinfo,
    host=_domains,
    local=_locals,
    domain=_domains,
    encoded=st.booleans(),
)
def test_an_address_in_a_query_string_is_masked_whatever_the_credentials(
    scheme: str, user: str, host: str, local: str, domain: str, encoded: bool
) -> None:
    at = "%40" if encoded else "@"
    url = f"{scheme}://{user}:***@{host}/send?to={local}{at}{domain}&n=1"

    masked = mask_addresses(url)

    assert masked == f"{scheme}://{user}:***@{host}/send?to={local[0]}***{at}{domain}&n=1"


@given(local=_locals, domain=_domains, before=st.sampled_from(["", "to ", "<", "email="]))
def test_an_address_in_text_keeps_only_its_first_character(
    local: str, domain: str, before: str
) -> None:
    assert mask_addresses(f"{before}{local}@{domain}") == f"{before}{local[0]}***@{domain}"


# --- the AMQP libraries' reconnection reports ---------------------------------------


def _record(name: str, level: int, msg: str, *args: object) -> logging.LogRecord:
    return logging.makeLogRecord(
        {
            "name": name,
            "levelno": level,
            "levelname": logging.getLevelName(level),
            "msg": msg,
            "args": args,
        }
    )


class _RobustChannelCallback:
    def __repr__(self) -> str:
        return "<OneShotCallback: cb=<bound method RobustChannel._on_close of <channel>>>"


@pytest.mark.parametrize(
    "record",
    [
        _record(
            "aiormq.connection",
            logging.ERROR,
            "error when creating transport: %r",
            ConnectionRefusedError(111, "Connect call failed"),
        ),
        _record(
            "aiormq.connection",
            logging.ERROR,
            'Unexpected connection close from remote "%s", '
            "Connection.Close(reply_code=%r, reply_text=%r)",
            "amqp://guest:******@rabbit/",
            320,
            "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
        ),
        _record(
            "aio_pika.robust_connection",
            logging.ERROR,
            "Reconnect attempt failed %s due to %s: %s. Retrying after %r seconds.",
            "amqp://rabbit/",
            "ChannelNotFoundEntity",
            "NOT_FOUND",
            5,
        ),
        _record(
            "aio_pika.tools",
            logging.ERROR,
            "Callback %r error: %s: %s",
            _RobustChannelCallback(),
            "RuntimeError",
            RuntimeError("<Connection> closed"),
        ),
    ],
)
def test_the_libraries_reports_of_reconnection_are_noise(record: logging.LogRecord) -> None:
    assert is_reconnection_noise(record)


@pytest.mark.parametrize(
    "record",
    [
        _record("aiormq.channel", logging.ERROR, "Unexpected confirmation frame %r from broker", 1),
        _record("aiormq.connection", logging.ERROR, "Unexpected frame %r", 1),
        _record(
            "aio_pika.tools",
            logging.ERROR,
            "Callback %r error: %s: %s",
            "<bound method Broker._on_reconnected of <Broker>>",
            "KeyError",
            KeyError("x"),
        ),
        _record("pipeline.messaging", logging.ERROR, "error when creating transport: %r", 1),
    ],
)
def test_other_library_errors_are_not_noise(record: logging.LogRecord) -> None:
    assert not is_reconnection_noise(record)


# --- configure_logging ----------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("aio_pika", "aiormq")}
    yield
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, noisy_level in noisy.items():
        logging.getLogger(name).setLevel(noisy_level)


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_writes_private_lines_to_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", secrets=[TOKEN])

    logging.getLogger("mailer").info("sent to ada@example.com with %s", TOKEN)
    logging.getLogger("mailer").debug("not at INFO")

    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith(" INFO    mailer: sent to a***@example.com with ***\n")
    assert err.count("\n") == 1


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_can_show_addresses(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("DEBUG", secrets=[TOKEN], show_addresses=True)

    logging.getLogger("api").debug("job for ada@example.com")

    assert capsys.readouterr().err.endswith(" DEBUG   api: job for ada@example.com\n")


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_quiets_the_amqp_libraries_below_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO")

    logging.getLogger("aiormq.connection").warning("connection lost")
    logging.getLogger("aio_pika").error("gave up on %s", "amqp://pipeline:x@rabbit")

    err = capsys.readouterr().err
    assert "connection lost" not in err
    assert "gave up on" in err


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_drops_the_libraries_reconnection_errors_but_not_others(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO")

    logging.getLogger("aiormq.connection").error("error when creating transport: %r", OSError(111))
    logging.getLogger("aiormq.connection").error("Unexpected frame %r", "frame")

    err = capsys.readouterr().err
    assert "error when creating transport" not in err
    assert err.endswith(" ERROR   aiormq.connection: Unexpected frame 'frame'\n")


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_shows_the_libraries_reconnection_errors_as_debug_at_debug(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("DEBUG")

    logging.getLogger("aiormq.connection").error("error when creating transport: %r", OSError(111))

    assert capsys.readouterr().err.endswith(
        " DEBUG   aiormq.connection: error when creating transport: OSError(111)\n"
    )
