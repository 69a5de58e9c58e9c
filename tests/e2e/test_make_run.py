"""`make run` as a developer uses it: on a terminal, stopped with Ctrl-C.

Each test copies the Makefile, the Procfile and the scripts make run uses into
a folder of its own (with the project's .venv linked in), so no .env or state
file of the working tree is read or written, and runs the real `make run`
there: the real honcho, the four real processes of the Procfile (the api,
status-service, the processor and the mailer) and the real broker.

Ctrl-C is what the terminal does with it: the test runs make on a
pseudo-terminal, as its controlling terminal, and types ^C; the kernel sends
SIGINT to the terminal's foreground process group.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
import pytest
import yaml

from pipeline_shared.definitions import password_matches
from pipeline_shared.topology import STATUS
from support.rabbit import Management
from support.services import clean_environment, free_port
from support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
MAKE = shutil.which("make") or "make"
# What make run reads from the working tree.
RUN_FILES = ("Makefile", "Procfile", "scripts/ensure_rabbitmq.py", "scripts/run_services.py")
# `make run` without reinstalling: the test uses the installed .venv as it is.
MAKE_RUN = [MAKE, "--no-print-directory", "-o", ".venv/.installed", "run"]
PROCESSES = ("api", "status", "processor", "mailer")
"""The Procfile's processes, by the names honcho prefixes their lines with."""
# Makes the pseudo-terminal on stdin the controlling terminal of a new session,
# then runs the command in it, in the foreground, as a login shell runs a job.
_ON_TERMINAL = (
    "import fcntl, os, sys, termios\n"
    "os.setsid()\n"
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)
CTRL_C = b"\x03"


class Terminal:
    """A command running on a pseudo-terminal of its own; everything it prints is kept."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str]) -> None:
        master, slave = os.openpty()
        self._master = master
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _ON_TERMINAL, *command],
            cwd=cwd,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
        )
        os.close(slave)
        self._reader = threading.Thread(target=self._read, name="terminal", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 65536)
            except OSError:  # EIO: every process holding the terminal has gone
                return
            if not chunk:
                return
            with self._lock:
                self._chunks.append(chunk)

    @property
    def output(self) -> str:
        with self._lock:
            data = b"".join(self._chunks)
        return data.decode(errors="replace").replace("\r\n", "\n")

    def type(self, keys: bytes) -> None:
        os.write(self._master, keys)

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def close(self) -> None:
        """End what still runs: ^C first, for the services run in sessions of
        their own stop only through honcho; then kill what is left on it."""
        if self.process.poll() is None:
            self.type(CTRL_C)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._reader.join(timeout=5)
        os.close(self._master)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A folder with what `make run` needs, as in a fresh clone with .venv installed."""
    folder = tmp_path / "clone"
    for name in RUN_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, folder / name)
    (folder / ".venv").symlink_to(VENV, target_is_directory=True)
    return folder


def make_environment(**settings: str) -> dict[str, str]:
    """The developer's environment less any pipeline setting and any outer make's."""
    env = clean_environment(**settings)
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEFILES", "MAKEOVERRIDES"):
        env.pop(name, None)
    return env


class MakeRun:
    """`make run` on a terminal, then, in the same shell, whether the terminal
    came back to that shell."""

    def __init__(
        self, folder: Path, env: dict[str, str], management: Management, vhost: str
    ) -> None:
        script = (
            f'{shlex.join(MAKE_RUN)}; echo "make run exited with $?"; '
            f"{shlex.quote(sys.executable)} -c "
            "'import os; print(\"terminal back:\", os.tcgetpgrp(0) == os.getpgrp())'"
        )
        self.terminal = Terminal(["sh", "-c", script], folder, env)
        self.api_url = f"http://127.0.0.1:{env['API_PORT']}"
        self._management = management
        self._vhost = vhost

    @property
    def output(self) -> str:
        return self.terminal.output

    def wait_serving(self) -> None:
        """The api is ready, both workers consume, and status-service follows the job
        events (its queue has a consumer)."""

        def serving() -> bool:
            assert self.terminal.process.poll() is None, f"make run ended:\n{self.output}"
            if not all(
                f"consuming {queue}" in self.output
                for queue in ("processor.job.requested", "mailer.data.processed")
            ):
                return False
            if self._management.consumers(self._vhost, STATUS.queue) == 0:
                return False
            try:
                return httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_for(serving, timeout=30, what="make run to serve")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; it printed:\n{self.output}") from None

    def press_ctrl_c(self, timeout: float = 30) -> int:
        """^C, then the exit status of make run, as its shell reports it."""
        self.terminal.type(CTRL_C)
        self.terminal.wait(timeout=timeout)
        found = re.search(r"make run exited with (\d+)", self.output)
        assert found, f"no exit status:\n{self.output}"
        return int(found[1])


