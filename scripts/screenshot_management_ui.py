"""Screenshots of the RabbitMQ management UI with the pipeline at work, for the README.

Nothing is staged: the console commands (api-service, status-service, two
processor-service replicas, mailer-service) run against the machine's RabbitMQ
in a throw-away vhost, a steady stream of jobs goes through ``POST /jobs``
faster than the slowed processors (``PROCESSING_DELAY_SECONDS``) can keep up
with, and every tenth job names a step that does not exist, so the processor
dead-letters it with its reason. Once the work queue holds a backlog, the
dead-letter queue holds messages and the broker has a minute of rates, headless
Chromium logs into the management UI and photographs

* ``management-queues.png``: the Queues tab of the vhost, with consumer counts;
* ``management-queue-processor.png``: ``processor.job.requested``'s own page;
* ``management-connections.png``: the Connections tab, one line per service;
* ``management-dlq-get-message.png``: a dead letter under "Get messages".

Each is cut to what it shows and saved as a small palette PNG. The README's
tour of the UI quotes figures from these pictures: read it again after a new
run. The vhost and
the services go away at the end, whatever happens; nothing else on the broker
is touched. The script also prints ``pipeline-admin status`` and
``pipeline-admin dlq show`` for the same vhost, the terminal's view of the
same moment.

Run it with ``make screenshots``, which installs what it needs into .venv
(``selenium`` and ``pillow``, which the project itself does not use). It also
needs:

* Chromium and its WebDriver: ``apt-get install -y chromium chromium-driver``
  (or ``--chromium`` and ``--chromedriver`` to point at others);
* RabbitMQ at ``RABBITMQ_URL`` (default ``amqp://guest:guest@127.0.0.1:5672/``)
  with its management plugin at ``RABBITMQ_MANAGEMENT_URL`` (default
  ``http://127.0.0.1:15672``; ``rabbitmq-plugins enable rabbitmq_management``),
  as a user that may create vhosts and log into the UI.

By hand: ``.venv/bin/pip install selenium pillow`` then
``.venv/bin/python scripts/screenshot_management_ui.py [--output docs/images]``.
It takes about two minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pipeline_shared.topology import MAILER, PROCESSOR, STATUS
from support.rabbit import BROKER_URL, MANAGEMENT_URL, Management, url_for_vhost
from support.services import BIN, Api, Service, clean_environment, free_port
from support.waiting import wait_for

WIDTH = 1200
"""Pixels: the browser's width, and so every screenshot's."""

UNKNOWN_STEP = "no_such_step"
"""A step the processor does not have: its jobs are dead-lettered with the reason."""


@dataclass(frozen=True)
class Options:
    output: Path
    jobs_per_second: float
    failing_every: int
    processing_delay: float
    chromium: str
    chromedriver: str
    timeout: float


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "docs" / "images",
        help="folder of the PNGs (default docs/images)",
    )
    parser.add_argument(
        "--jobs-per-second", type=float, default=10.0, help="jobs submitted (default 10/s)"
    )
    parser.add_argument(
        "--failing-every",
        type=int,
        default=10,
        help=f"every n-th job asks for step {UNKNOWN_STEP!r} (default 10)",
    )
    parser.add_argument(
        "--processing-delay",
        type=float,
        default=1.0,
        help="PROCESSING_DELAY_SECONDS of the processors (default 1)",
    )
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the browser")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver", help="its WebDriver")
    parser.add_argument(
        "--timeout", type=float, default=180, help="seconds to wait for the scene (default 180)"
    )
    args = parser.parse_args(argv)
    if args.jobs_per_second <= 0 or args.failing_every < 1 or args.processing_delay < 0:
        parser.error("the rate must be positive, --failing-every at least 1")
    return Options(
        output=args.output,
        jobs_per_second=args.jobs_per_second,
        failing_every=args.failing_every,
        processing_delay=args.processing_delay,
        chromium=args.chromium,
        chromedriver=args.chromedriver,
        timeout=args.timeout,
    )


# --- the pipeline --------------------------------------------------------------


@dataclass
class Pipeline:
    api: Api
    status: Service
    processors: list[Service]
    mailer: Service

    @property
    def services(self) -> list[Service]:
        return [self.api, self.status, *self.processors, self.mailer]


@contextlib.contextmanager
def throwaway_vhost(management: Management) -> Iterator[str]:
    name = f"demo-{uuid.uuid4().hex[:8]}"  # short: the UI shows it on every line
    management.create_vhost(name)
    try:
        yield name
    finally:
        management.delete_vhost(name)


def build_pipeline(workdir: Path, broker_url: str, options: Options) -> Pipeline:
    port = free_port()
    env = clean_environment(
        RABBITMQ_URL=broker_url,
        API_HOST="127.0.0.1",
        API_PORT=str(port),
        OUTBOX_DIR=str(workdir / "outbox"),
        MAIL_FROM="reports@pipeline.example.com",
        # Off, so that nothing here collides with a `make run` on this machine.
        METRICS_PORT="0",
    )
    # Two processors, slowed down and holding few messages each, fall behind the
    # submitted jobs: the backlog shows in the work queue, with two consumers.
    slow = {
        **env,
        "PROCESSING_DELAY_SECONDS": str(options.processing_delay),
        "PROCESSOR_PREFETCH": "2",
    }
    # Each processor writes its own log file (Service names it after the command).
    processors = [Service("processor-service", slow, workdir / f"processor-{n}") for n in (1, 2)]
    for processor in processors:
        processor.cwd.mkdir()
    return Pipeline(
        api=Api("api-service", env, workdir, port=port),
        status=Service("status-service", env, workdir),
        processors=processors,
        mailer=Service("mailer-service", env, workdir),
    )


@contextlib.contextmanager
def running(pipeline: Pipeline, management: Management, vhost: str) -> Iterator[None]:
    try:
        for service in pipeline.services:
            service.start()
        pipeline.api.wait_ready()
        for queue, count in (
            (STATUS.queue, 1),
            (PROCESSOR.queue, len(pipeline.processors)),
            (MAILER.queue, 1),
        ):

            def consumed(queue: str = queue, count: int = count) -> bool:
                exited = [s.command for s in pipeline.services if not s.running]
                assert not exited, f"exited while starting: {exited}"
                return management.consumers(vhost, queue) >= count

            wait_for(consumed, timeout=30, interval=0.2, what=f"{queue} consumed")
        yield
    except Exception:
        for service in pipeline.services:
            tail = service.output().splitlines()[-15:]
            print(f"--- last lines of {service.log_path}:", *tail, sep="\n", file=sys.stderr)
        raise
    finally:
        for service in pipeline.services:
            try:
                service.terminate(timeout=15)
            except Exception:
                service.stop_quietly()


@dataclass
class Submitter:
    """Posts jobs at a steady rate from a thread until stopped; every n-th one fails."""

    api_url: str
    per_second: float
    failing_every: int
    accepted: int = 0
    failing_job_ids: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Submitter:
        self._thread = threading.Thread(target=self._run, name="submitter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        interval = 1 / self.per_second
        with httpx.Client(base_url=self.api_url, timeout=10) as client:
            n = 0
            next_at = time.monotonic()
            while not self._stop.is_set():
                n += 1
                failing = n % self.failing_every == 0
                body = {
                    "email": f"user{n}@example.com",
                    "subject": f"Weekly report {n}",
                    "step": UNKNOWN_STEP if failing else "summarise",
                    "data": {"visits": [n, n + 3, n + 5], "signups": n % 7, "region": "EU"},
                }
                with contextlib.suppress(httpx.HTTPError):
                    response = client.post("/jobs", json=body)
                    if response.status_code == 202:
                        self.accepted += 1
                        if failing:
                            self.failing_job_ids.append(response.json()["job_id"])
                next_at += interval
                self._stop.wait(max(0.0, next_at - time.monotonic()))


def scene_is_set(management: Management, vhost: str) -> bool:
    """A backlog in the processor's queue, dead letters in its DLQ, and acks in
    every statistics interval (5 s) of the last minute, which the queue page's
    "last minute" charts show."""
    path = f"/api/queues/{quote(vhost, safe='')}/{quote(PROCESSOR.queue, safe='')}"
    response = management.client.get(path, params={"msg_rates_age": 60, "msg_rates_incr": 5})
    if response.status_code != 200:
        return False
    queue: dict[str, Any] = response.json()
    samples = queue.get("message_stats", {}).get("ack_details", {}).get("samples", [])
    acked = sorted((s["timestamp"], s["sample"]) for s in samples)
    busy = [later[1] > earlier[1] for earlier, later in itertools.pairwise(acked)]
    dead = management.queue(vhost, PROCESSOR.dead_letter_queue) or {}
    return (
        queue.get("messages_ready", 0) >= 100
        and dead.get("messages", 0) >= 3
        and len(busy) >= 12
        and all(busy)
    )


# --- the browser ---------------------------------------------------------------


def open_browser(options: Options) -> WebDriver:
    chrome = webdriver.ChromeOptions()
    chrome.binary_location = options.chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # as root in a container, Chromium has no sandbox to use
        "--disable-dev-shm-usage",
        f"--window-size={WIDTH},1000",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
        "--lang=en-US",
    ):
        chrome.add_argument(argument)
    driver = webdriver.Chrome(options=chrome, service=ChromeDriver(options.chromedriver))
    driver.implicitly_wait(0)
    return driver


def log_in(driver: WebDriver, vhost: str) -> None:
    parts = urlsplit(BROKER_URL)
    driver.get(f"{MANAGEMENT_URL}/")
    wait = WebDriverWait(driver, 20)
    wait.until(lambda d: d.find_elements(By.NAME, "username"))
    driver.find_element(By.NAME, "username").send_keys(parts.username or "guest")
    driver.find_element(By.NAME, "password").send_keys(parts.password or "guest")
    driver.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait.until(lambda d: d.find_elements(By.ID, "show-vhost"))
    # What a reader does by hand: pick the vhost (top right), so that every tab
    # lists only its queues and connections; with "+/-" above the Queues table,
    # add "Consumer count" and drop "Features (with policy)", which takes two
    # lines a queue. The UI keeps these choices in localStorage.
    Select(driver.find_element(By.ID, "show-vhost")).select_by_value(vhost)
    driver.execute_script(
        "window.localStorage['rabbitmq.column-queues-consumers'] = 'true';"
        "window.localStorage['rabbitmq.column-queues-features'] = 'false';"
    )


def show(driver: WebDriver, fragment: str, ready_css: str) -> None:
    """Open ``#/<fragment>`` and wait until ``ready_css`` is there, the page drawn."""
    driver.get(f"{MANAGEMENT_URL}/#/{fragment}")
    driver.refresh()  # a change of fragment alone can keep the previous page's drawing
    WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, ready_css))
    # The charts draw after the page: wait until each has its canvas.
    WebDriverWait(driver, 20).until(
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('.chart')].every(c => c.querySelector('canvas'));"
        )
    )


