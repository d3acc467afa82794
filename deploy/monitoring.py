"""Watching a farm: the metrics exporter's service, the Prometheus scrape configuration, alert
rules and a Grafana dashboard, written by `farm deploy` beside the workers.

    compose  services `metrics` (`farm metrics serve`), `prometheus` (scrapes every worker
             container, found by its service's DNS name, and the exporter; loads the rules) and
             `grafana` (the dashboard, provisioned); monitoring/ holds their files
    k8s      scrape annotations (prometheus.io/scrape, prometheus.io/port) on the worker pods
             and on a Deployment running the exporter; monitoring/ holds a scrape job for the
             cluster's own Prometheus, the rules and the dashboard (not applied with `-f .`)

Every metric a rule or a panel names is one the code defines (worker/metrics.py,
scheduler/exporter.py); a test checks it. docs/metrics.md describes them.
"""

from __future__ import annotations

import json
from typing import Any

from farm.deploy import access, files
from farm.scheduler import exporter

PROMETHEUS_IMAGE = "prom/prometheus:v3.13.1"
GRAFANA_IMAGE = "grafana/grafana:12.2.1"

WORKER_PORT = files.METRICS_PORT
EXPORTER_PORT = exporter.DEFAULT_PORT
EXPORTER = "farm-metrics"            # the exporter's Kubernetes Deployment
EXPORTER_SERVICE = "metrics"         # ... and compose service
WORKER_JOB, EXPORTER_JOB = "farm-workers", "farm-metrics"   # Prometheus job names
SCRAPE_INTERVAL = "15s"
DATASOURCE_UID = "farm-prometheus"
DASHBOARD_UID = "farm-fleet"

# The exporter's Redis user: its own read-only role (deploy/access.py, made from
# scheduler/exporter.py's EXPORTER_COMMANDS and EXPORTER_KEYS)
EXPORTER_ROLE = "metrics"

# How long a queue may hold work with no live worker for it before an alert: a class scaled to
# zero needs a node, the image, the weights (about 7 GB for SDXL) and a warm-up first.
NO_WORKER_FOR = "15m"


def exporter_role() -> str:
    """The access role (deploy/access.py) the exporter connects as."""
    return access.role(EXPORTER_ROLE).name


def exporter_args(spec: files.DeploySpec) -> list[str]:
    """`farm ...` arguments of the exporter: the served models' queues, on EXPORTER_PORT."""
    return ["metrics", "serve", "--port", str(EXPORTER_PORT),
            *(arg for name in spec.models for arg in ("--model", name))]


# -- alert rules -------------------------------------------------------------------------------


def alert_rules(spec: files.DeploySpec) -> dict[str, Any]:
    """A Prometheus rules file: work waits with no worker; jobs dead-lettered; a worker whose
    heartbeat is older than the heartbeat TTL (the fleet already takes it for dead)."""
    ttl = float(spec.settings_env.get("FARM_HEARTBEAT_TTL", "20"))
    queue = "model, vram_class, priority"
    rules = [
        {"alert": "FarmQueueWithoutWorker",
         "expr": f"farm_queue_depth > 0 and on ({queue}) farm_queue_consumers == 0",
         "for": NO_WORKER_FOR,
         "labels": {"severity": "critical"},
         "annotations": {
             "summary": "Stages of {{ $labels.model }} at {{ $labels.vram_class }} GB (priority "
                        "{{ $labels.priority }}) wait and no live worker serves them",
             "description": "{{ $value }} stage(s) waiting. Start a worker of this class or "
                            "larger (farm workers lists the live ones), or check why the "
                            "class's workers do not start (node, image, weights)."}},
        {"alert": "FarmJobsDeadLettered",
         "expr": "sum by (model, stage) (increase(farm_worker_dead_letters_total[15m])) > 0",
         "for": "0m",
         "labels": {"severity": "warning"},
         "annotations": {
             "summary": "Jobs of {{ $labels.model }} were dead-lettered in their "
                        "{{ $labels.stage }} stage",
             "description": "A stage failed FARM_MAX_ATTEMPTS times, a worker fault each time "
                            "(a crash, a hang, a CUDA error). farm status BATCH shows the "
                            "error; the worker logs show the cause."}},
        {"alert": "FarmWorkerHeartbeatStale",
         "expr": f"farm_worker_heartbeat_age_seconds > {ttl:g}",
         "for": "1m",
         "labels": {"severity": "warning"},
         "annotations": {
             "summary": "Worker {{ $labels.instance }} cannot write its heartbeat",
             "description": "Its last heartbeat is {{ $value | humanizeDuration }} old, past "
                            f"the heartbeat TTL ({ttl:g} s): the fleet takes it for dead and "
                            "puts its stage back. Check its connection to Redis."}},
        {"alert": "FarmExporterCannotReadRedis",
         "expr": "farm_exporter_redis_up == 0",
         "for": "5m",
         "labels": {"severity": "critical"},
         "annotations": {
             "summary": "farm metrics serve cannot read Redis",
             "description": "Queue depths and live workers are unknown; the broker may be "
                            "down for the whole farm."}},
    ]
    return {"groups": [{"name": "farm", "rules": rules}]}