StartMakeRun = Callable[..., MakeRun]


@pytest.fixture
def make_run(
    run_dir: Path, broker_url: str, management: Management, vhost: str
) -> Iterator[StartMakeRun]:
    """Start `make run` in ``run_dir`` with the given settings; each is ended afterwards."""
    started: list[MakeRun] = []

    def start(**settings: str) -> MakeRun:
        defaults = {
            "RABBITMQ_URL": broker_url,
            "API_PORT": str(free_port()),
            "SHUTDOWN_TIMEOUT_SECONDS": "10",
            # The endpoints of the workers and status-service off: their default ports
            # are the same for every run. The test that looks at them turns them on.
            "METRICS_PORT": "0",
        }
        run = MakeRun(run_dir, make_environment(**{**defaults, **settings}), management, vhost)
        started.append(run)
        return run

    yield start
    for run in started:
        run.terminal.close()


def niceness_in(folder: Path) -> dict[str, int]:
    """The niceness of each of the Procfile's services running in ``folder``, by command."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) != folder.resolve():
                continue
            args = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile, or not ours
            continue
        # A console script runs as "python <path>/<command>"; field 19 of stat is
        # the niceness (counted from the one after the command's name in brackets).
        names = {Path(arg.decode(errors="replace")).name for arg in args}
        for command in names & {f"{process}-service" for process in PROCESSES}:
            found[command] = int(stat.rsplit(")", 1)[1].split()[16])
    return found


def test_ctrl_c_stops_every_service_and_make_run_ends_quietly_with_0(
    make_run: StartMakeRun, run_dir: Path
) -> None:
    run = make_run(METRICS_PORT="")  # empty is unset: each on its default port
    run.wait_serving()
    # status-service runs at the workers' lower CPU priority, below the api's.
    niceness = niceness_in(run_dir)
    assert set(niceness) == {f"{process}-service" for process in PROCESSES}, niceness
    if niceness["api-service"] < 19:  # a run under `nice -n 19` has nothing lower
        for background in ("status-service", "processor-service", "mailer-service"):
            assert niceness[background] > niceness["api-service"], niceness
    # The endpoints of both workers and status-service answer on their default
    # ports, side by side.
    for port in (9101, 9102, 9103):
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
        scrape = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
        assert "# TYPE pipeline_events_consumed_total counter" in scrape, scrape

    status = run.press_ctrl_c()

    assert status == 0, run.output
    for process in PROCESSES:
        assert f"{process} stopped (rc=0)" in run.output, run.output
    assert re.search(r"^make(\[\d+\])?: ", run.output, flags=re.MULTILINE) is None, run.output
    assert "terminal back: True" in run.output, run.output


class SilentMailtrap:
    """A Mailtrap that takes connections and never answers: an email sent to it
    stays in flight until the mailer gives up or is killed."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self._server.getsockname()[1]}"
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="silent-mailtrap", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self._connections.append(connection)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def close(self) -> None:
        self._server.close()
        with self._lock:
            for connection in self._connections:
                connection.close()


@pytest.fixture
def silent_mailtrap() -> Iterator[SilentMailtrap]:
    mailtrap = SilentMailtrap()
    yield mailtrap
    mailtrap.close()


