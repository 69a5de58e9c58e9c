"""The container deployment (Dockerfiles, docker-compose.yml, rabbitmq/, .env.example) agrees
with the code.

No Docker engine is needed: the files are read and checked against the services'
pyproject.toml files and settings classes, and the Dockerfiles are linted with
hadolint.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from pydantic_settings import BaseSettings

from pipeline_shared.definitions import password_matches, password_variables

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
BROKER = "rabbitmq"
DEFINITIONS_FILE = ROOT / "rabbitmq" / "definitions.json"
BROKER_CONFIG_FILE = ROOT / "rabbitmq" / "rabbitmq.conf"
DEFINITIONS_IN_CONTAINER = "/etc/rabbitmq/definitions.json"
BROKER_CONFIG_IN_CONTAINER = "/etc/rabbitmq/rabbitmq.conf"
DEFINITIONS_FILE_VARIABLE = "RABBITMQ_DEFINITIONS_FILE"

# Each service folder, and the settings class its console script loads.
SETTINGS_CLASSES = {
    "api-service": "api_service.settings.ApiSettings",
    "processor-service": "processor_service.settings.ProcessorSettings",
    "mailer-service": "mailer_service.settings.MailerSettings",
}
SERVICES = sorted(SETTINGS_CLASSES)
# Compose services that run another service's image: status-service is the api's.
SAME_IMAGE = {"status-service": "api-service"}
PROCESS_SETTINGS = {**SETTINGS_CLASSES, "status-service": "api_service.settings.StatusSettings"}
PORT_PUBLISHERS = {"api-service", BROKER, "prometheus", "grafana", "jaeger"}
MAILTRAP_VARIABLES = ("MAILTRAP_TOKEN", "MAIL_FROM")
# Secrets compose must refuse to start without (``${VAR:?message}``), with the
# value a deployer would set.
REQUIRED_SECRETS = {"API_KEYS": "a-deployers-api-key-0123456789"}
ROOT_USERS = {"root", "0"}

_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)
_DOCUMENTED = re.compile(r"^\s*#?\s*(?P<name>[A-Z][A-Z0-9_]*)=", re.MULTILINE)


# --- reading the files -------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def dockerfile_instructions(path: Path) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        keyword, _, arguments = " ".join([*pending, line]).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = []
    assert not pending, f"{path} ends with a continuation line"
    return instructions


def dockerfile_of(service: str) -> Path:
    return ROOT / SAME_IMAGE.get(service, service) / "Dockerfile"


def image_env(service: str) -> dict[str, str]:
    """The variables the image's ENV instructions set."""
    env: dict[str, str] = {}
    for instruction in dockerfile_instructions(dockerfile_of(service)):
        if instruction.keyword != "ENV":
            continue
        words = shlex.split(instruction.arguments)
        if "=" not in words[0]:  # the legacy form: ENV NAME value
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            name, _, value = word.partition("=")
            env[name] = value
    return env


def copy_sources(service: str) -> list[str]:
    """Every source path of the Dockerfile's COPY instructions."""
    sources: list[str] = []
    for instruction in dockerfile_instructions(dockerfile_of(service)):
        if instruction.keyword == "COPY":
            words = [
                word for word in shlex.split(instruction.arguments) if not word.startswith("--")
            ]
            sources.extend(words[:-1])
    return sources


def console_scripts(service: str) -> set[str]:
    with (ROOT / service / "pyproject.toml").open("rb") as file:
        return set(tomllib.load(file)["project"].get("scripts", {}))


def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, dict), "docker-compose.yml is not a mapping"
    return document


def compose_services() -> dict[str, dict[str, Any]]:
    services = compose()["services"]
    assert isinstance(services, dict)
    return services


def app_services() -> dict[str, dict[str, Any]]:
    """The compose services built from this repository (everything but the broker)."""
    return {name: spec for name, spec in compose_services().items() if "build" in spec}


