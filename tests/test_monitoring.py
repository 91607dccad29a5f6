"""The monitoring profile (docker/monitoring/): Prometheus's scrape configuration, Grafana's
provisioning and dashboard, and their compose file, checked without a Docker engine the way
tests/test_deploy.py checks the fleet's files (YAML parsed, compose interpolation applied
with docker/.env.example); and the worker's queue-depth gauge against a real Redis.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request

import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest

from recap.queue import CAPTION_TASK, make_app, queue_name
from recap.settings import Settings, get_settings
from tests.test_deploy import (
    COMPOSE,
    ENV_EXAMPLE,
    SECRET_NAME,
    MissingRequired,
    documented,
    env_file_values,
    environment,
    referenced,
    resolve,
    strings,
)
from workers import metrics

MONITORING = COMPOSE.parent / "monitoring"
MONITORING_COMPOSE = MONITORING / "compose.yaml"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "recap.json"
DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = MONITORING / "grafana" / "provisioning" / "dashboards" / "recap.yaml"
GPUS_SCRAPED = 8  # ports base .. base + 7: hosts of up to 8 GPUs


@pytest.fixture(scope="module")
def fleet():
    return resolve(yaml.safe_load(COMPOSE.read_text()), env_file_values(ENV_EXAMPLE))


@pytest.fixture(scope="module")
def raw_monitoring():
    return yaml.safe_load(MONITORING_COMPOSE.read_text())


@pytest.fixture(scope="module")
def monitoring(raw_monitoring):
    return resolve(raw_monitoring, env_file_values(ENV_EXAMPLE))


@pytest.fixture(scope="module")
def prometheus():
    return yaml.safe_load(PROMETHEUS_YML.read_text())


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def published(service: dict) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) of each `address:port:port` entry."""
    return [tuple(entry.rsplit(":", 2)) for entry in service.get("ports") or []]


# -- compose: the profile ---------------------------------------------------------------------


def test_the_fleet_compose_file_includes_the_monitoring_file(fleet, monitoring):
    assert "monitoring/compose.yaml" in fleet["include"]
    assert set(monitoring["services"]) == {"prometheus", "grafana"}
    assert not set(monitoring["services"]) & set(fleet["services"]), "include refuses a service defined twice"


def test_monitoring_services_start_only_with_the_profile(fleet, monitoring):
    for name, service in monitoring["services"].items():
        assert service["profiles"] == ["monitoring"], name
    assert all("monitoring" not in (s.get("profiles") or []) for s in fleet["services"].values())


def test_images_are_pinned_by_version(monitoring):
    for name, service in monitoring["services"].items():
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", service["image"]), f"{name}: {service['image']}"


def test_grafana_and_prometheus_publish_on_loopback_only(monitoring):
    ports = {name: published(service) for name, service in monitoring["services"].items()}
    assert ports == {
        "prometheus": [("127.0.0.1", "9090", "9090")],
        "grafana": [("127.0.0.1", "3000", "3000")],
    }


def test_worker_metrics_reach_the_compose_network_and_no_host_port(fleet):
    worker = fleet["services"]["worker"]
    assert "ports" not in worker
    env = environment(worker)
    assert env["RECAP_METRICS_ADDRESS"] == "0.0.0.0"
    assert int(env["RECAP_METRICS_PORT"]) > 0  # on without a setting: the profile scrapes it


def test_grafana_admin_password_is_required_and_nothing_secret_is_committed(raw_monitoring):
    env = {k: v for k, v in env_file_values(ENV_EXAMPLE).items() if k != "GRAFANA_ADMIN_PASSWORD"}
    with pytest.raises(MissingRequired, match="GRAFANA_ADMIN_PASSWORD"):
        resolve(raw_monitoring, env)
    grafana_env = environment(raw_monitoring["services"]["grafana"])
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", grafana_env["GF_SECURITY_ADMIN_PASSWORD"])
    for key, value in grafana_env.items():
        if SECRET_NAME.search(key) and not key.startswith("GF_AUTH_"):  # GF_AUTH_*: settings, not secrets
            assert str(value).startswith("${") and ":?" in str(value), f"grafana {key} has a literal value"
    # Flower's credentials reach Prometheus as secrets made from docker/.env, never as text.
    assert raw_monitoring["secrets"] == {
        "flower_user": {"environment": "RECAP_FLOWER_USER"},
        "flower_password": {"environment": "RECAP_FLOWER_PASSWORD"},
    }
    for path in MONITORING.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"^\s*password\s*:", text, re.MULTILINE | re.IGNORECASE), path
            assert "change-me" not in text, path


