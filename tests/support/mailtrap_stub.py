"""A stand-in for Mailtrap's sending and Email Logs APIs, served over real HTTPS on loopback.

The real ``mailtrap`` SDK talks to it: the services get
``MAILTRAP_API_HOST=127.0.0.1:<port>`` (and ``MAILTRAP_GENERAL_API_HOST``,
the same) and ``REQUESTS_CA_BUNDLE`` pointing at the stand-in's own
certificate authority. It answers ``POST /api/send`` and
``POST /api/send/<inbox_id>`` the way Mailtrap documents them, records every
request (with the ``time.monotonic()`` it arrived at), and can be told to
fail the next requests with a given status, to take ``latency`` seconds over
each answer, or to accept an email and then never answer, as a real provider
may. ``GET /api/accounts/<id>/email_logs`` lists the accepted emails, newest
first, filtered by recipient and time and paged with a cursor, each showing
only ``log_delay`` seconds after it was accepted, as Mailtrap's logs do.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trustme


@dataclass(frozen=True)
class Received:
    """One request the stand-in answered."""

    path: str
    authorization: str
    payload: dict[str, Any]
    status: int
    message_id: str | None
    received_at: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` when the request reached the stand-in."""
    accepted_at: float = field(default_factory=time.time)
    """The Unix time the email was taken, as the Email Logs show it."""

    @property
    def job_id(self) -> str | None:
        value = (self.payload.get("custom_variables") or {}).get("job_id")
        return str(value) if value is not None else None

    @property
    def to(self) -> list[str]:
        return [entry["email"] for entry in self.payload.get("to", [])]


@dataclass
class _Script:
    failures: list[int] = field(default_factory=list)
    # For each of the next sends: accept it, then answer this status, or None
    # to answer nothing until ``release()``.
    after_accepting: list[int | None] = field(default_factory=list)


# The fields of an Email Logs entry that the SDK requires.
_LOG_ENTRY_DEFAULTS = {
    "status": "delivered",
    "sending_stream": "transactional",
    "sending_domain_id": 1,
    "opens_count": 0,
    "clicks_count": 0,
}