def interpolate(value: str) -> str:
    """``value`` as Docker Compose would see it with only the required secrets set."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        if name in REQUIRED_SECRETS:
            return REQUIRED_SECRETS[name]
        if op is not None and op.endswith("?"):
            raise AssertionError(f"{match.group(0)} makes compose fail when the variable is unset")
        return arg if op is not None else ""

    return _VARIABLE.sub(substitute, value)


def environment_of(spec: dict[str, Any]) -> dict[str, str]:
    """A compose service's ``environment:``, in mapping form, uninterpolated."""
    environment = spec.get("environment") or {}
    if isinstance(environment, list):
        pairs = (item.partition("=") for item in environment)
        return {name: value for name, _, value in pairs}
    return {name: "" if value is None else str(value) for name, value in environment.items()}


def env_files_of(spec: dict[str, Any]) -> list[str]:
    env_file = spec.get("env_file") or []
    entries = [env_file] if isinstance(env_file, str | dict) else env_file
    return [entry if isinstance(entry, str) else entry["path"] for entry in entries]


def container_env(service: str) -> dict[str, str]:
    """What the service's process sees in its container when no .env exists: the
    image's ENV, overridden by compose's ``environment:``."""
    compose_env = environment_of(compose_services()[service])
    return {**image_env(service), **{name: interpolate(v) for name, v in compose_env.items()}}


def settings_class(service: str) -> type[BaseSettings]:
    module_name, _, class_name = PROCESS_SETTINGS[service].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    assert issubclass(cls, BaseSettings)
    return cls


def settings_variables(service: str) -> list[str]:
    return [name.upper() for name in settings_class(service).model_fields]


def documented_variables() -> set[str]:
    return set(_DOCUMENTED.findall(ENV_EXAMPLE.read_text(encoding="utf-8")))


@dataclass(frozen=True)
class Mount:
    source: str
    read_only: bool


def mounts_of(spec: dict[str, Any]) -> dict[str, Mount]:
    """A compose service's volumes by container path, sources interpolated."""
    mounts: dict[str, Mount] = {}
    for volume in spec.get("volumes", []):
        if isinstance(volume, dict):
            mount = Mount(interpolate(str(volume["source"])), bool(volume.get("read_only")))
            mounts[volume["target"]] = mount
            continue
        source, target, *mode = interpolate(volume).split(":")
        mounts[target] = Mount(source, "ro" in (mode[0].split(",") if mode else []))
    return mounts


def definitions() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DEFINITIONS_FILE.read_text(encoding="utf-8"))
    return loaded


def broker_config() -> dict[str, str]:
    """rabbitmq.conf's settings (``key = value`` lines)."""
    settings: dict[str, str] = {}
    for raw in BROKER_CONFIG_FILE.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def container_port(mapping: str | dict[str, Any]) -> str:
    if isinstance(mapping, dict):
        return str(mapping["target"])
    return interpolate(mapping).rsplit(":", 1)[-1].split("/")[0]


# --- the images --------------------------------------------------------------------------------


def test_every_service_folder_is_deployed_by_compose() -> None:
    folders = {path.parent.name for path in ROOT.glob("*-service/pyproject.toml")}
    assert folders == set(SERVICES)
    # status-service is the api's second process, from the api's folder and image.
    assert set(app_services()) == folders | {"status-service"}


def test_status_service_runs_the_api_image_on_the_api_store() -> None:
    services = compose_services()
    status, api = services["status-service"], services["api-service"]
    assert status["build"] == api["build"]
    assert status["command"] == ["status-service"]
    assert status["environment"]["DATABASE_URL"] == api["environment"]["DATABASE_URL"]
    assert mounts_of(status)["/data/state"] == mounts_of(api)["/data/state"]
    port = status["environment"]["METRICS_PORT"]
    assert f"127.0.0.1:{port}/readyz" in " ".join(status["healthcheck"]["test"])
    # Background work, as the workers': the api's requests come first.
    assert status["cpu_shares"] < api.get("cpu_shares", 1024)