def test_ctrl_c_with_a_service_that_does_not_stop_cleanly_ends_make_run_with_an_error(
    make_run: StartMakeRun, silent_mailtrap: SilentMailtrap
) -> None:
    # The mailer waits for an email in flight for up to a minute; honcho kills
    # it after 5 s. That is not a clean stop, and make run must say so.
    run = make_run(
        MAILTRAP_TOKEN="test-token",
        MAILTRAP_API_HOST=silent_mailtrap.host,
        SHUTDOWN_TIMEOUT_SECONDS="60",
    )
    run.wait_serving()
    answer = httpx.post(
        f"{run.api_url}/jobs", json={"email": "ada@example.com", "data": {}}, timeout=10
    )
    assert answer.status_code == 202, answer.text
    wait_for(lambda: silent_mailtrap.connections > 0, what="the mailer to send the email")

    status = run.press_ctrl_c(timeout=60)

    assert status != 0, run.output
    assert "make run: not stopped cleanly: mailer" in run.output, run.output
    for process in ("api", "status", "processor"):
        assert f"{process} stopped (rc=0)" in run.output, run.output
    assert "terminal back: True" in run.output, run.output


def test_the_environment_wins_over_dot_env_under_make_run(
    make_run: StartMakeRun, run_dir: Path
) -> None:
    # As the README says of every setting, and as the RABBITMQ_URL that
    # make run suggests exporting needs when .env was copied from .env.example.
    (run_dir / ".env").write_text(f"RABBITMQ_URL=amqp://guest:guest@127.0.0.1:{free_port()}/\n")
    run = make_run()

    run.wait_serving()

    assert run.press_ctrl_c() == 0, run.output


# --- no broker -------------------------------------------------------------------------


def compose_file() -> dict[str, object]:
    loaded: dict[str, object] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_without_a_broker_make_run_prints_commands_that_work_as_printed(
    run_dir: Path, tmp_path: Path
) -> None:
    no_programs = tmp_path / "bin"  # no rabbitmq-server to start
    no_programs.mkdir()
    env = make_environment(
        PATH=str(no_programs), RABBITMQ_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    )

    result = subprocess.run(
        MAKE_RUN, cwd=run_dir, env=env, capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode != 0
    commands = [line.strip() for line in result.stderr.splitlines() if line.startswith("    ")]
    assert len(commands) == 3, result.stderr
    up, export, again = (shlex.split(command) for command in commands)
    assert again == ["make", "run"]

    # 1. Compose interpolates the whole file: every variable it requires is set.
    compose_text = (ROOT / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", compose_text))
    assignments = dict(word.split("=", 1) for word in up if re.match(r"^[A-Za-z_]\w*=", word))
    assert required, "docker-compose.yml requires no variable any more: simplify the command"
    assert {name for name in required if assignments.get(name)} == required, commands[0]
    assert up[len(assignments) :] == ["docker", "compose", "up", "--wait", "rabbitmq"]
    # ... and the broker does not use them, so their stand-in values harm nothing.
    services = compose_file()["services"]
    assert isinstance(services, dict)
    broker_text = yaml.safe_dump(services["rabbitmq"])
    assert not any(f"${{{name}" in broker_text for name in assignments), broker_text

    # 2. The URL logs in to that broker, as a user of its definitions who may
    # declare the topology (make run's services do), on its published port.
    assert export[0] == "export"
    name, _, url = export[1].partition("=")
    assert name == "RABBITMQ_URL"
    parts = urlsplit(url)
    definitions = json.loads((ROOT / "rabbitmq" / "definitions.json").read_text())
    users = {user["name"]: user for user in definitions["users"]}
    assert parts.username in users, url
    assert password_matches(users[parts.username]["password_hash"], unquote(parts.password or ""))
    vhost = unquote(parts.path[1:]) or "/"
    permissions = {
        (p["user"], p["vhost"]): (p["configure"], p["write"], p["read"])
        for p in definitions["permissions"]
    }
    assert permissions[(parts.username, vhost)] == (".*", ".*", ".*")
    assert parts.hostname in {"localhost", "127.0.0.1"}
    assert f"127.0.0.1:{parts.port}:5672" in services["rabbitmq"]["ports"]

    # 3. Where docker compose is installed, it accepts the command's file.
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
    ):
        return
    config = subprocess.run(
        [docker, "compose", "config", "--quiet", "rabbitmq"],
        cwd=ROOT,
        env={**os.environ, **assignments},
        capture_output=True,
        text=True,
        check=False,
    )
    assert config.returncode == 0, config.stderr
