"""docker compose: a whole farm on one GPU host (or a few, sharing its Redis and MinIO).

    redis        Valkey with append-only persistence and one ACL user per role
    minio        the object store; minio-init creates the bucket and a least-privilege user
                 for the workers and one for the CLI, then exits
    worker-<C>gb one per VRAM class, each reserving one NVIDIA GPU, serving /metrics
    metrics      `farm metrics serve`: queue depths, live workers, active batches
    prometheus   scrapes the workers and `metrics`, evaluates the alert rules
    grafana      the farm's dashboard (deploy/monitoring.py)
    farm         the CLI in the control image (`docker compose run --rm farm submit ...`)

No Flower: the workers send no Celery task events (each would cost Redis commands per stage),
so its task view would stay empty; the farm's own metrics and dashboard show the fleet.

Secrets come from `.env` beside compose.yaml (env.example lists them); compose refuses to start
while one is missing.
"""

from __future__ import annotations

from typing import Any

from farm.deploy import access, files, monitoring

# MinIO withdrew its public images from Docker Hub in 2025; these last releases were published on
# quay.io. Any S3-compatible store works instead: drop minio/minio-init, set FARM_STORE_URL.
MINIO_IMAGE = "quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z"
MC_IMAGE = "quay.io/minio/mc:RELEASE.2025-08-13T08-35-41Z"

S3_ENDPOINT = "http://minio:9000"
REDIS_HOST = "redis:6379"
GPU_VAR = "FARM_GPU_{c}GB"   # which GPU (nvidia-smi index) serves each class
# the Redis users compose creates: the workers', the CLI's, and the exporter's
ROLES = ("worker", "cli", monitoring.exporter_role())


def _secret(var: str) -> str:
    """A compose reference to a variable that must be set in .env."""
    return "${" + var + ":?set " + var + " in .env (see env.example)}"


def _redis_url(role: str) -> str:
    var = access.REDIS_PASSWORD_VARS[role]
    return access.broker_url(role, REDIS_HOST, "${" + var + "}")


def _s3_env(role: str) -> dict[str, str]:
    return {
        "FARM_STORE_URL": f"s3://{files.DEFAULT_BUCKET}",
        "FARM_S3_ENDPOINT_URL": S3_ENDPOINT,
        "AWS_ACCESS_KEY_ID": f"farm-{role}",
        "AWS_SECRET_ACCESS_KEY": _secret(f"S3_{role.upper()}_SECRET"),
    }


def worker_service(spec: files.DeploySpec, vram_class: int) -> dict[str, Any]:
    gpu = "${" + GPU_VAR.format(c=vram_class) + f":-{spec.classes.index(vram_class)}" + "}"
    return {
        "image": spec.image,
        "command": files.worker_args(spec),
        "environment": {
            **files.worker_env(spec, vram_class),
            "FARM_BROKER_URL": _redis_url("worker"),
            **_s3_env("worker"),
        },
        "volumes": [f"models:{files.MODEL_CACHE}"],
        "deploy": {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "device_ids": [gpu], "capabilities": ["gpu"]}]}}},
        # ready once loaded and warm: the worker creates FARM_READY_FILE then
        "healthcheck": {"test": ["CMD", "test", "-f", files.READY_FILE], "interval": "10s",
                        "timeout": "5s", "retries": 3,
                        # a first start pulls the weights (about 7 GB for SDXL base) from
                        # the store's catalog, or from the Hub when the catalog lacks them
                        "start_period": "30m"},
        # SIGTERM is a warm shutdown: wait past the hard limit (FARM_STOP_GRACE says the same
        # to the worker), so it finishes its stage
        "stop_signal": "SIGTERM",
        "stop_grace_period": f"{spec.grace_seconds}s",
        "depends_on": {"redis": {"condition": "service_healthy"},
                       "minio-init": {"condition": "service_completed_successfully"}},
        "restart": "unless-stopped",
    }