@pytest.mark.parametrize("service", SERVICES)
def test_compose_builds_the_service_from_the_repository_root_with_its_own_dockerfile(
    service: str,
) -> None:
    build = compose_services()[service]["build"]
    assert build == {"context": ".", "dockerfile": f"{service}/Dockerfile"}


def test_every_built_service_has_a_build_context_and_a_dockerfile_that_exist() -> None:
    for name, spec in app_services().items():
        build = spec["build"]
        context, dockerfile = (
            (build, "Dockerfile")
            if isinstance(build, str)
            else (build["context"], build.get("dockerfile", "Dockerfile"))
        )
        assert (ROOT / context).is_dir(), f"{name}: build context {context} does not exist"
        assert (ROOT / context / dockerfile).is_file(), f"{name}: {dockerfile} does not exist"


@pytest.mark.parametrize("service", SERVICES)
def test_the_image_runs_a_console_script_its_pyproject_declares(service: str) -> None:
    commands = [i for i in dockerfile_instructions(dockerfile_of(service)) if i.keyword == "CMD"]
    assert commands, f"{service}/Dockerfile has no CMD"
    argv = json.loads(commands[-1].arguments)  # exec form: a JSON array
    assert isinstance(argv, list)
    assert argv, f"{service}/Dockerfile has an empty CMD"
    declared = sorted(console_scripts(service))
    assert argv[0] in declared, f"CMD runs {argv[0]!r}; {service} declares {declared}"


@pytest.mark.parametrize("service", SERVICES)
def test_the_image_copies_shared_and_its_own_service_folder(service: str) -> None:
    roots = {PurePosixPath(source).parts[0] for source in copy_sources(service)}
    assert "shared" in roots, f"{service}/Dockerfile does not COPY shared/"
    assert service in roots, f"{service}/Dockerfile does not COPY {service}/"
    assert roots <= {"shared", service}, f"{service}/Dockerfile copies more: {sorted(roots)}"


@pytest.mark.parametrize("service", SERVICES)
def test_the_image_ends_running_as_a_non_root_user(service: str) -> None:
    users = [
        i.arguments for i in dockerfile_instructions(dockerfile_of(service)) if i.keyword == "USER"
    ]
    assert users, f"{service}/Dockerfile has no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in ROOT_USERS, f"{service}/Dockerfile ends as USER {users[-1]}"


def hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: it is a dev dependency, install requirements-dev.txt")
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_hadolint_finds_nothing_at_warning_level_or_above(service: str) -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "warning", str(dockerfile_of(service))],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the compose file --------------------------------------------------------------------------


def test_no_service_has_a_fixed_container_name() -> None:
    named = [name for name, spec in compose_services().items() if "container_name" in spec]
    assert not named, f"container_name stops `docker compose up --scale`: {named}"


def test_only_the_api_and_the_broker_publish_ports_so_workers_scale() -> None:
    publishing = {name for name, spec in compose_services().items() if spec.get("ports")}
    assert publishing <= PORT_PUBLISHERS, f"workers must not publish ports: {publishing}"
    assert "api-service" in publishing


def test_workers_have_less_cpu_weight_than_the_api_so_requests_come_first() -> None:
    services = compose_services()
    api_weight = services["api-service"].get("cpu_shares", 1024)  # Docker's default
    for worker in ("processor-service", "mailer-service"):
        assert services[worker].get("cpu_shares", 1024) < api_weight, worker


def test_make_run_starts_status_and_workers_at_a_lower_cpu_priority_than_the_api() -> None:
    commands = {
        name: command.strip()
        for name, _, command in (
            line.partition(":")
            for line in (ROOT / "Procfile").read_text().splitlines()
            if line and not line.startswith("#")
        )
    }
    assert set(commands) == {"api", "status", "processor", "mailer"}
    assert commands["api"] == "exec api-service"
    for background in ("status", "processor", "mailer"):
        words = commands[background].split()
        assert words[:3] == ["exec", "nice", "-n"], commands[background]
        assert int(words[3]) > 0, commands[background]
        assert words[4:] == [f"{background}-service"]


