"""The ``observability`` compose profile (Prometheus and Grafana) agrees with the services.

No Docker engine is needed: docker-compose.yml, observability/prometheus.yml and the
Grafana provisioning files are read and checked against the compose services and the
metrics the code defines. ``promtool`` (Debian's ``prometheus`` package puts it on
PATH; a copy beside the venv's python is found too) checks the Prometheus config and
parses every dashboard query; without it those two tests skip, and under ``CI=true``
they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from api_service import http_metrics
from mailer_service import metrics as mailer_metrics
from pipeline_shared import metrics as shared_metrics
from unit.test_deployment import (
    ROOT,
    app_services,
    compose_services,
    container_port,
    environment_of,
    interpolate,
    mounts_of,
)

PROFILE = "observability"
PROMETHEUS = "prometheus"
GRAFANA = "grafana"
OBSERVABILITY_SERVICES = {PROMETHEUS, GRAFANA, "jaeger"}
# Jaeger keeps its traces in memory, on purpose (see docker-compose.yml).
KEEPS_DATA = {PROMETHEUS, GRAFANA}
OBSERVABILITY = ROOT / "observability"
PROMETHEUS_CONFIG = OBSERVABILITY / "prometheus.yml"
PROMETHEUS_CONFIG_IN_CONTAINER = "/etc/prometheus/prometheus.yml"
GRAFANA_PROVISIONING = OBSERVABILITY / "grafana" / "provisioning"
GRAFANA_PROVISIONING_IN_CONTAINER = "/etc/grafana/provisioning"
DASHBOARDS = OBSERVABILITY / "grafana" / "dashboards"
DASHBOARD = DASHBOARDS / "pipeline.json"
# The port of the broker's rabbitmq_prometheus plugin, which the official image enables.
BROKER_METRICS_PORT = 15692
# What a service's metrics port is called in its compose environment.
PORT_VARIABLES = {
    "api-service": "API_PORT",
    "status-service": "METRICS_PORT",
    "processor-service": "METRICS_PORT",
    "mailer-service": "METRICS_PORT",
}
# Grafana's own variable, and a range for promtool to parse in its place.
RATE_INTERVAL = "$__rate_interval"

# Every metric the services define, as the objects themselves.
METRICS: list[MetricWrapperBase] = [
    shared_metrics.EVENTS_CONSUMED,
    shared_metrics.HANDLING_FAILURES,
    shared_metrics.HANDLING_DURATION,
    shared_metrics.IN_FLIGHT,
    shared_metrics.EVENTS_PUBLISHED,
    shared_metrics.MESSAGES_PUBLISHED,
    mailer_metrics.PROVIDER_SENDS,
    mailer_metrics.PROVIDER_LOOKUPS,
    mailer_metrics.JOB_DURATION,
    http_metrics.REQUESTS,
    http_metrics.DURATION,
]
# The figures the dashboard must show (issue 10: "the metrics above").
SHOWN = [
    shared_metrics.EVENTS_CONSUMED,
    shared_metrics.HANDLING_FAILURES,
    shared_metrics.HANDLING_DURATION,
    shared_metrics.IN_FLIGHT,
    shared_metrics.EVENTS_PUBLISHED,
    shared_metrics.MESSAGES_PUBLISHED,
    mailer_metrics.PROVIDER_SENDS,
    mailer_metrics.JOB_DURATION,
    http_metrics.REQUESTS,
    http_metrics.DURATION,
]
# The series names each metric type exports (the ``_created`` ones included).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}

pytestmark = pytest.mark.unit


# --- reading the files -------------------------------------------------------------------------


def load_yaml(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict), f"{path} is not a mapping"
    return document


def scrape_configs() -> list[dict[str, Any]]:
    configs = load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]
    assert isinstance(configs, list)
    return configs


def dns_targets() -> dict[str, list[tuple[dict[str, Any], dict[str, Any]]]]:
    """Each DNS name Prometheus looks up, with its scrape config and its dns_sd entry."""
    targets: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for job in scrape_configs():
        for entry in job.get("dns_sd_configs", []):
            for name in entry["names"]:
                targets.setdefault(name, []).append((job, entry))
    return targets


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def series_names(metric: MetricWrapperBase) -> set[str]:
    return {
        family.name + suffix for family in metric.describe() for suffix in SUFFIXES[family.type]
    }


def defined_series() -> dict[str, MetricWrapperBase]:
    return {name: metric for metric in METRICS for name in series_names(metric)}


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPINGS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# A whole identifier that is not a function call.
_IDENTIFIER = re.compile(r"(?<![\w:.$])[A-Za-z_:][\w:]*(?![\w:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects: what is left once strings, label
    matchers, ranges, groupings, function names and keywords are taken out."""
    bare = expr
    for pattern in (_STRINGS, _MATCHERS, _RANGES, _GROUPINGS):
        bare = pattern.sub(" ", bare)
    return {name for name in _IDENTIFIER.findall(bare) if name.lower() not in _KEYWORDS}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def promtool() -> str:
    beside_python = Path(sys.executable).parent / "promtool"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("promtool")
    if found is None:
        message = "promtool not found: `apt-get install prometheus` puts it on PATH"
        if in_ci():
            pytest.fail(f"{message} (under CI=true this test fails instead of skipping)")
        pytest.skip(message)
    return found