def expand(driver: WebDriver, heading_starts: str) -> WebElement:
    """Open a folded section of a page (a click on its heading); return the section."""
    for heading in driver.find_elements(By.CSS_SELECTOR, "div.section-hidden > h2"):
        if heading.text.startswith(heading_starts):
            heading.click()
            section: WebElement = heading.find_element(By.XPATH, "..")
            return section
    raise RuntimeError(f"no folded section {heading_starts!r} on {driver.current_url}")


def bottom_of(driver: WebDriver, element: WebElement) -> int:
    bottom: float = driver.execute_script(
        "return arguments[0].getBoundingClientRect().bottom + window.scrollY;", element
    )
    return round(bottom)


def photograph(driver: WebDriver, path: Path, top: int, bottom: int) -> None:
    """The page from ``top`` to ``bottom`` (CSS pixels), as a small palette PNG."""
    height: int = driver.execute_script("return document.documentElement.scrollHeight;")
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": WIDTH, "height": max(height, bottom), "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        png = driver.get_screenshot_as_png()
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.crop((0, max(0, top - 8), min(image.width, WIDTH), min(image.height, bottom + 8)))
    # A UI of flat colours loses nothing visible in a 256-colour palette, and
    # takes a fraction of the bytes.
    small = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)
    print(f"  {path.name}: {image.width}x{image.height}, {path.stat().st_size // 1024} KiB")