class MailtrapStub:
    """Start with ``start()``; ``host`` and ``ca_bundle`` configure the client side.

    ``latency`` (seconds) delays every answer, in the request's own thread.
    """

    def __init__(
        self,
        directory: Path,
        token: str = "test-token",
        latency: float = 0.0,
        account_id: str = "4242",
        log_delay: float = 0.0,
        log_page_size: int = 3,
    ) -> None:
        self.token = token
        self.latency = latency
        self.account_id = account_id
        self.log_delay = log_delay
        self.log_page_size = log_page_size
        self.log_searches: list[dict[str, list[str]]] = []
        self.batch_sizes: list[int] = []
        """The number of emails in each batch request, in arrival order."""
        self.refused_recipients: set[str] = set()
        """Recipients whose emails a batch answers with a per-item error."""
        self.rate_limit: tuple[int, float] | None = None
        """(requests, seconds): answer 429 beyond that many sending requests per window,
        with ``Retry-After``, as Mailtrap does per token."""
        self.sending_times: list[float] = []
        """``time.monotonic()`` of every sending request (single or batch) it took."""
        self.rate_limited = 0
        self.refuse_whole_batch = False
        """Answer 400 to a whole batch holding a refused recipient, as an API
        validating the request before any item would."""
        self._directory = directory
        self._lock = threading.Lock()
        self._script = _Script()
        self._received: list[Received] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._holding = False
        self._held = 0
        self._released = threading.Event()
        self.ca_bundle = directory / "mailtrap-stub-ca.pem"

    # --- control ---------------------------------------------------------

    def start(self) -> None:
        authority = trustme.CA()
        authority.cert_pem.write_to_path(str(self.ca_bundle))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        authority.issue_cert("127.0.0.1", "localhost").configure_cert(context)

        stub = self

        class Handler(_Handler):
            owner = stub

        server = _Server(("127.0.0.1", 0), Handler)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="mailtrap-stub", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def host(self) -> str:
        assert self._server is not None, "start() first"
        return f"127.0.0.1:{self._server.server_address[1]}"

    def fail_next(self, count: int, status: int) -> None:
        """Answer the next ``count`` send requests with ``status``."""
        with self._lock:
            self._script.failures.extend([status] * count)

    def accept_then_hang(self, count: int = 1) -> None:
        """Take the next ``count`` emails (they count as delivered), then answer nothing
        until ``release()``: the client times out not knowing they went out."""
        with self._lock:
            self._script.after_accepting.extend([None] * count)
            self._released.clear()

    def accept_then_fail(self, count: int, status: int) -> None:
        """Take the next ``count`` emails, then answer ``status`` (500, 502, 504...)."""
        with self._lock:
            self._script.after_accepting.extend([status] * count)

    def hold(self) -> None:
        """Leave every request from now on unanswered, as a provider that hangs, until
        ``release()``; held requests are then answered 503: none of them was taken."""
        with self._lock:
            self._holding = True
            self._released.clear()

    def release(self) -> None:
        with self._lock:
            self._holding = False
        self._released.set()

    @property
    def held(self) -> int:
        """How many requests arrived while holding."""
        with self._lock:
            return self._held

    def _wait_if_held(self) -> bool:
        with self._lock:
            if not self._holding:
                return False
            self._held += 1
        self._released.wait()
        return True

    # --- what it saw -----------------------------------------------------

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    @property
    def delivered(self) -> list[Received]:
        """The requests answered 200: the emails Mailtrap would have sent."""
        return [request for request in self.received if request.status == 200]

    def deliveries_by_job(self) -> Counter[str | None]:
        return Counter(request.job_id for request in self.delivered)

    # --- the Email Logs API ---------------------------------------------------

    def _email_logs(self, path: str, authorization: str, query: str) -> tuple[int, dict[str, Any]]:
        if path != f"/api/accounts/{self.account_id}/email_logs":
            return 404, {"error": "Not Found"}
        if authorization != f"Bearer {self.token}":
            return 401, {"errors": ["Unauthorized"]}
        params = parse_qs(query)
        with self._lock:
            self.log_searches.append(params)
        recipient = (params.get("filters[to][value]") or [None])[0]
        after = (params.get("filters[sent_after]") or [None])[0]
        since = datetime.fromisoformat(after).timestamp() if after else 0.0
        now = time.time()
        shown = [
            request
            for request in self.delivered
            if request.accepted_at + self.log_delay <= now
            and request.accepted_at >= since
            and (recipient is None or recipient.lower() in (to.lower() for to in request.to))
        ]
        shown.sort(key=lambda request: request.accepted_at, reverse=True)
        start = int((params.get("search_after") or ["0"])[0])
        page = shown[start : start + self.log_page_size]
        more = start + self.log_page_size < len(shown)
        return 200, {
            "messages": [self._log_entry(request) for request in page],
            "total_count": len(shown),
            "next_page_cursor": str(start + self.log_page_size) if more else None,
        }

    @staticmethod
    def _log_entry(request: Received) -> dict[str, Any]:
        sender = request.payload.get("from") or {}
        return {
            **_LOG_ENTRY_DEFAULTS,
            "message_id": request.message_id,
            "subject": request.payload.get("subject"),
            "from": sender.get("email", ""),
            "to": ", ".join(request.to),
            "sent_at": datetime.fromtimestamp(request.accepted_at, UTC).isoformat(),
            "category": request.payload.get("category"),
            "custom_variables": request.payload.get("custom_variables") or {},
        }

    # --- serving -----------------------------------------------------------

    def _answer(
        self, path: str, authorization: str, body: bytes, received_at: float | None = None
    ) -> tuple[int, dict[str, Any]]:
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if limited := self._over_the_limit():
            return limited
        if path == "/api/batch" or path.startswith("/api/batch/"):
            return self._answer_batch(path, authorization, payload, received_at)
        with self._lock:
            status = self._script.failures.pop(0) if self._script.failures else None
            if status is None:
                status, answer = self._validate(path, authorization, payload)
            else:
                answer = {"errors": [f"scripted failure {status}"]}
            message_id = str(uuid.uuid4()) if status == 200 else None
            if status == 200:
                answer = {"success": True, "message_ids": [message_id]}
                if self._script.after_accepting:
                    then = self._script.after_accepting.pop(0)
                    # The email is taken; the answer says otherwise, or never comes.
                    answer = {"_hang": True} if then is None else {"errors": ["server error"]}
                    answer["_status"] = then or 0
            self._received.append(
                Received(
                    path=path,
                    authorization=authorization,
                    payload=payload if isinstance(payload, dict) else {},
                    status=status,
                    message_id=message_id,
                    received_at=time.monotonic() if received_at is None else received_at,
                )
            )
        return status, answer

    def _over_the_limit(self) -> tuple[int, dict[str, Any]] | None:
        if self.rate_limit is None:
            return None
        allowed, window = self.rate_limit
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self.sending_times if t > now - window]
            if len(recent) >= allowed:
                self.rate_limited += 1
                retry_after = max(recent[0] + window - now, 0.0)
                return 429, {"errors": ["Too many requests"], "_retry_after": retry_after}
            self.sending_times.append(now)
        return None

    def _answer_batch(
        self, path: str, authorization: str, payload: object, received_at: float | None
    ) -> tuple[int, dict[str, Any]]:
        """``POST /api/batch``: 200 with one result per request, in order, as Mailtrap
        documents it; each accepted item is recorded as one email."""
        arrived = time.monotonic() if received_at is None else received_at
        with self._lock:
            status = self._script.failures.pop(0) if self._script.failures else None
            if status is not None:
                return status, {"errors": [f"scripted failure {status}"]}
            if authorization != f"Bearer {self.token}":
                return 401, {"errors": ["Unauthorized"]}
            base = payload.get("base") if isinstance(payload, dict) else None
            requests = payload.get("requests") if isinstance(payload, dict) else None
            if not isinstance(base, dict) or not isinstance(requests, list) or not requests:
                return 400, {"errors": ["base and requests are required"]}
            if len(requests) > 500:
                return 400, {"errors": ["at most 500 requests per batch"]}
            emails = [{**base, **item} for item in requests if isinstance(item, dict)]
            refused = [self._refused(email) for email in emails]
            if self.refuse_whole_batch and any(refused):
                return 400, {"errors": ["requests: " + next(r for r in refused if r)]}
            self.batch_sizes.append(len(emails))
            responses: list[dict[str, Any]] = []
            for email, problem in zip(emails, refused, strict=True):
                if problem:
                    responses.append({"success": False, "errors": [problem]})
                    continue
                message_id = str(uuid.uuid4())
                responses.append({"success": True, "message_ids": [message_id]})
                self._received.append(
                    Received(path, authorization, email, 200, message_id, arrived)
                )
            answer: dict[str, Any] = {"success": True, "responses": responses}
            if self._script.after_accepting:
                then = self._script.after_accepting.pop(0)
                answer = {"_hang": True} if then is None else {"errors": ["server error"]}
                answer["_status"] = then or 0
        return 200, answer

    def _refused(self, email: dict[str, Any]) -> str | None:
        missing = [key for key in ("from", "to", "subject") if not email.get(key)]
        if missing or not (email.get("text") or email.get("html")):
            return f"missing {', '.join(missing) or 'text or html'}"
        to = [entry.get("email") for entry in email["to"] if isinstance(entry, dict)]
        if refused := self.refused_recipients.intersection(to):
            return f"'to' address {sorted(refused)[0]} is not allowed"
        return None

    def _validate(
        self, path: str, authorization: str, payload: object
    ) -> tuple[int, dict[str, Any]]:
        if path != "/api/send" and not path.startswith("/api/send/"):
            return 404, {"errors": ["Not Found"]}
        if authorization != f"Bearer {self.token}":
            return 401, {"errors": ["Unauthorized"]}
        if not isinstance(payload, dict):
            return 400, {"errors": ["body is not a JSON object"]}
        if problem := self._refused(payload):
            return (400 if problem.startswith("missing") else 422), {"errors": [problem]}
        return 200, {}