def run_promtool(*arguments: str) -> None:
    result = subprocess.run(
        [promtool(), *arguments], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the profile -------------------------------------------------------------------------------


def test_the_observability_services_start_only_with_their_profile() -> None:
    services = compose_services()
    assert set(services) >= OBSERVABILITY_SERVICES
    for name, spec in services.items():
        expected = [PROFILE] if name in OBSERVABILITY_SERVICES else None
        assert spec.get("profiles") == expected, f"{name}: profiles {spec.get('profiles')}"


@pytest.mark.parametrize("service", sorted(compose_services()))
def test_every_service_has_a_healthcheck_that_runs_a_command(service: str) -> None:
    healthcheck = compose_services()[service].get("healthcheck")
    assert isinstance(healthcheck, dict), f"{service} has no healthcheck"
    assert not healthcheck.get("disable"), f"{service} disables its healthcheck"
    test = healthcheck["test"]
    assert isinstance(test, list), f"{service}: use the exec form of the healthcheck"
    assert test[0] in {"CMD", "CMD-SHELL"}, test
    assert len(test) > 1, f"{service}: the healthcheck runs nothing"


@pytest.mark.parametrize("service", sorted(OBSERVABILITY_SERVICES))
def test_an_observability_image_is_pinned_to_a_version(service: str) -> None:
    image = compose_services()[service]["image"]
    name, _, tag = image.rpartition(":")
    assert name, f"{service}: {image} has no tag"
    assert "/" not in tag, f"{service}: {image} has no tag"
    assert tag != "latest", f"{service}: {image} is not pinned"
    assert re.search(r"\d", tag), f"{service}: {image} names no version"


@pytest.mark.parametrize("service", sorted(OBSERVABILITY_SERVICES))
def test_an_observability_service_is_published_on_the_hosts_loopback_only(service: str) -> None:
    # Grafana's default password is in the README, like the broker's.
    ports = compose_services()[service].get("ports", [])
    assert ports, f"{service} publishes no port"
    for mapping in ports:
        assert isinstance(mapping, str)
        assert interpolate(mapping).startswith("127.0.0.1:"), mapping


def test_the_profiles_volumes_are_declared() -> None:
    declared = set(yaml.safe_load((ROOT / "docker-compose.yml").read_text("utf-8"))["volumes"])
    for service in KEEPS_DATA:
        sources = {mount.source for mount in mounts_of(compose_services()[service]).values()}
        named = {source for source in sources if not source.startswith(("./", "/"))}
        assert named, f"{service} keeps no data in a named volume"
        assert named <= declared, f"{service}: {sorted(named - declared)} not declared"


# --- Jaeger -------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", sorted(app_services()))
def test_a_service_exports_spans_only_where_the_deployer_names_a_collector(service: str) -> None:
    # Empty by default: nothing is exported; `.env` may point at the profile's Jaeger.
    endpoint = environment_of(app_services()[service]).get("OTEL_EXPORTER_OTLP_ENDPOINT")
    assert endpoint == "${OTEL_EXPORTER_OTLP_ENDPOINT:-}"
    assert interpolate(endpoint) == ""


def test_jaeger_takes_otlp_over_http_on_the_port_the_readme_names() -> None:
    jaeger = compose_services()["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/jaeger:2.")  # OTLP on 4317/4318 by default
    assert "OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4318" in (ROOT / "README.md").read_text()
    assert [container_port(mapping) for mapping in jaeger["ports"]] == ["16686"]


# --- Prometheus --------------------------------------------------------------------------------


def test_prometheus_reads_the_config_these_tests_check() -> None:
    spec = compose_services()[PROMETHEUS]
    mount = mounts_of(spec)[PROMETHEUS_CONFIG_IN_CONTAINER]
    assert (ROOT / mount.source).resolve() == PROMETHEUS_CONFIG
    assert mount.read_only
    assert f"--config.file={PROMETHEUS_CONFIG_IN_CONTAINER}" in spec["command"]


@pytest.mark.parametrize("service", sorted(PORT_VARIABLES))
def test_prometheus_finds_every_replica_of_a_service_by_its_name_on_its_metrics_port(
    service: str,
) -> None:
    port = environment_of(compose_services()[service])[PORT_VARIABLES[service]]
    assert port not in ("", "0"), f"{service} serves no metrics in compose"

    found = dns_targets().get(service)

    assert found, f"prometheus.yml does not look up {service}"
    for job, entry in found:
        assert entry.get("type", "SRV") == "A", "compose's DNS answers A records, no SRV"
        assert str(entry["port"]) == port, f"{service}: scraped on {entry['port']}, serves {port}"
        assert job.get("metrics_path", "/metrics") == http_metrics.PATH
        assert job.get("scheme", "http") == "http"


def test_prometheus_scrapes_the_broker_on_its_plugins_port() -> None:
    found = dns_targets().get("rabbitmq")
    assert found
    assert [entry["port"] for _, entry in found] == [BROKER_METRICS_PORT]


def test_prometheus_looks_up_only_compose_services_and_lists_no_fixed_address() -> None:
    services = set(compose_services())
    assert set(dns_targets()) <= services
    for job in scrape_configs():
        # A static address would scrape one replica of a scaled service, or none.
        assert "static_configs" not in job, job["job_name"]


def test_promtool_accepts_the_prometheus_config() -> None:
    run_promtool("check", "config", str(PROMETHEUS_CONFIG))


# --- Grafana -----------------------------------------------------------------------------------


def grafana_mount_target(source: Path) -> str:
    for target, mount in mounts_of(compose_services()[GRAFANA]).items():
        if (ROOT / mount.source).resolve() == source:
            assert mount.read_only, f"{source} is mounted writable"
            return target
    raise AssertionError(f"{source} is not mounted into grafana")


def test_grafana_reads_the_provisioning_folder() -> None:
    assert grafana_mount_target(GRAFANA_PROVISIONING) == GRAFANA_PROVISIONING_IN_CONTAINER


def test_the_dashboard_provider_loads_the_folder_compose_mounts_with_the_dashboard() -> None:
    provider_file = GRAFANA_PROVISIONING / "dashboards" / "pipeline.yml"
    providers = load_yaml(provider_file)["providers"]

    paths = [provider["options"]["path"] for provider in providers if provider["type"] == "file"]

    assert paths == [grafana_mount_target(DASHBOARDS)]
    assert DASHBOARD.parent == DASHBOARDS


def test_grafanas_home_dashboard_is_the_provisioned_one() -> None:
    home = environment_of(compose_services()[GRAFANA])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == str(PurePosixPath(grafana_mount_target(DASHBOARDS)) / DASHBOARD.name)


def datasources() -> list[dict[str, Any]]:
    loaded = load_yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    assert isinstance(loaded, list)
    return loaded


def test_grafana_reaches_prometheus_by_its_compose_name_and_container_port() -> None:
    (source,) = datasources()
    url = urlsplit(source["url"])
    ports = {container_port(mapping) for mapping in compose_services()[PROMETHEUS]["ports"]}
    assert source["type"] == "prometheus"
    assert url.hostname == PROMETHEUS
    assert str(url.port) in ports


def test_grafanas_admin_credentials_come_from_variables_with_development_defaults() -> None:
    environment = environment_of(compose_services()[GRAFANA])
    assert environment["GF_SECURITY_ADMIN_USER"].startswith("${GRAFANA_ADMIN_USER:-")
    assert environment["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:-")


def test_the_dashboard_is_json_with_unique_panels_on_the_provisioned_datasource() -> None:
    document = dashboard()
    (source,) = datasources()
    panels = document["panels"]
    assert document["uid"]
    assert panels
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} queries nothing"
        for datasource in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert datasource == {"type": "prometheus", "uid": source["uid"]}, panel["title"]