def test_every_monitoring_variable_is_documented(raw_monitoring):
    used = set().union(*(referenced(s) for s in strings(raw_monitoring)))
    used |= {s["environment"] for s in raw_monitoring["secrets"].values()}
    missing = sorted(used - documented(ENV_EXAMPLE))
    assert not missing, f"not in docker/.env.example: {missing}"


def test_mounted_files_exist(monitoring):
    for name, service in monitoring["services"].items():
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (MONITORING / source).exists(), f"{name}: {source} is missing"


# -- Prometheus --------------------------------------------------------------------------------


def scrape_job(prometheus: dict, name: str) -> dict:
    return next(job for job in prometheus["scrape_configs"] if job["job_name"] == name)


def test_prometheus_scrapes_every_worker_process_on_the_compose_network(prometheus, fleet):
    job = scrape_job(prometheus, "recap-worker")
    sd = job["dns_sd_configs"]
    assert {name for entry in sd for name in entry["names"]} == {"worker"}
    assert all(entry["type"] == "A" for entry in sd)
    base = int(environment(fleet["services"]["worker"])["RECAP_METRICS_PORT"])
    assert sorted(entry["port"] for entry in sd) == [base + gpu for gpu in range(GPUS_SCRAPED)]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_prometheus_scrapes_flower_with_its_credentials_from_secrets(prometheus, fleet, monitoring):
    job = scrape_job(prometheus, "flower")
    flower = fleet["services"]["flower"]
    port = flower["command"][flower["command"].index("--port") + 1]
    assert job["static_configs"] == [{"targets": [f"flower:{port}"]}]
    assert [p[2] for p in published(flower)] == [port]
    auth = job["basic_auth"]
    assert set(auth) == {"username_file", "password_file"}
    mounted = monitoring["services"]["prometheus"]["secrets"]
    assert auth == {
        "username_file": "/run/secrets/flower_user",
        "password_file": "/run/secrets/flower_password",
    }
    assert sorted(mounted) == ["flower_password", "flower_user"]