def take_screenshots(driver: WebDriver, vhost: str, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    escaped = quote(vhost, safe="")

    show(driver, "queues", "table.list")
    table = driver.find_element(By.CSS_SELECTOR, "#main table.list")
    photograph(driver, output / "management-queues.png", 0, bottom_of(driver, table))

    show(driver, f"queues/{escaped}/{quote(PROCESSOR.queue, safe='')}", ".chart")
    consumers = expand(driver, "Consumers")
    WebDriverWait(driver, 10).until(lambda d: consumers.find_elements(By.CSS_SELECTOR, "table"))
    photograph(driver, output / "management-queue-processor.png", 0, bottom_of(driver, consumers))

    show(driver, "connections", "table.list")
    table = driver.find_element(By.CSS_SELECTOR, "#main table.list")
    photograph(driver, output / "management-connections.png", 0, bottom_of(driver, table))

    show(driver, f"queues/{escaped}/{quote(PROCESSOR.dead_letter_queue, safe='')}", ".chart")
    # Fold the charts away, so that the queue's name and its "Get messages" fit in one picture.
    driver.find_element(By.XPATH, "//div[@id='main']//h2[normalize-space()='Overview']").click()
    section = expand(driver, "Get messages")
    # The form's default, "Nack message requeue true", leaves the message in the queue.
    section.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    WebDriverWait(driver, 10).until(
        lambda d: d.execute_script(
            "return document.querySelector('#msg-wrapper .box') !== null"
            " && jQuery(':animated').length === 0;"
        )
    )
    photograph(driver, output / "management-dlq-get-message.png", 0, bottom_of(driver, section))


# --- the terminal's view -------------------------------------------------------


def print_admin_view(broker_url: str, job_id: str | None) -> None:
    """What ``pipeline-admin`` says of the same vhost, for the README's terminal examples."""
    env = clean_environment(RABBITMQ_URL=broker_url)
    commands = [["status"], ["dlq", "list", PROCESSOR.name]]
    if job_id is not None:
        commands.append(["dlq", "show", PROCESSOR.name, job_id])
    for arguments in commands:
        print(f"\n$ pipeline-admin {' '.join(arguments)}")
        # Our own console command, with fixed arguments.
        done = subprocess.run(  # noqa: S603
            [str(BIN / "pipeline-admin"), *arguments],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        print(done.stdout + done.stderr, end="")


# --- main ----------------------------------------------------------------------


def run(options: Options) -> None:
    management = Management.connect()
    if not management.available():
        sys.exit(f"no RabbitMQ management API at {MANAGEMENT_URL}")
    try:
        with (
            tempfile.TemporaryDirectory(prefix="screenshots-") as tmp,
            throwaway_vhost(management) as vhost,
        ):
            broker_url = url_for_vhost(vhost)
            pipeline = build_pipeline(Path(tmp), broker_url, options)
            print(f"vhost {vhost}: starting the services")
            with (
                running(pipeline, management, vhost),
                Submitter(pipeline.api.url, options.jobs_per_second, options.failing_every) as jobs,
            ):
                print(
                    f"submitting {options.jobs_per_second:g} jobs/s; waiting for a backlog in "
                    f"{PROCESSOR.queue}, dead letters and a minute of rates"
                )
                wait_for(
                    lambda: scene_is_set(management, vhost),
                    timeout=options.timeout,
                    interval=1,
                    what="the backlog, the dead letters and the rates",
                )
                print(f"{jobs.accepted} jobs accepted; photographing into {options.output}")
                driver = open_browser(options)
                try:
                    log_in(driver, vhost)
                    take_screenshots(driver, vhost, options.output)
                finally:
                    driver.quit()
                head = management.peek(vhost, PROCESSOR.dead_letter_queue, count=1)
                job_id = head[0]["properties"].get("correlation_id") if head else None
                print_admin_view(broker_url, job_id)
            print(f"\nstopped the services; {STATUS.queue} and the rest go with vhost {vhost}")
    finally:
        management.close()


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