# -- Prometheus --------------------------------------------------------------------------------


def prometheus_config(spec: files.DeploySpec, target: str) -> dict[str, Any]:
    """compose: every worker container (DNS, so a scaled service is scraped whole) and the
    exporter. k8s: the pods of the farm's namespace that carry the scrape annotations."""
    config: dict[str, Any] = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": ["/etc/prometheus/alerts.yml" if target == "compose" else "alerts.yml"],
    }
    if target == "compose":
        config["scrape_configs"] = [
            {"job_name": WORKER_JOB,
             "dns_sd_configs": [{"names": [f"worker-{c}gb" for c in spec.classes],
                                 "type": "A", "port": WORKER_PORT, "refresh_interval": "30s"}],
             "relabel_configs": [{"source_labels": ["__meta_dns_name"],
                                  "target_label": "service"}]},
            {"job_name": EXPORTER_JOB,
             "static_configs": [{"targets": [f"{EXPORTER_SERVICE}:{EXPORTER_PORT}"]}]},
        ]
        return config
    config["scrape_configs"] = [{
        "job_name": "farm",
        "kubernetes_sd_configs": [{"role": "pod", "namespaces": {"names": [spec.namespace]}}],
        "relabel_configs": [
            {"source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
             "action": "keep", "regex": "true"},
            {"source_labels": ["__address__",
                               "__meta_kubernetes_pod_annotation_prometheus_io_port"],
             "action": "replace", "regex": r"([^:]+)(?::\d+)?;(\d+)",
             "replacement": "$1:$2", "target_label": "__address__"},
            {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name"],
             "target_label": "app"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        ],
    }]
    return config


def scrape_annotations(port: int) -> dict[str, str]:
    """The annotations the common Prometheus setups (its example configuration, the
    prometheus-community Helm chart) scrape a pod by."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
            "prometheus.io/path": "/metrics"}


# -- the dashboard -----------------------------------------------------------------------------

# (title, unit, [(PromQL, legend)]) of each panel, in reading order
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Stages waiting, by class", "short",
     [("sum by (vram_class) (farm_queue_depth)", "{{vram_class}} GB")]),
    ("Queues with work and no live worker", "short",
     [("farm_queue_depth > 0 and on (model, vram_class, priority) farm_queue_consumers == 0",
       "{{model}} {{vram_class}} GB p{{priority}}")]),
    ("Live workers, by class and state", "short",
     [("sum by (vram_class, state) (farm_workers) > 0", "{{vram_class}} GB {{state}}")]),
    ("Batches and jobs", "short",
     [('farm_batches{state="active"}', "active batches"), ("farm_jobs_open", "open jobs"),
      ("farm_stages_running", "stages running")]),
    ("Stages ended per second, by outcome", "ops",
     [("sum by (outcome) (rate(farm_worker_stages_total[5m]))", "{{outcome}}")]),
    ("Images per minute", "short",
     [("sum by (model) (rate(farm_worker_images_total[5m])) * 60", "{{model}}")]),
    ("Stage seconds, p50 and p95", "s",
     [("histogram_quantile(0.5, sum by (le, model, stage) "
       "(rate(farm_worker_stage_seconds_bucket[10m])))", "p50 {{model}} {{stage}}"),
      ("histogram_quantile(0.95, sum by (le, model, stage) "
       "(rate(farm_worker_stage_seconds_bucket[10m])))", "p95 {{model}} {{stage}}")]),
    ("Denoising steps per second", "short",
     [("sum by (vram_class) (rate(farm_worker_steps_total[5m]))", "fleet {{vram_class}} GB"),
      ("avg by (vram_class, profile) (farm_worker_steps_per_second)",
       "per worker {{vram_class}} GB {{profile}}")]),
    ("Dead letters, hand-backs, takeovers, recoveries (per hour)", "short",
     [("sum(increase(farm_worker_dead_letters_total[1h]))", "dead-lettered"),
      ("sum(increase(farm_worker_handbacks_total[1h]))", "handed back"),
      ("sum(increase(farm_worker_takeovers_total[1h]))", "taken over"),
      ("sum by (path) (increase(farm_worker_recoveries_total[1h]))", "recovered ({{path}})")]),
    ("Compile at start-up", "s",
     [("max by (model, backend) (farm_worker_compile_seconds)", "{{model}} {{backend}}"),
      ("sum by (result) (farm_worker_compile_cache_total)", "cache {{result}} (count)"),
      ("sum(increase(farm_worker_recompiles_total[1h]))", "recompiles per hour (count)")]),
    ("Heartbeat age", "s",
     [("max by (instance) (farm_worker_heartbeat_age_seconds)", "{{instance}}")]),
    ("GPU memory", "bytes",
     [("farm_worker_gpu_memory_used_bytes", "used {{instance}}"),
      ("farm_worker_gpu_memory_peak_bytes", "peak {{instance}}"),
      ("farm_worker_gpu_memory_total_bytes", "total {{instance}}")]),
]


def dashboard() -> dict[str, Any]:
    """A Grafana dashboard (JSON model) over the farm's metrics; its data source is a variable,
    so it imports into any Grafana with a Prometheus data source."""
    source = {"type": "prometheus", "uid": "${datasource}"}
    panels = []
    for i, (title, unit, queries) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title, "datasource": source,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + k), "datasource": source, "expr": expr,
                         "legendFormat": legend} for k, (expr, legend) in enumerate(queries)],
        })
    return {
        "uid": DASHBOARD_UID, "title": "farm: the fleet", "tags": ["farm"],
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Data source",
                                 "type": "datasource", "query": "prometheus"}]},
        "panels": panels,
    }


def expressions(spec: files.DeploySpec) -> list[str]:
    """Every PromQL expression the rules and the dashboard hold."""
    return ([r["expr"] for g in alert_rules(spec)["groups"] for r in g["rules"]]
            + [t["expr"] for p in dashboard()["panels"] for t in p["targets"]])


# -- files -------------------------------------------------------------------------------------


def _json(data: Any) -> str:
    return json.dumps(data, indent=2) + "\n"


def monitoring_files(spec: files.DeploySpec, target: str) -> dict[str, str]:
    head = files.header(target, spec)
    out = {
        "monitoring/prometheus.yml": files.dump_yaml([prometheus_config(spec, target)], head),
        "monitoring/alerts.yml": files.dump_yaml([alert_rules(spec)], head),
        "monitoring/farm-dashboard.json": _json(dashboard()),
    }
    if target == "compose":
        datasource = {"apiVersion": 1, "datasources": [{
            "name": "Prometheus", "type": "prometheus", "uid": DATASOURCE_UID,
            "access": "proxy", "url": "http://prometheus:9090", "isDefault": True}]}
        provider = {"apiVersion": 1, "providers": [{
            "name": "farm", "type": "file", "disableDeletion": True,
            "options": {"path": "/var/lib/grafana/dashboards"}}]}
        out["monitoring/grafana/datasources/prometheus.yml"] = files.dump_yaml([datasource], head)
        out["monitoring/grafana/dashboards/farm.yml"] = files.dump_yaml([provider], head)
    return out


def compose_services(spec: files.DeploySpec, broker_url: str,
                     secret: Any) -> dict[str, dict[str, Any]]:
    """The exporter, Prometheus and Grafana services. `broker_url` is the exporter's Redis URL,
    `secret(var)` compose's reference to a variable .env must set."""
    return {
        EXPORTER_SERVICE: {
            "image": spec.control_image,
            "command": exporter_args(spec),
            "environment": {**spec.settings_env, "FARM_BROKER_URL": broker_url},
            "depends_on": {"redis": {"condition": "service_healthy"}},
            "restart": "unless-stopped",
        },
        "prometheus": {
            "image": PROMETHEUS_IMAGE,
            "command": ["--config.file=/etc/prometheus/prometheus.yml",
                        "--storage.tsdb.path=/prometheus",
                        "--storage.tsdb.retention.time=30d"],
            "volumes": ["./monitoring/prometheus.yml:/etc/prometheus/prometheus.yml:ro",
                        "./monitoring/alerts.yml:/etc/prometheus/alerts.yml:ro",
                        "prometheus-data:/prometheus"],
            "ports": ["127.0.0.1:9090:9090"],
            "depends_on": [EXPORTER_SERVICE],
            "restart": "unless-stopped",
        },
        "grafana": {
            "image": GRAFANA_IMAGE,
            "environment": {"GF_SECURITY_ADMIN_PASSWORD": secret("GRAFANA_ADMIN_PASSWORD"),
                            "GF_USERS_ALLOW_SIGN_UP": "false",
                            "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH":
                                "/var/lib/grafana/dashboards/farm.json"},
            "volumes": ["./monitoring/grafana:/etc/grafana/provisioning:ro",
                        "./monitoring/farm-dashboard.json:/var/lib/grafana/dashboards/"
                        "farm.json:ro",
                        "grafana-data:/var/lib/grafana"],
            "ports": ["127.0.0.1:3000:3000"],
            "depends_on": ["prometheus"],
            "restart": "unless-stopped",
        },
    }


def exporter_deployment(spec: files.DeploySpec, meta: dict[str, Any], env: list[Any],
                        config_map: str, uid: int) -> dict[str, Any]:
    """The exporter as a Kubernetes Deployment of one pod, annotated for scraping. `env` holds
    its FARM_BROKER_URL (and the password it refers to); `config_map` the shared settings."""
    labels = {"app.kubernetes.io/name": EXPORTER}
    container = {
        "name": "metrics", "image": spec.control_image, "args": exporter_args(spec),
        "envFrom": [{"configMapRef": {"name": config_map}}], "env": env,
        "ports": [{"containerPort": EXPORTER_PORT, "name": "metrics"}],
        "readinessProbe": {"httpGet": {"path": "/metrics", "port": "metrics"},
                           "periodSeconds": 15},
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"},
                      "limits": {"memory": "256Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    pod = {"securityContext": {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid},
           "containers": [container]}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {**meta, "labels": {**meta.get("labels", {}), **labels}},
            "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels,
                                               "annotations": scrape_annotations(EXPORTER_PORT)},
                                  "spec": pod}}}
