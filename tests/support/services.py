"""Running the services as real subprocesses, through their console commands."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from support.waiting import wait_for

BIN = Path(sys.executable).parent

# Settings a developer may have exported in their shell: a test sets the ones
# it wants and never inherits these.
_SETTINGS_PREFIXES = (
    "RABBITMQ_",
    "MAILTRAP_",
    "MAIL_",
    "MAILER_",
    "API_",
    "OUTBOX_",
    "PROCESSING_",
    "METRICS_",
    "OTEL_",
)
_SETTINGS_NAMES = {
    "LOG_LEVEL",
    "RETRY_DELAYS",
    "PROCESSOR_PREFETCH",
    "PUBLISH_TIMEOUT_SECONDS",
    "SHUTDOWN_TIMEOUT_SECONDS",
    "MAX_EVENT_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_BATCH_REQUEST_BYTES",
    "MAX_BATCH_JOBS",
    "REQUESTS_CA_BUNDLE",
    "DATABASE_URL",
    "SEND_LEASE_SECONDS",
    "LEDGER_RETENTION_DAYS",
}


def clean_environment(**settings: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _SETTINGS_NAMES and not key.startswith(_SETTINGS_PREFIXES)
    }
    env.update(settings)
    return env


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports for services to listen on come from below the kernel's ephemeral range:
# a port the kernel hands out for bind(0) is free only until some process's
# outgoing connection takes it, which is how a service once found its metrics
# port in use. Each xdist worker gets a slice of its own and walks it in turn
# (from a place set by the pid, for runs one after another), so two tests
# never pick the same port either.
_PORTS_FROM = 20000
_PORTS_TO = _ephemeral_floor()
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
_slice = int(_worker) if _worker.isdigit() else 0
_slice_size = (_PORTS_TO - _PORTS_FROM) // max(_workers, _slice + 1)
if _slice_size < 100:
    raise RuntimeError(
        f"ports {_PORTS_FROM}-{_PORTS_TO} (below the ephemeral range) are too few for "
        f"{_workers} test workers"
    )
_next = os.getpid() % _slice_size


def free_port() -> int:
    """A loopback port that is free now and that no other test will be given."""
    global _next
    for _ in range(_slice_size):
        port = _PORTS_FROM + _slice * _slice_size + _next
        _next = (_next + 1) % _slice_size
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port left in this worker's slice")


@dataclass
class Service:
    """One service process; its output goes to ``<cwd>/<command>.log``."""

    command: str
    env: dict[str, str]
    cwd: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    starts: int = 0
    niceness: int = 0
    """Run at this lower CPU priority (``nice -n``, which execs the command: same pid)."""

    @property
    def log_path(self) -> Path:
        return self.cwd / f"{self.command}.log"

    def argv(self) -> list[str]:
        """The command line the service is started with."""
        nice = ["nice", "-n", str(self.niceness)] if self.niceness else []
        return [*nice, str(BIN / self.command)]

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start #{self.starts}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.argv(),
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as in a crash."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop_quietly(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.kill()
            self.process.wait(timeout=10)


@dataclass
class Api(Service):
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.running, f"api-service exited:\n{self.output()}"
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=timeout, what="api-service /readyz")

    def wait_listening(self, timeout: float = 30.0) -> None:
        def listening() -> bool:
            assert self.running, f"api-service exited:\n{self.output()}"
            try:
                httpx.get(f"{self.url}/healthz", timeout=2)
            except httpx.HTTPError:
                return False
            return True

        wait_for(listening, timeout=timeout, what="api-service to listen")