def test_every_dashboard_query_selects_only_metrics_the_services_define() -> None:
    defined = defined_series()
    for expr in dashboard_queries():
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        assert names <= set(defined), f"{expr!r} selects {sorted(names - set(defined))}"


def test_the_dashboard_shows_every_metric_of_the_pipeline() -> None:
    defined = defined_series()
    used = {defined[name] for expr in dashboard_queries() for name in metric_names(expr)}
    missing = [sorted(series_names(metric))[0] for metric in SHOWN if metric not in used]
    assert not missing, f"the dashboard does not show {missing}"


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    # promtool has no "parse this expression" command; a rules file of recording
    # rules makes it parse each one.
    rules = [
        {"record": f"dashboard:query_{index}", "expr": expr.replace(RATE_INTERVAL, "5m")}
        for index, expr in enumerate(dashboard_queries())
    ]
    rules_file = tmp_path / "dashboard-queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool("check", "rules", str(rules_file))


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (stage, le) (rate(a_bucket{stage="x"}[$__rate_interval]))', {"a_bucket"}),
        ("histogram_quantile(0.95, sum without (pod) (rate(b_bucket[5m])))", {"b_bucket"}),
        ("c_total / on (job) group_left d", {"c_total", "d"}),
        ("sum(e) > bool 0", {"e"}),
    ],
)
def test_the_query_reader_finds_the_selected_metrics_and_nothing_else(
    expr: str, names: set[str]
) -> None:
    assert metric_names(expr) == names
