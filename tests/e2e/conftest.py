"""The services as real subprocesses, against the real broker and the Mailtrap stand-in.

The api, status-service (its read model, a process of its own on the api's store),
the processor and the mailer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pipeline_shared.topology import MAILER, PROCESSOR, STATUS
from support.mailtrap_stub import MailtrapStub
from support.rabbit import Management
from support.services import Api, Service, clean_environment, free_port
from support.waiting import wait_for


@dataclass
class Pipeline:
    api: Api
    status: Service
    """status-service: follows the job events into the api's store (without it, every
    job stays ``queued``)."""
    processor: Service
    mailer: Service
    vhost: str
    management: Management

    @property
    def services(self) -> tuple[Service, ...]:
        return (self.api, self.status, self.processor, self.mailer)

    def start(self) -> None:
        for service in self.services:
            service.start()
        self.api.wait_ready()
        self.wait_consuming()

    def wait_consuming(self, timeout: float = 30.0) -> None:
        """Both workers consume their queue (since their latest start), and status-service
        follows the job events."""
        self.wait_workers_consuming(timeout)
        self.wait_following(timeout)

    def wait_workers_consuming(self, timeout: float = 30.0) -> None:
        """Both workers say they consume their queue (since their latest start)."""

        def consuming() -> bool:
            for worker in (self.processor, self.mailer):
                assert worker.running, f"{worker.command} exited:\n{worker.output()}"
            return all(
                f"consuming {stage.queue}" in worker.output().rsplit("--- start #", 1)[-1]
                for worker, stage in ((self.processor, PROCESSOR), (self.mailer, MAILER))
            )

        wait_for(consuming, timeout=timeout, what="both workers to consume")

    def wait_following(self, timeout: float = 30.0) -> None:
        """status-service follows the job events: its /readyz is 200, or, with its endpoint
        off, ``api.job.status`` has a consumer."""

        def following() -> bool:
            assert self.status.running, f"status-service exited:\n{self.status.output()}"
            if self.status.env.get("METRICS_PORT") == "0":
                return self.management.consumers(self.vhost, STATUS.queue) > 0
            try:
                return httpx.get(f"{metrics_url(self.status)}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(following, timeout=timeout, what="status-service to follow the job events")

    def output(self) -> str:
        return "\n".join(f"== {s.command}\n{s.output()}" for s in self.services)

    def stop(self) -> None:
        for service in self.services:
            service.stop_quietly()


def metrics_url(worker: Service) -> str:
    """The base URL of a worker's (or status-service's) /metrics, /healthz and /readyz."""
    return f"http://127.0.0.1:{worker.env['METRICS_PORT']}"


@pytest.fixture
def pipeline_factory(
    tmp_path: Path, broker_url: str, vhost: str, management: Management
) -> Iterator[Callable[..., Pipeline]]:
    """Build a pipeline with the given extra settings; every one built is stopped afterwards.

    ``per_service`` adds settings for one service only, by command name, e.g.
    ``{"processor-service": {"RABBITMQ_URL": ...}}``.
    """
    built: list[Pipeline] = []

    def build(
        *, per_service: Mapping[str, Mapping[str, str]] | None = None, **settings: str
    ) -> Pipeline:
        workdir = tmp_path / f"pipeline-{len(built)}"
        workdir.mkdir()
        defaults = {
            "RABBITMQ_URL": broker_url,
            "API_HOST": "127.0.0.1",
            "API_PORT": str(free_port()),
            "OUTBOX_DIR": str(workdir / "outbox"),
            "RETRY_DELAYS": "0.2,0.4,0.8",
            # A short lease, so takeovers happen within a test.
            "MAILTRAP_TIMEOUT_SECONDS": "0.9",
            "SEND_LEASE_SECONDS": "1",
            "DATABASE_URL": f"sqlite:///{workdir / 'ledger.sqlite3'}",
            "SHUTDOWN_TIMEOUT_SECONDS": "10",
        }
        env = clean_environment(**{**defaults, **settings})
        # Each worker's and status-service's /metrics, /healthz and /readyz on a free
        # port of its own (``metrics_url``), so pipelines never meet on the default ports.
        metrics_ports = {
            command: {"METRICS_PORT": str(free_port())}
            for command in ("status-service", "processor-service", "mailer-service")
            if "METRICS_PORT" not in settings
        }

        def env_of(command: str) -> dict[str, str]:
            return {**env, **metrics_ports.get(command, {}), **(per_service or {}).get(command, {})}

        pipeline = Pipeline(
            api=Api("api-service", env_of("api-service"), workdir, port=int(env["API_PORT"])),
            # Beside the api, in its folder, on its DATABASE_URL: the store it reads.
            status=Service("status-service", env_of("status-service"), workdir),
            processor=Service("processor-service", env_of("processor-service"), workdir),
            mailer=Service("mailer-service", env_of("mailer-service"), workdir),
            vhost=vhost,
            management=management,
        )
        built.append(pipeline)
        return pipeline

    yield build
    for pipeline in built:
        pipeline.stop()


@pytest.fixture
def mailtrap_settings(mailtrap: MailtrapStub) -> dict[str, str]:
    """Point the real SDK at the HTTPS stand-in, trusting its certificate authority."""
    return {
        "MAILTRAP_TOKEN": mailtrap.token,
        "MAILTRAP_API_HOST": mailtrap.host,
        "REQUESTS_CA_BUNDLE": str(mailtrap.ca_bundle),
        "MAIL_FROM": "reports@pipeline.example.com",
        "MAIL_FROM_NAME": "Pipeline Reports",
    }
