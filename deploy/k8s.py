"""Kubernetes + KEDA: a Deployment and a ScaledObject per VRAM class, scaling each class with
its own backlog and down to zero when idle.

Why each piece looks as it does:
- A KEDA `redis` trigger reads one list, and a class's stages wait in one list per (route,
  priority) (farm/queues.py), so a class has one trigger per list, and a scalingModifiers
  formula sums them: with several triggers the HPA would otherwise take the largest one, not
  the backlog. Running stages are in no list, so a class scales in while its workers still
  render; the grace period (above the hard time limit) and the pre-stop drain cover that.
- Nodes are chosen by GPU memory (the GPU feature discovery label), by the worker's own rule of
  which class a card belongs to (deploy/gpus.py).
- Ready means warm: the readiness probe checks the file the worker creates once its pipelines
  are loaded and warmed (FARM_READY_FILE).
"""

from __future__ import annotations

import re
from typing import Any

from farm.deploy import access, files, gpus, monitoring

CONFIG = "farm-config"
SECRETS = "farm-secrets"
REDIS = "farm-redis"
TRIGGER_AUTH = "farm-redis-scaler"
# how many waiting stages one worker is expected to work off before another is started: a new
# GPU worker costs minutes (node, image, weights, warm-up), so not one per waiting stage
BACKLOG_PER_WORKER = 2
# scale in at most one worker a minute, after five quiet minutes
SCALE_DOWN = {"stabilizationWindowSeconds": 300,
              "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]}
# the pre-stop drain: SIGTERM to PID 1 (tini, the image's entrypoint, which passes it to the
# worker); the worker stops taking work and finishes its stage, and the hook returns once it has
# exited. Kubernetes' own SIGTERM follows the hook and finds nothing left to stop.
DRAIN = "kill -TERM 1; while kill -0 1 2>/dev/null; do sleep 1; done"
WORKER_UID = 10001
# Pod requests sized for the smallest GPU nodes the clouds sell: 4 vCPU / 16 GiB (AWS
# g4dn.xlarge T4, g5.xlarge A10G, g6.xlarge L4; GCP g2-standard-4 L4). Allocatable is less than
# that: the kubelet and system reserve (~0.1 CPU, ~1-2.5 GiB), eviction threshold and the GPU
# daemonsets (device plugin, feature discovery, exporters) take their share, so a worker asks
# for 3 CPU and 12 GiB. Cards above 24 GB come on larger nodes (the smallest, AWS g6e.xlarge
# L40S: 4 vCPU / 32 GiB), where a worker asks for 24 GiB. Requests are what the scheduler
# reserves, not limits: a worker loading weights may use more memory for a while.
WORKER_CPU = "3"
WORKER_MEMORY = "12Gi"
LARGE_WORKER_MEMORY = "24Gi"
SMALL_NODE_CLASS = 24                   # the largest class whose cards come on 16 GiB nodes
STORE_PLACEHOLDER = "s3://CHANGE-ME-bucket/farm"   # when FARM_STORE_URL was not set
# The order that applies to an empty cluster: the namespace (00-config.yaml) before anything in
# it, the Secret before the pods that read it, then the rest in file order (`-f .` applies a
# folder's .yaml files by name and leaves secrets/ and policies/ out).
APPLY_STEPS = ("kubectl apply -f 00-config.yaml", "kubectl apply -f secrets/",
               "kubectl apply -f .")


def _meta(spec: files.DeploySpec, name: str, **labels: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": spec.namespace}
    meta["labels"] = {"app.kubernetes.io/part-of": "farm", **labels}
    return meta


def redis_address(spec: files.DeploySpec) -> str:
    return spec.redis_address or f"{REDIS}.{spec.namespace}.svc.cluster.local:6379"


# a rediss:// Redis with --redis-ca: the CA certificate, from the Secret, as a file in each pod
# that talks to Redis (FARM_BROKER_CA_FILE), and as KEDA's `ca` parameter
CA_KEY = "REDIS_CA"
CA_DIR = "/etc/farm/redis-ca"
CA_FILE = f"{CA_DIR}/ca.pem"


def broker_env(spec: files.DeploySpec, role: str) -> list[dict[str, Any]]:
    """A pod's FARM_BROKER_URL as `role`, with the password it refers to and, for a TLS Redis
    with its own CA, FARM_BROKER_CA_FILE."""
    var = access.REDIS_PASSWORD_VARS[role]
    env = [_secret_env(var), {"name": "FARM_BROKER_URL", "value": access.broker_url(
        role, redis_address(spec), f"$({var})", tls=spec.redis_tls)}]
    if spec.redis_ca is not None:
        env.append({"name": "FARM_BROKER_CA_FILE", "value": CA_FILE})
    return env


def with_ca(spec: files.DeploySpec, pod: dict[str, Any]) -> dict[str, Any]:
    """The pod with the CA certificate mounted in each container, when there is one."""
    if spec.redis_ca is None:
        return pod
    volume = {"name": "redis-ca", "secret": {"secretName": SECRETS, "items": [
        {"key": CA_KEY, "path": CA_FILE.rsplit("/", 1)[1]}]}}
    mount = {"name": "redis-ca", "mountPath": CA_DIR, "readOnly": True}
    containers = [{**c, "volumeMounts": [*c.get("volumeMounts", []), mount]}
                  for c in pod["containers"]]
    return {**pod, "containers": containers, "volumes": [*pod.get("volumes", []), volume]}


def _secret_env(name: str, key: str | None = None) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": SECRETS, "key": key or name}}}


def config(spec: files.DeploySpec) -> list[dict[str, Any]]:
    data = {**spec.settings_env, "FARM_STORE_URL": spec.store_url or STORE_PLACEHOLDER}
    if spec.s3_endpoint_url:
        data["FARM_S3_ENDPOINT_URL"] = spec.s3_endpoint_url
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": spec.namespace}},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(spec, CONFIG),
             "data": data}]


