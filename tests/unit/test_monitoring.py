"""The monitoring files `farm deploy` writes (deploy/monitoring.py): the Prometheus configuration
parses and scrapes the ports the workers and the exporter really serve on, every alert rule is
complete, and every metric a rule or a dashboard panel names is one the code defines (taken from
the metrics' own registries, not from a list kept here)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from farm.deploy import compose as deploy_compose
from farm.deploy import files as deploy
from farm.deploy import k8s as deploy_k8s
from farm.deploy import monitoring
from farm.scheduler.exporter import EXPORTER_KEYS, FarmCollector, served_queues
from farm.settings import Settings
from farm.worker.metrics import WorkerMetrics

CLASSES = (16, 24, 48)
MODELS = ("sdxl-base", "sdxl-refiner")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum",
                                                               "_created"),
            "info": ("_info",)}


def spec() -> deploy.DeploySpec:
    return deploy.make_spec(Settings.load(env={}), classes=CLASSES, model_names=MODELS)


def sample_names(families: Iterable[Any]) -> set[str]:
    """Every sample name the families can expose, as PromQL refers to them."""
    names = set()
    for family in families:
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
    return names


def defined_metrics() -> set[str]:
    worker = WorkerMetrics()
    exporter = FarmCollector(None, Settings.load(env={}))
    return sample_names(worker.registry.collect()) | sample_names(exporter.describe())


def used_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\bfarm_[a-z_]+\b", expr))


def docs(text: str) -> list[Any]:
    return list(yaml.safe_load_all(text))


def test_every_metric_a_rule_or_panel_names_is_defined() -> None:
    defined = defined_metrics()
    assert {"farm_worker_stage_seconds_bucket", "farm_queue_depth", "farm_workers",
            "farm_worker_gpu_memory_peak_bytes"} <= defined
    exprs = monitoring.expressions(spec())
    assert exprs
    for expr in exprs:
        used = used_metrics(expr)
        assert used, expr
        assert used <= defined, (expr, used - defined)


def test_alert_rules_are_complete() -> None:
    files = deploy_compose.render(spec())
    (rules,) = docs(files["monitoring/alerts.yml"])
    found = {r["alert"]: r for group in rules["groups"] for r in group["rules"]}
    assert {"FarmQueueWithoutWorker", "FarmJobsDeadLettered",
            "FarmWorkerHeartbeatStale"} <= set(found)
    for name, rule in found.items():
        assert rule["expr"].strip(), name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), (name, rule["for"])
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name
    # the heartbeat alert fires past the TTL the files give every worker
    ttl = float(spec().settings_env["FARM_HEARTBEAT_TTL"])
    assert found["FarmWorkerHeartbeatStale"]["expr"].endswith(f"> {ttl:g}")


def test_the_dashboard_is_grafana_json_over_one_data_source() -> None:
    board = json.loads(deploy_compose.render(spec())["monitoring/farm-dashboard.json"])
    assert board["uid"] == monitoring.DASHBOARD_UID and board["panels"]
    ids = [p["id"] for p in board["panels"]]
    assert len(set(ids)) == len(ids)
    for panel in board["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"]


def test_compose_scrapes_every_worker_and_the_exporter_on_their_ports() -> None:
    s = spec()
    files = deploy_compose.render(s)
    (doc,) = docs(files["compose.yaml"])
    services = doc["services"]
    (config,) = docs(files["monitoring/prometheus.yml"])
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    (dns,) = jobs[monitoring.WORKER_JOB]["dns_sd_configs"]
    workers = {name for name in services if name.startswith("worker-")}
    assert set(dns["names"]) == workers and len(workers) == len(CLASSES)
    for name in workers:
        assert services[name]["environment"]["FARM_METRICS_PORT"] == str(dns["port"])
    (static,) = jobs[monitoring.EXPORTER_JOB]["static_configs"]
    host, port = static["targets"][0].split(":")
    command = services[host]["command"]
    assert command[:2] == ["metrics", "serve"]
    assert command[command.index("--port") + 1] == port
    prometheus = services["prometheus"]
    assert any(v.startswith("./monitoring/alerts.yml:") for v in prometheus["volumes"])
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    # Grafana's provisioning reads the files written beside compose.yaml
    for source in ("monitoring/grafana/datasources/prometheus.yml",
                   "monitoring/grafana/dashboards/farm.yml"):
        assert docs(files[source])[0]["apiVersion"] == 1
    assert "GRAFANA_ADMIN_PASSWORD=" in files["env.example"]
    assert "flower" not in files["compose.yaml"].lower()


def test_k8s_pods_carry_the_scrape_annotations_of_the_port_they_serve() -> None:
    s = spec()
    files = deploy_k8s.render(s)
    pods = []
    for name, text in files.items():
        if name.endswith(".yaml") and "/" not in name:
            pods += [d for d in docs(text) if d and d.get("kind") == "Deployment"]
    assert {d["metadata"]["name"] for d in pods} == {
        *(deploy.worker_name(c) for c in CLASSES), monitoring.EXPORTER}
    for deployment in pods:
        template = deployment["spec"]["template"]
        notes = template["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        (container,) = template["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert str(ports["metrics"]) == notes["prometheus.io/port"]
        served = {e["name"]: e.get("value") for e in container["env"]}.get("FARM_METRICS_PORT")
        args = container["args"]
        if "serve" in args:
            served = args[args.index("--port") + 1]
        assert served == notes["prometheus.io/port"], deployment["metadata"]["name"]
    (config,) = docs(files["monitoring/prometheus.yml"])
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [s.namespace]


@pytest.mark.parametrize("target", ["compose", "k8s"])
def test_the_exporter_reports_every_queue_the_workers_serve(target: str) -> None:
    s = spec()
    settings = Settings.load(env={"FARM_VRAM_CLASSES": ",".join(map(str, CLASSES))})
    args = monitoring.exporter_args(s)
    models = [args[i + 1] for i, a in enumerate(args) if a == "--model"]
    assert set(deploy.all_queues(s)) <= set(served_queues(settings, models))


def test_exporter_keys_are_read_only_patterns_of_the_farm() -> None:
    assert "farm.*" in EXPORTER_KEYS and "farm:worker:*" in EXPORTER_KEYS
    assert all(" " not in k for k in EXPORTER_KEYS)


def test_docs_list_every_metric() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    worker = WorkerMetrics().registry.collect()
    exporter = FarmCollector(None, Settings.load(env={})).describe()
    for family in [*worker, *exporter]:
        shown = family.name + {"counter": "_total", "info": "_info"}.get(family.type, "")
        assert f"`{shown}`" in text, shown