class _Server(ThreadingHTTPServer):
    # A burst of new connections (one per email when each email builds its
    # own session) must not find the standard library's backlog of 5 full.
    request_queue_size = 128
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    owner: MailtrapStub
    protocol_version = "HTTP/1.1"  # keep-alive, as the real API
    # The headers and the body go out in two writes; with Nagle's algorithm on,
    # the body would wait for the client's delayed ACK, ~40 ms an answer.
    disable_nagle_algorithm = True

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        received_at = time.monotonic()
        if self.owner._wait_if_held():
            status, answer = 503, {"errors": ["held, then refused: not sent"]}
        else:
            if self.owner.latency > 0:
                time.sleep(self.owner.latency)
            status, answer = self.owner._answer(
                self.path, self.headers.get("Authorization", ""), body, received_at
            )
            if answer.pop("_hang", False):
                self.owner._released.wait()
                self.close_connection = True
                return
            status = answer.pop("_status", status)
        self._reply(status, answer)

    def _reply_headers(self, answer: dict[str, Any]) -> dict[str, str]:
        retry_after = answer.pop("_retry_after", None)
        return {} if retry_after is None else {"Retry-After": f"{retry_after:.3f}"}

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        status, answer = self.owner._email_logs(
            parts.path, self.headers.get("Authorization", ""), parts.query
        )
        self._reply(status, answer)

    def _reply(self, status: int, answer: dict[str, Any]) -> None:
        headers = self._reply_headers(answer)
        data = json.dumps(answer).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        return  # keep test output quiet