def test_every_app_service_waits_for_a_healthy_broker() -> None:
    for name, spec in app_services().items():
        depends_on = spec.get("depends_on")
        assert isinstance(depends_on, dict), f"{name}: depends_on must be the long form"
        assert depends_on.get(BROKER, {}).get("condition") == "service_healthy", name


def test_the_broker_has_a_healthcheck() -> None:
    healthcheck = compose_services()[BROKER].get("healthcheck", {})
    assert healthcheck.get("test"), "rabbitmq has no healthcheck"
    assert not healthcheck.get("disable", False)


@pytest.mark.parametrize("service", SERVICES)
def test_the_service_reaches_the_broker_by_its_compose_name(service: str) -> None:
    url = container_env(service).get("RABBITMQ_URL")
    assert url is not None, f"{service}: RABBITMQ_URL is not set in the container"
    assert urlsplit(url).hostname == BROKER, url


@pytest.mark.parametrize("service", SERVICES)
def test_the_service_logs_in_as_its_own_user_of_the_definitions_file(service: str) -> None:
    url = urlsplit(container_env(service)["RABBITMQ_URL"])
    assert url.username == service
    users = {user["name"]: user for user in definitions()["users"]}
    assert service in users, f"{DEFINITIONS_FILE.name} has no user {service}"
    assert url.password is not None
    assert password_matches(users[service]["password_hash"], unquote(url.password)), (
        f"{service}'s default password in compose is not the one of {DEFINITIONS_FILE.name}"
    )


@pytest.mark.parametrize("service", SERVICES)
def test_the_services_password_comes_from_the_variable_the_render_script_reads(
    service: str,
) -> None:
    raw = environment_of(compose_services()[service])["RABBITMQ_URL"]
    assert f"${{{password_variables()[service]}:-" in raw, raw


def test_the_broker_loads_the_definitions_file_at_boot() -> None:
    mounts = mounts_of(compose_services()[BROKER])
    for target, source in (
        (DEFINITIONS_IN_CONTAINER, DEFINITIONS_FILE),
        (BROKER_CONFIG_IN_CONTAINER, BROKER_CONFIG_FILE),
    ):
        assert target in mounts, f"{target} is not mounted"
        assert (ROOT / mounts[target].source).resolve() == source, mounts[target]
        assert mounts[target].read_only, f"{target} is not mounted read-only"
    assert broker_config().get("load_definitions") == DEFINITIONS_IN_CONTAINER
    raw = [v for v in compose_services()[BROKER]["volumes"] if DEFINITIONS_IN_CONTAINER in str(v)]
    assert f"${{{DEFINITIONS_FILE_VARIABLE}:-" in str(raw), "the definitions file is not choosable"


def test_the_broker_creates_no_default_user() -> None:
    environment = environment_of(compose_services()[BROKER])
    assert not {"RABBITMQ_DEFAULT_USER", "RABBITMQ_DEFAULT_PASS"} & set(environment)
    assert not {"default_user", "default_pass"} & set(broker_config())


def test_guest_appears_nowhere_in_the_compose_file() -> None:
    assert "guest" not in COMPOSE_FILE.read_text(encoding="utf-8").lower()