def secret(spec: files.DeploySpec) -> dict[str, Any]:
    """The Secret, with placeholders: fill in before applying (or create it with kubectl)."""
    values = {var: "CHANGE-ME" for var in access.REDIS_PASSWORD_VARS.values()}
    values["REDIS_SCALER_USERNAME"] = access.REDIS_USERS["scaler"]
    values.update({"AWS_ACCESS_KEY_ID": "CHANGE-ME", "AWS_SECRET_ACCESS_KEY": "CHANGE-ME"})
    if spec.redis_ca is not None:
        values[CA_KEY] = spec.redis_ca     # a certificate: public, kept beside what uses it
    return {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(spec, SECRETS),
            "type": "Opaque", "stringData": values}


def redis(spec: files.DeploySpec) -> list[dict[str, Any]]:
    """An in-cluster Valkey with a persistent volume and the farm's ACL users."""
    labels = {"app.kubernetes.io/name": REDIS}
    args = access.redis_server_args(lambda var: f"$({var})")
    probe = {"exec": {"command": ["sh", "-c", "valkey-cli --no-auth-warning --user farm-scaler "
                                  "--pass \"$REDIS_SCALER_PASSWORD\" ping | grep -q PONG"]},
             "periodSeconds": 5}
    pod = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 999, "fsGroup": 999},
        "containers": [{
            "name": "valkey", "image": files.REDIS_IMAGE,
            "command": ["valkey-server"], "args": ["--dir", "/data", *args],
            "env": [_secret_env(var) for var in access.REDIS_PASSWORD_VARS.values()],
            "ports": [{"containerPort": 6379, "name": "redis"}],
            "readinessProbe": probe,
            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
        }],
    }
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(spec, REDIS, **labels),
         "spec": {"selector": labels, "ports": [{"port": 6379, "targetPort": "redis",
                                                 "name": "redis"}]}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(spec, REDIS, **labels),
         "spec": {"serviceName": REDIS, "replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": pod},
                  "volumeClaimTemplates": [{
                      "metadata": {"name": "data"},
                      "spec": {"accessModes": ["ReadWriteOnce"],
                               "resources": {"requests": {"storage": "10Gi"}}}}]}},
    ]


def deployment(spec: files.DeploySpec, vram_class: int) -> dict[str, Any]:
    name = files.worker_name(vram_class)
    labels = {"app.kubernetes.io/name": "farm-worker", "app.kubernetes.io/instance": name}
    shared = set(spec.settings_env)
    env = [{"name": k, "value": v} for k, v in files.worker_env(spec, vram_class).items()
           if k not in shared]
    env += [*broker_env(spec, "worker"),
            _secret_env("AWS_ACCESS_KEY_ID"), _secret_env("AWS_SECRET_ACCESS_KEY")]
    memory = WORKER_MEMORY if vram_class <= SMALL_NODE_CLASS else LARGE_WORKER_MEMORY
    container = {
        "name": "worker", "image": spec.image, "args": files.worker_args(spec),
        "envFrom": [{"configMapRef": {"name": CONFIG}}], "env": env,
        "ports": [{"containerPort": files.METRICS_PORT, "name": "metrics"}],
        "resources": {"requests": {"cpu": WORKER_CPU, "memory": memory},
                      "limits": {"nvidia.com/gpu": 1}},
        # ready only once loaded and warm; no restarts from it, so no liveness on the same file
        "readinessProbe": {"exec": {"command": ["sh", "-c", 'test -f "$FARM_READY_FILE"']},
                           "periodSeconds": 5, "failureThreshold": 1},
        "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", DRAIN]}}},
        "volumeMounts": [{"name": "models", "mountPath": files.MODEL_CACHE}],
        "securityContext": {"allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
    }
    pod = {
        "terminationGracePeriodSeconds": spec.grace_seconds,
        "affinity": {"nodeAffinity": gpus.node_affinity(vram_class, spec.classes)},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": WORKER_UID,
                            "runAsGroup": WORKER_UID, "fsGroup": WORKER_UID},
        "containers": [container],
        # each pod pulls its weights from the farm's store (the catalog, README "Models"), in
        # parallel ranged GETs; a ReadWriteMany claim here shares them between pods
        "volumes": [{"name": "models", "emptyDir": {"sizeLimit": "60Gi"}}],
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _meta(spec, name, **labels),
            # 0 at first: no GPU pod starts before KEDA sees waiting work; KEDA owns the count
            # from then on (applying the file again sets it to 0 until KEDA's next poll)
            "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                     "strategy": {"type": "RollingUpdate",
                                  "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
                     "template": {"metadata": {
                         "labels": labels,
                         "annotations": monitoring.scrape_annotations(files.METRICS_PORT)},
                         "spec": with_ca(spec, pod)}}}


