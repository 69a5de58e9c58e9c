"""Reading the broker's refusals: which are configuration errors, and in the broker's own words."""

from __future__ import annotations

from aiormq import spec as amqp
from aiormq.exceptions import AuthenticationError, ConnectionClosed, ProbableAuthenticationError

from pipeline_shared.errors import BrokerRefused


def refusal(exc: BaseException, user: str, vhost: str) -> BrokerRefused | None:
    """The configuration error a failed attempt to connect is, if it is one.

    The broker refuses a login with ACCESS_REFUSED, and a vhost that does
    not exist or that the user has no permissions on with NOT_ALLOWED. A
    NOT_ALLOWED for a connection limit (other connections free it) or a
    vhost that is down is left to be retried.
    """
    if isinstance(exc, AuthenticationError):
        offered = exc.args[0] if exc.args else "?"
        return BrokerRefused(
            "every authentication mechanism aio-pika has",
            f"it offers {offered}",
            "configure the broker for PLAIN, or choose one of those with ?auth= in "
            "RABBITMQ_URL: a configuration error, not retried",
        )
    reply = closed_by_broker(exc)
    if reply is None:
        return None
    if reply.startswith("ACCESS_REFUSED"):
        return BrokerRefused(
            f"the login of user {user!r}",
            reply,
            "fix the user name or password in RABBITMQ_URL, or the user on the broker: "
            "a refused login is a configuration error, not retried",
        )
    if not reply.startswith("NOT_ALLOWED") or "limit" in reply or "is down" in reply:
        return None
    if "not found" in reply:
        return BrokerRefused(
            f"to open vhost {vhost!r}",
            reply,
            f"create the vhost (rabbitmqctl add_vhost {vhost}) or fix the vhost "
            "at the end of RABBITMQ_URL",
        )
    return BrokerRefused(
        f"to open vhost {vhost!r} for user {user!r}",
        reply,
        f"grant the user {user!r} permissions on the vhost {vhost!r} "
        f"(rabbitmqctl set_permissions -p {vhost} {user} ...) or fix RABBITMQ_URL",
    )


def reply_text(exc: BaseException) -> str:
    """The broker's own words from an AMQP error, e.g. ``ACCESS_REFUSED - ...``."""
    texts = [arg for arg in exc.args if isinstance(arg, str)]
    return texts[-1] if texts else type(exc).__name__


def closed_by_broker(exc: BaseException) -> str | None:
    """The broker's reply text if it closed the connection, e.g. ``NOT_ALLOWED - vhost x not
    found``; None for a failure of the network (refused, reset, timed out).

    aiormq reports a broker that closes the connection in reply to
    Connection.Open (an unknown vhost, one the user may not use, a connection
    limit) as an ``InvalidFrameError`` that has lost the broker's words; the
    Connection.Close frame is still a local of the frame that raised it (older
    aiormq versions put it in the error's arguments).
    """
    if isinstance(exc, ConnectionClosed | ProbableAuthenticationError):
        return reply_text(exc)
    found: list[object] = list(exc.args)
    traceback = exc.__traceback__
    while traceback is not None:
        found.extend(traceback.tb_frame.f_locals.values())
        traceback = traceback.tb_next
    for value in found:
        if isinstance(value, amqp.Connection.Close):
            return value.reply_text or f"reply code {value.reply_code}"
    return None


def loss_reason(exc: BaseException) -> str:
    """Why the connection was lost: the error's type, and the broker's words if
    the broker closed it (``ConnectionClosed: CONNECTION_FORCED - ...``)."""
    if isinstance(exc, ConnectionClosed):
        return f"{type(exc).__name__}: {reply_text(exc)}"
    return type(exc).__name__