def test_prometheus_reads_this_config(monitoring):
    prometheus = monitoring["services"]["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


# -- Grafana -----------------------------------------------------------------------------------


def test_grafana_provisions_the_datasource_and_the_dashboard(monitoring, dashboard):
    grafana = monitoring["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("."))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert published(monitoring["services"]["prometheus"])[0][2] == "9090"
    provider = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]
    assert provider["type"] == "file"
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {datasource["uid"]}


# -- the dashboard's queries -------------------------------------------------------------------

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
PROMQL_WORDS |= {"and", "or", "unless", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions or
    aggregations (followed by `(`), keywords, label names in `{}` or `by (...)`, strings or
    range durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[match.end() :].lstrip()
        if rest.startswith("(") or match.group().lower() in PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def exported_names() -> set[str]:
    """Every series name the worker's metrics module and Flower's /metrics can export."""
    from flower.events import get_prometheus_metrics

    get_prometheus_metrics()  # Flower's metrics, registered as a running Flower does
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_count", "_sum", "_created"]}
    names = set()
    for family in REGISTRY.collect():
        names |= {family.name} | {family.name + s for s in suffixes.get(family.type, [])}
    return names


def test_metric_names_of_a_query():
    expr = 'sum by (error_class) (rate(recap_items_total{status="failed"}[$__rate_interval])) or vector(0)'
    assert metric_names(expr) == {"recap_items_total"}
    assert metric_names("max by (queue) (recap_queue_depth >= 0)") == {"recap_queue_depth"}
    expr = "histogram_quantile(0.95, sum by (le) (rate(recap_batch_seconds_bucket[5m])))"
    assert metric_names(expr) == {"recap_batch_seconds_bucket"}


def test_every_query_names_metrics_that_are_exported(dashboard):
    exported = exported_names()
    assert "recap_queue_depth" in exported and "flower_worker_online" in exported
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"{panel['title']}: {target['expr']} selects no metric"
            unknown = names - exported
            assert not unknown, f"{panel['title']}: {sorted(unknown)} are not exported"


def test_dashboard_shows_what_the_fleet_needs(dashboard):
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert "sum by (instance) (recap_images_per_second)" in exprs  # per worker
    assert "sum(recap_images_per_second)" in exprs  # total
    assert any("recap_gpu_busy_ratio" in e for e in exprs)
    assert any(re.search(r'by \(error_class\).*rate\(recap_items_total\{status="failed"\}', e) for e in exprs)
    assert any(re.search(r"by \(queue\).*recap_queue_depth", e) for e in exprs)
    assert dashboard["uid"] and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_dashboard_panels_do_not_overlap(dashboard):
    cells = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


# -- recap_queue_depth against a real Redis ----------------------------------------------------


def enqueue(broker_url: str, model: str, n: int) -> None:
    """N real caption messages on the model's queue, sent as the dispatcher sends them."""
    app = make_app(Settings(broker_url=broker_url, model=model))
    try:
        for chunk_no in range(n):
            app.send_task(CAPTION_TASK, kwargs={"job_id": 1, "chunk_no": chunk_no}, queue=queue_name(model))
    finally:
        app.close()


def unexport(queue: str) -> None:
    """Drop a test's queue from the process-wide registry (its Redis goes away)."""
    try:
        metrics.QUEUE_DEPTH.remove(queue)
    except KeyError:  # not exported
        pass


def test_queue_depth_reads_the_messages_waiting(redis_url):
    model = Settings().model
    enqueue(redis_url, model, 5)
    probe = metrics.QueueDepthProbe(queue_name(model), redis_url)
    try:
        assert probe.read() == 5
        probe.export()
        assert REGISTRY.get_sample_value("recap_queue_depth", {"queue": queue_name(model)}) == 5
        enqueue(redis_url, model, 2)
        assert b'recap_queue_depth{queue="%s"} 7.0' % queue_name(model).encode() in generate_latest()
    finally:
        unexport(queue_name(model))
        probe.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_queue_depth_does_not_hang_on_a_broker_that_does_not_answer():
    with socket.socket() as silent:  # accepts connections (the backlog) and never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        probe = metrics.QueueDepthProbe("recap.m", f"redis://127.0.0.1:{silent.getsockname()[1]}/0", 0.3)
        started = time.monotonic()
        assert probe.read() == -1
        assert time.monotonic() - started < 2
        probe.close()
    down = metrics.QueueDepthProbe("recap.m", f"redis://127.0.0.1:{free_port()}/0", 0.3)
    assert down.read() == -1
    down.close()


@pytest.fixture
def worker_settings(redis_url, monkeypatch):
    """This process's settings (get_settings) pointed at the test's Redis."""
    monkeypatch.setenv("RECAP_BROKER_URL", redis_url)
    get_settings.cache_clear()
    yield get_settings()
    unexport(queue_name(get_settings().model))
    get_settings.cache_clear()


def test_a_worker_serves_its_queue_depth_on_its_metrics_port(worker_settings):
    """serve(), as a worker process calls it: a scrape of /metrics reads the queue."""
    enqueue(worker_settings.broker_url, worker_settings.model, 3)
    port = free_port()
    metrics.serve(port, "127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert f'recap_queue_depth{{queue="{queue_name(worker_settings.model)}"}} 3.0' in text