@pytest.mark.parametrize("service", sorted(PROCESS_SETTINGS))
def test_the_service_settings_load_from_its_container_environment(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = settings_class(service)
    for name in settings_variables(service):
        monkeypatch.delenv(name, raising=False)
    for name, value in container_env(service).items():
        monkeypatch.setenv(name, value)
    cls(_env_file=None)  # raises ValidationError naming the bad variable


def test_the_api_listens_on_all_interfaces_at_the_port_compose_publishes_and_checks() -> None:
    api = compose_services()["api-service"]
    env = container_env("api-service")
    assert env.get("API_HOST") == "0.0.0.0"
    assert {container_port(mapping) for mapping in api["ports"]} == {env["API_PORT"]}
    assert f"127.0.0.1:{env['API_PORT']}/healthz" in " ".join(api["healthcheck"]["test"])


@pytest.mark.parametrize("service", ["status-service", "processor-service", "mailer-service"])
def test_a_worker_serves_its_probes_to_the_compose_network_and_its_healthcheck_asks_readyz(
    service: str,
) -> None:
    env = container_env(service)
    # Set in compose, so that a METRICS_PORT in .env cannot move it from under the check.
    port = environment_of(compose_services()[service]).get("METRICS_PORT")
    healthcheck = " ".join(compose_services()[service]["healthcheck"]["test"])
    assert env.get("METRICS_HOST") == "0.0.0.0"
    assert port not in (None, "", "0")
    assert f"127.0.0.1:{port}/readyz" in healthcheck
    assert healthcheck.startswith("CMD python -c ")  # the slim images have no curl


def assert_writable_volume(service: str, folder: str, variable: str) -> None:
    assert folder.startswith("/"), f"a relative {variable} lands in /app, which is not writable"
    targets = {
        volume["target"] if isinstance(volume, dict) else volume.split(":")[1]
        for volume in compose_services()[service].get("volumes", [])
    }
    assert folder in targets, f"{variable} {folder} is not a mounted volume: {sorted(targets)}"
    # A fresh named volume takes the owner of the image's folder: the service's user.
    instructions = dockerfile_instructions(dockerfile_of(service))
    runs = [i.arguments for i in instructions if i.keyword == "RUN"]
    assert any(folder in run and "chown" in run for run in runs), (
        f"{service}/Dockerfile does not create {folder} for its user"
    )


def test_the_mailer_writes_its_outbox_into_the_mounted_volume() -> None:
    outbox = container_env("mailer-service").get("OUTBOX_DIR")
    assert outbox is not None
    assert_writable_volume("mailer-service", outbox, "OUTBOX_DIR")


@pytest.mark.parametrize("service", ["api-service", "status-service", "mailer-service"])
def test_a_sqlite_database_lives_in_a_mounted_volume_the_service_can_write(service: str) -> None:
    url = container_env(service).get("DATABASE_URL", "")
    assert url.startswith("sqlite:////"), f"{service}: DATABASE_URL {url!r} is not an absolute path"
    folder = url.removeprefix("sqlite:///").rsplit("/", 1)[0]
    assert_writable_volume(service, folder, "DATABASE_URL")


# --- the variables -----------------------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICES)
def test_every_setting_of_the_service_is_documented_in_env_example(service: str) -> None:
    missing = sorted(set(settings_variables(service)) - documented_variables())
    assert not missing, f".env.example does not mention {missing} ({service})"


@pytest.mark.parametrize("variable", MAILTRAP_VARIABLES)
def test_the_mailer_container_receives_what_it_needs_for_mailtrap(variable: str) -> None:
    mailer = compose_services()["mailer-service"]
    from_environment = variable in environment_of(mailer)
    from_env_file = ".env" in env_files_of(mailer) and variable in documented_variables()
    assert from_environment or from_env_file, f"{variable} does not reach the mailer container"


def test_the_broker_passwords_and_the_definitions_file_are_documented_in_env_example() -> None:
    expected = {*password_variables().values(), DEFINITIONS_FILE_VARIABLE}
    missing = sorted(expected - documented_variables())
    assert not missing, f".env.example does not mention {missing}"


def test_app_services_load_the_optional_env_file() -> None:
    for name, spec in app_services().items():
        entries = spec.get("env_file")
        assert entries == [{"path": ".env", "required": False}], name


def test_compose_refuses_to_start_the_api_without_api_keys() -> None:
    # The api listens on 0.0.0.0 in its container, where it would refuse to
    # start without keys anyway; compose says so before anything starts.
    raw = environment_of(compose_services()["api-service"])["API_KEYS"]
    assert raw.startswith("${API_KEYS:?"), raw
