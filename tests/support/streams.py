"""A stream of job submissions running beside a test, so faults can strike mid-stream."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

from support.waiting import wait_for


class JobStream:
    """Submit ``count`` jobs from ``workers`` threads; record what the api accepted.

    Only a ``202`` is an accepted job: the pipeline owes it exactly one email.
    Anything else (a ``503`` during an outage) was refused, and the caller
    knows to retry it.
    """

    def __init__(self, api_url: str, count: int, *, workers: int = 4) -> None:
        self._api_url = api_url
        self._count = count
        self._lock = threading.Lock()
        self.accepted: list[str] = []
        self.refused: list[int] = []
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="job-stream")

    def start(self) -> JobStream:
        for n in range(self._count):
            self._pool.submit(self._submit, n)
        self._pool.shutdown(wait=False)
        return self

    def _submit(self, n: int) -> None:
        body = {"email": f"user{n}@example.com", "data": {"n": n, "values": [n, n * 2]}}
        try:
            response = httpx.post(f"{self._api_url}/jobs", json=body, timeout=30)
        except httpx.HTTPError:
            with self._lock:
                self.refused.append(0)
            return
        with self._lock:
            if response.status_code == 202:
                self.accepted.append(response.json()["job_id"])
            else:
                self.refused.append(response.status_code)

    @property
    def answered(self) -> int:
        with self._lock:
            return len(self.accepted) + len(self.refused)

    def wait_answered(self, count: int, timeout: float = 60) -> None:
        wait_for(lambda: self.answered >= count, timeout=timeout, what=f"{count} answers")

    def wait_done(self, timeout: float = 120) -> None:
        self.wait_answered(self._count, timeout=timeout)