def compose(spec: files.DeploySpec) -> dict[str, Any]:
    redis_args = access.redis_server_args(_secret, roles=ROLES)
    cli_pass = "$${" + access.REDIS_PASSWORD_VARS["cli"] + "}"
    services: dict[str, Any] = {
        "redis": {
            "image": files.REDIS_IMAGE,
            "command": ["valkey-server", *redis_args],
            "environment": {"REDIS_CLI_PASSWORD": "${REDIS_CLI_PASSWORD}"},
            "volumes": ["redis-data:/data"],
            # the CLI on this host reaches it here; other hosts need TLS in front (README)
            "ports": ["127.0.0.1:6379:6379"],
            "healthcheck": {"test": ["CMD-SHELL", "valkey-cli --no-auth-warning --user "
                                     f"farm-cli --pass \"{cli_pass}\" ping | grep -q PONG"],
                            "interval": "5s", "timeout": "3s", "retries": 10},
            "restart": "unless-stopped",
        },
        "minio": {
            "image": MINIO_IMAGE,
            "command": ["server", "/data", "--console-address", ":9001"],
            "environment": {"MINIO_ROOT_USER": "farm-admin",
                            "MINIO_ROOT_PASSWORD": _secret("MINIO_ROOT_PASSWORD")},
            "volumes": ["minio-data:/data"],
            "ports": ["127.0.0.1:9000:9000", "127.0.0.1:9001:9001"],
            "healthcheck": {"test": ["CMD", "mc", "ready", "local"], "interval": "5s",
                            "timeout": "3s", "retries": 10},
            "restart": "unless-stopped",
        },
        "minio-init": {
            "image": MC_IMAGE,
            "entrypoint": ["/bin/sh", "-c"],
            "command": [minio_init_script()],
            "environment": {
                "MINIO_ROOT_PASSWORD": "${MINIO_ROOT_PASSWORD}",
                "S3_WORKER_SECRET": _secret("S3_WORKER_SECRET"),
                "S3_CLI_SECRET": _secret("S3_CLI_SECRET"),
            },
            "volumes": ["./policies:/policies:ro"],
            "depends_on": {"minio": {"condition": "service_healthy"}},
            "restart": "no",
        },
        "farm": {
            "image": spec.control_image,
            "profiles": ["cli"],
            "environment": {**spec.settings_env, "FARM_BROKER_URL": _redis_url("cli"),
                            **_s3_env("cli")},
            "volumes": ["./work:/work"],
            "working_dir": "/work",
            "depends_on": {"redis": {"condition": "service_healthy"},
                           "minio-init": {"condition": "service_completed_successfully"}},
        },
    }
    for c in spec.classes:
        services[f"worker-{c}gb"] = worker_service(spec, c)
    services.update(monitoring.compose_services(
        spec, _redis_url(monitoring.exporter_role()), _secret))
    return {"name": "farm", "services": services,
            "volumes": {"redis-data": {}, "minio-data": {}, "models": {}, "prometheus-data": {},
                        "grafana-data": {}}}


def minio_init_script() -> str:
    """Create the bucket and one user per role with its policy; safe to run again."""
    bucket = files.DEFAULT_BUCKET
    lines = [
        "set -e",
        'mc alias set farm http://minio:9000 farm-admin "$$MINIO_ROOT_PASSWORD"',
        f"mc mb --ignore-existing farm/{bucket}",
    ]
    for role in ("worker", "cli"):
        lines += [
            f"mc admin policy create farm farm-{role} /policies/{role}.json",
            f'mc admin user add farm farm-{role} "$$S3_{role.upper()}_SECRET"',
            # attaching an attached policy is an error: not one that matters on a rerun
            f"mc admin policy attach farm farm-{role} --user farm-{role} || true",
        ]
    return "\n".join(lines) + "\n"


def env_example(spec: files.DeploySpec) -> str:
    gpus = "".join(f"{GPU_VAR.format(c=c)}={i}\n" for i, c in enumerate(spec.classes))
    return (
        "# Copy to .env and replace every value. Passwords go into URLs: use hex\n"
        "# (openssl rand -hex 24), not characters such as @ : / that URLs reserve.\n"
        + "".join(f"{access.REDIS_PASSWORD_VARS[role]}=CHANGE-ME\n" for role in ROLES)
        + "MINIO_ROOT_PASSWORD=CHANGE-ME\nS3_WORKER_SECRET=CHANGE-ME\nS3_CLI_SECRET=CHANGE-ME\n"
        "GRAFANA_ADMIN_PASSWORD=CHANGE-ME\n"
        "# the GPU (index in nvidia-smi -L) that serves each VRAM class\n" + gpus)


def cli_env(spec: files.DeploySpec) -> str:
    """farm.env: what `farm submit/status/results` need on this host to use this farm."""
    env = {**spec.settings_env,
           "FARM_BROKER_URL": "redis://farm-cli:${REDIS_CLI_PASSWORD}@127.0.0.1:6379/0",
           "FARM_STORE_URL": f"s3://{files.DEFAULT_BUCKET}",
           "FARM_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
           "AWS_ACCESS_KEY_ID": "farm-cli", "AWS_SECRET_ACCESS_KEY": "${S3_CLI_SECRET}"}
    return files.env_file(env, "# set -a; . ./.env; . ./farm.env; set +a   (then: farm submit ...)\n")


def render(spec: files.DeploySpec) -> dict[str, str]:
    head = files.header("compose", spec)
    return {
        "compose.yaml": files.dump_yaml([compose(spec)], head),
        **files.policy_files(files.DEFAULT_BUCKET),
        **monitoring.monitoring_files(spec, "compose"),
        "env.example": env_example(spec),
        "farm.env": cli_env(spec),
    }