def metrics_exporter(spec: files.DeploySpec) -> dict[str, Any]:
    """`farm metrics serve` (deploy/monitoring.py), with its own Redis user."""
    env = broker_env(spec, monitoring.exporter_role())
    out = monitoring.exporter_deployment(spec, _meta(spec, monitoring.EXPORTER), env, CONFIG,
                                         WORKER_UID)
    template = out["spec"]["template"]
    template["spec"] = with_ca(spec, template["spec"])
    return out


def trigger_name(list_name: str) -> str:
    """A name the scalingModifiers formula can use: letters, digits and underscores."""
    name = re.sub(r"[^a-z0-9]+", "_", list_name.lower()).strip("_")
    return name if name[:1].isalpha() else f"q_{name}"


def scaled_object(spec: files.DeploySpec, vram_class: int) -> dict[str, Any]:
    name = files.worker_name(vram_class)
    lists = files.class_lists(spec, vram_class)
    names = [trigger_name(n) for n in lists]
    if len(set(names)) != len(names):
        names = [f"{n}_{i}" for i, n in enumerate(names)]
    triggers = [{"type": "redis", "name": trigger,
                 "metadata": {"address": redis_address(spec), "listName": list_name,
                              "listLength": str(BACKLOG_PER_WORKER),
                              "activationListLength": "0", "databaseIndex": "0",
                              **({"enableTLS": "true"} if spec.redis_tls else {})},
                 "authenticationRef": {"name": TRIGGER_AUTH}}
                for trigger, list_name in zip(names, lists, strict=True)]
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": _meta(spec, name),
        "spec": {
            "scaleTargetRef": {"name": name},
            "minReplicaCount": 0,            # no waiting stage of this class: no GPU held
            "maxReplicaCount": spec.max_replicas,
            "pollingInterval": 10,
            "cooldownPeriod": 300,
            "advanced": {
                "horizontalPodAutoscalerConfig": {"behavior": {"scaleDown": SCALE_DOWN}},
                # the class's backlog is the sum of its lists
                "scalingModifiers": {"formula": " + ".join(names),
                                     "target": str(BACKLOG_PER_WORKER),
                                     "activationTarget": "0", "metricType": "AverageValue"},
            },
            "triggers": triggers,
        },
    }


def trigger_auth(spec: files.DeploySpec) -> dict[str, Any]:
    refs = [{"parameter": "username", "name": SECRETS, "key": "REDIS_SCALER_USERNAME"},
            {"parameter": "password", "name": SECRETS,
             "key": access.REDIS_PASSWORD_VARS["scaler"]}]
    if spec.redis_ca is not None:   # KEDA verifies the server against this CA (its `ca`)
        refs.append({"parameter": "ca", "name": SECRETS, "key": CA_KEY})
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "TriggerAuthentication",
            "metadata": _meta(spec, TRIGGER_AUTH), "spec": {"secretTargetRef": refs}}


def render(spec: files.DeploySpec) -> dict[str, str]:
    gpus.check_classes(spec.classes)
    head = files.header("k8s", spec)
    out = {"00-config.yaml": files.dump_yaml(config(spec), head)}
    if spec.redis_address is None:
        out["10-redis.yaml"] = files.dump_yaml(redis(spec), head)
    out["20-keda-auth.yaml"] = files.dump_yaml([trigger_auth(spec)], head)
    for c in spec.classes:
        out[f"30-worker-{c}gb.yaml"] = files.dump_yaml(
            [deployment(spec, c), scaled_object(spec, c)], head)
    out["40-metrics.yaml"] = files.dump_yaml([metrics_exporter(spec)], head)
    out["farm.env"] = files.farm_env_file(spec)
    out.update(files.store_policy_files(spec))
    # for the cluster's own Prometheus and Grafana; not applied with the folder
    out.update(monitoring.monitoring_files(spec, "k8s"))
    # not applied with the directory: fill it in first, or create the Secret with kubectl
    out["secrets/farm-secrets.yaml"] = files.dump_yaml(
        [secret(spec)], head + "# Replace every CHANGE-ME (hex passwords), then apply this first.\n")
    return out
