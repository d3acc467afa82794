"""Deployment files (`farm deploy`): they parse, they count exactly the Redis lists the scheduler
routes to, they match each VRAM class, and they wait for a draining worker.

No Redis, no torch, no Docker engine: the files are generated and read back. Every expectation
is derived from the scheduler itself (planning, routing, the worker's queue order), not copied.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from farm import models, queues, vram
from farm.cli.deploy import deploy as deploy_command
from farm.deploy import access as deploy_access
from farm.deploy import compose as deploy_compose
from farm.deploy import files as deploy
from farm.deploy import gpus as deploy_gpus
from farm.deploy import k8s as deploy_k8s
from farm.deploy import skypilot as deploy_skypilot
from farm.jobs import PRIORITY_MAX, PRIORITY_MIN, Job, JobSpec, job_id
from farm.keys import COMPILE_CACHE, manifest_key, record_key
from farm.scheduler.plan import plan
from farm.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
# every class has GPUs of its own (deploy/gpus.py): k8s and skypilot refuse one that has none
CLASS_SETS = [(8, 24), (12, 24, 80), (16, 24, 48, 80), (16,)]
MODEL_SETS = [("tiny-sdxl",), ("sdxl-base", "sdxl-refiner"),
              ("tiny-sdxl", "tiny-sdxl-refiner", "sdxl-base")]
CASES = list(itertools.product(CLASS_SETS, MODEL_SETS))


def make(classes: tuple[int, ...], names: tuple[str, ...], **kw: Any) -> deploy.DeploySpec:
    return deploy.make_spec(Settings.load(env={}), classes=classes, model_names=names, **kw)


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def by_kind(files: dict[str, str], kind: str) -> list[dict[str, Any]]:
    return [d for path, text in files.items() if path.endswith(".yaml")
            for d in docs(text) if d.get("kind") == kind]


def routed(classes: tuple[int, ...], names: tuple[str, ...]) -> dict[int, set[str]]:
    """Every queue the scheduler sends a stage of a served job to, by class: plan jobs of each
    served model at each class (min_vram) and priority, with every split policy, and take the
    queue of each stage they go through."""
    settings = Settings.load(env={}, vram_classes=classes)
    bases = [n for n in names if models.resolve(n).role == "base"]
    refiners = [n for n in names if models.resolve(n).role == "refiner"]
    found: dict[int, set[str]] = {c: set() for c in classes}

    def add(job: Job) -> None:
        found[job.stage_class].add(queues.stage_queue(job))

    def first_stage(fields: dict[str, Any]) -> Job:
        spec = JobSpec.from_dict(fields, settings)
        p = plan(spec, settings)
        return Job(id=job_id("b", 0), batch="b", index=0, spec=spec, vram_class=p.vram_class,
                   stage=p.first_stage, refiner_vram_class=p.refiner_vram_class)

    for c, priority in itertools.product(classes, range(PRIORITY_MIN, PRIORITY_MAX + 1)):
        fields = {"prompt": "a fox", "seed": 1, "priority": priority, "min_vram": c}
        for base in bases:
            add(first_stage({**fields, "model": base}))
        # a served refiner finishes the jobs of any base, served here or not
        for base, refiner, split in itertools.product(bases or [models.SDXL_BASE.name],
                                                      refiners, ("auto", "always", "never")):
            job = first_stage({**fields, "model": base, "refiner": refiner, "split": split})
            if base in names:
                add(job)                   # the base stage, or the pair on one worker
            if job.stage == "base":
                add(dataclasses.replace(job, stage="refiner"))
    return found


# -- KEDA counts exactly what the scheduler routes ---------------------------------------------


@pytest.mark.parametrize(("classes", "names"), CASES)
def test_keda_triggers_read_exactly_the_lists_the_scheduler_routes_to(
        classes: tuple[int, ...], names: tuple[str, ...]) -> None:
    spec = make(classes, names)
    files = deploy_k8s.render(spec)
    expected = routed(classes, names)
    objects = {so["spec"]["scaleTargetRef"]["name"]: so for so in by_kind(files, "ScaledObject")}
    assert set(objects) == {deploy.worker_name(c) for c in classes}
    for c in classes:
        so = objects[deploy.worker_name(c)]
        triggers = so["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"redis"}
        lists = [t["metadata"]["listName"] for t in triggers]
        assert len(lists) == len(set(lists))
        routed_lists = {name for q in expected[c] for name in queues.redis_lists(q)}
        # every list counted is one the scheduler routes to, and none it routes to is missed
        assert set(lists) == routed_lists
        # ... and it is what a worker of this class consumes at its own class
        own = [q for q in queues.worker_queues(names, c, classes) if f".{c}gb." in q]
        assert set(lists) == {n for q in own for n in queues.redis_lists(q)}
        # the backlog is the sum of every list, not the largest one
        formula = so["spec"]["advanced"]["scalingModifiers"]["formula"]
        assert sorted(formula.split(" + ")) == sorted(t["name"] for t in triggers)
        assert all(re.fullmatch(r"[a-z][a-z0-9_]*", t["name"]) for t in triggers)


def test_every_priority_and_route_has_a_trigger() -> None:
    spec = make((8, 24), ("sdxl-base", "sdxl-refiner"))
    lists = set(deploy.class_lists(spec, 24))
    for route in ("sdxl-base", "sdxl-refiner", "sdxl-base+sdxl-refiner"):
        for p in queues.PRIORITIES:
            assert queues.queue_name(route, 24, p) in lists
    assert not any(".8gb." in name for name in lists)


def test_scaled_objects_scale_to_zero_up_to_max_replicas_with_the_secrets_password() -> None:
    spec = make((8, 24), ("sdxl-base",), max_replicas=7)
    files = deploy_k8s.render(spec)
    secret = by_kind(files, "Secret")[0]
    auth = by_kind(files, "TriggerAuthentication")[0]
    for so in by_kind(files, "ScaledObject"):
        assert so["spec"]["minReplicaCount"] == 0
        assert so["spec"]["maxReplicaCount"] == 7
        for t in so["spec"]["triggers"]:
            assert t["authenticationRef"]["name"] == auth["metadata"]["name"]
            assert t["metadata"]["address"] == deploy_k8s.redis_address(spec)
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"username", "password"}


# -- Kubernetes workers match their class ------------------------------------------------------


@pytest.mark.parametrize("classes", CLASS_SETS)
def test_deployments_request_one_gpu_of_their_class_and_are_ready_only_when_warm(
        classes: tuple[int, ...]) -> None:
    spec = make(classes, ("sdxl-base",), hard_limit=900)
    files = deploy_k8s.render(spec)
    config = by_kind(files, "ConfigMap")[0]["data"]
    deployments = {d["metadata"]["name"]: d for d in by_kind(files, "Deployment")}
    for c in classes:
        pod = deployments[deploy.worker_name(c)]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        env = {e["name"]: e.get("value") for e in container["env"]}
        # the environment is the farm's own settings of a worker of this class
        settings = Settings.load(env={**config, **{k: v for k, v in env.items() if v}})
        assert settings.vram == str(c) and settings.vram_classes == classes
        assert vram.profile_for(int(settings.vram)) == vram.profile_for(c)
        assert settings.ready_file == Path(deploy.READY_FILE)
        probe = container["readinessProbe"]["exec"]["command"]
        assert probe[:2] == ["sh", "-c"] and "test -f" in probe[2]
        assert "$FARM_READY_FILE" in probe[2]
        assert pod["terminationGracePeriodSeconds"] > 900
        drain = container["lifecycle"]["preStop"]["exec"]["command"][-1]
        assert "kill -TERM 1" in drain and "kill -0 1" in drain
        assert container["args"] == ["--model", "sdxl-base"]
        # no pod before KEDA sees work; KEDA owns the count from then on
        assert deployments[deploy.worker_name(c)]["spec"]["replicas"] == 0
        affinity = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        (term,) = affinity["nodeSelectorTerms"]
        for gpu in deploy_gpus.CLOUD_GPUS:
            selected = all(_matches(e, gpu.memory_mib) for e in term["matchExpressions"])
            assert selected == (deploy_gpus.class_of(gpu.memory_mib, classes) == c), gpu


def _matches(expression: dict[str, Any], memory_mib: int) -> bool:
    assert expression["key"] == "nvidia.com/gpu.memory"
    (value,) = expression["values"]
    return {"Gt": memory_mib > int(value), "Lt": memory_mib < int(value)}[expression["operator"]]


def test_gpu_classes_follow_the_workers_own_detection() -> None:
    classes = vram.DEFAULT_CLASSES
    for mib in range(1000, 150_000, 37):
        try:
            detected: int | None = vram.detect_class(mib * deploy_gpus.MIB, classes)
        except Exception:
            detected = None
        assert deploy_gpus.class_of(mib, classes) == detected, mib
    # the edge that a flat class * 1024 * 0.95 MiB gets wrong: an L4 is a 24 GB card
    assert deploy_gpus.class_of(23034, classes) == 24


def test_redis_in_the_cluster_is_persistent_and_skipped_for_an_external_one() -> None:
    files = deploy_k8s.render(make((8,), ("sdxl-base",)))
    (sts,) = by_kind(files, "StatefulSet")
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert sts["spec"]["volumeClaimTemplates"]
    external = deploy_k8s.render(make((8,), ("sdxl-base",), redis_address="redis.example:6379"))
    assert not by_kind(external, "StatefulSet")
    assert all(t["metadata"]["address"] == "redis.example:6379"
               for so in by_kind(external, "ScaledObject") for t in so["spec"]["triggers"])


# -- compose ---------------------------------------------------------------------------------


def _seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return int(match.group(1))


@pytest.mark.parametrize(("classes", "names"), CASES)
def test_compose_services_and_environment_are_complete(classes: tuple[int, ...],
                                                       names: tuple[str, ...]) -> None:
    spec = make(classes, names, hard_limit=1800)
    (doc,) = docs(deploy_compose.render(spec)["compose.yaml"])
    services = doc["services"]
    assert {"redis", "minio", "minio-init", "metrics", "prometheus", "grafana"} <= set(services)
    assert "flower" not in services
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1] \
        == "yes"
    bucket = deploy.DEFAULT_BUCKET
    init = services["minio-init"]
    assert f"mc mb --ignore-existing farm/{bucket}" in init["command"][0]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    workers = {name: s for name, s in services.items() if name.startswith("worker-")}
    assert set(workers) == {f"worker-{c}gb" for c in classes}
    for c in classes:
        service = workers[f"worker-{c}gb"]
        env = service["environment"]
        for key in ("FARM_BROKER_URL", "FARM_STORE_URL", "FARM_S3_ENDPOINT_URL", "FARM_VRAM",
                    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "FARM_READY_FILE", "HF_HOME"):
            assert env.get(key), key
        assert env["FARM_VRAM"] == str(c)
        assert env["FARM_STORE_URL"] == f"s3://{bucket}"
        assert env["FARM_BROKER_URL"].startswith("redis://farm-worker:")
        assert env["FARM_BROKER_URL"].endswith("@redis:6379/0")
        assert env["FARM_S3_ENDPOINT_URL"].startswith("http://minio:")
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert service["healthcheck"]["test"] == ["CMD", "test", "-f", env["FARM_READY_FILE"]]
        assert _seconds(service["stop_grace_period"]) > 1800
        # the worker is told the same grace period, so it finishes its stage (worker/drain.py)
        assert env["FARM_STOP_GRACE"] == str(_seconds(service["stop_grace_period"]))
        assert any(v.endswith(f":{env['HF_HOME'].rsplit('/', 1)[0]}")
                   for v in service["volumes"])
        # the models pulled from the store's catalog land on the same volume, within a budget
        assert env["FARM_MODEL_CACHE_DIR"].startswith(env["HF_HOME"].rsplit("/", 1)[0] + "/")
        assert 0 < float(env["FARM_MODEL_CACHE_GB"]) < 60
        assert service["command"] == deploy.worker_args(spec)
        settings = Settings.load(env={k: v for k, v in env.items() if "${" not in v})
        assert settings.vram_classes == classes and settings.vram == str(c)
    # everything a service references is defined: secrets in env.example, volumes at the top
    example = deploy_compose.env_example(spec)
    text = deploy_compose.render(spec)["compose.yaml"]
    for var in set(re.findall(r"\$\{([A-Z0-9_]+)", text)):
        assert re.search(rf"^{var}=", example, re.M), var
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                assert source in doc["volumes"]


# -- least privilege ---------------------------------------------------------------------------


def test_redis_acls_cover_every_routed_queue_and_nothing_else() -> None:
    spec = make(vram.DEFAULT_CLASSES, ("sdxl-base", "sdxl-refiner"))
    names = deploy.all_queues(spec)
    for role in ("worker", "cli"):
        patterns = [r[1:] for r in deploy_access.redis_rules(role) if r.startswith("~")]
        for name in names + ["farm:worker:host-cuda0-1"]:
            assert any(fnmatch.fnmatchcase(name, p) for p in patterns), (role, name)
        assert not any(fnmatch.fnmatchcase("sessions:42", p) for p in patterns)
    scaler = deploy_access.redis_rules("scaler")
    assert "+llen" in scaler and not any(r in scaler for r in ("+@write", "+@all"))
    line = deploy_access.redis_user_line("cli", "secret")
    assert line.startswith("user farm-cli on >secret ")


def test_s3_policies_allow_what_each_role_writes() -> None:
    worker = deploy_access.s3_policy("worker", "renders", "farm")
    cli = deploy_access.s3_policy("cli", "renders", "farm")

    def allowed(policy: dict[str, Any], action: str, key: str) -> bool:
        arn = f"arn:aws:s3:::renders/farm/{key}"
        return any(action in s["Action"] and any(fnmatch.fnmatchcase(arn, r)
                                                 for r in s["Resource"])
                   for s in policy["Statement"])

    assert allowed(cli, "s3:PutObject", manifest_key("20261129-151200-3fa9c1"))
    # `farm cancel` marks jobs canceled; images stay the workers' alone
    assert allowed(cli, "s3:PutObject", record_key("20261129-151200-3fa9c1", "j-0000"))
    assert not allowed(cli, "s3:PutObject", "batches/b/images/j-0000-0.png")
    assert allowed(worker, "s3:PutObject", record_key("20261129-151200-3fa9c1", "j-0000"))
    assert allowed(worker, "s3:DeleteObject", "batches/b/intermediate/j/latents.safetensors")
    assert not allowed(worker, "s3:PutObject", "elsewhere/x")
    assert allowed(worker, "s3:PutObject", f"{COMPILE_CACHE}/tiny-sdxl/abc.bin")
    assert not allowed(cli, "s3:PutObject", f"{COMPILE_CACHE}/tiny-sdxl/abc.bin")
    for policy, prefixes in ((worker, ["farm/batches/*", f"farm/{COMPILE_CACHE}/*"]),
                             (cli, ["farm/batches/*"])):
        listing = [s for s in policy["Statement"] if s["Action"] == ["s3:ListBucket"]]
        assert listing[0]["Condition"]["StringLike"]["s3:prefix"] == prefixes


# -- SkyPilot --------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", CLASS_SETS)
def test_skypilot_tasks_run_a_worker_of_their_class_on_spot_gpus(
        classes: tuple[int, ...]) -> None:
    spec = make(classes, ("sdxl-base",))
    files = deploy_skypilot.render(spec)
    for c in classes:
        (task,) = docs(files[f"worker-{c}gb.yaml"])
        resources = task["resources"]
        assert resources["use_spot"] is True
        gpus = {g.name: g for g in deploy_gpus.CLOUD_GPUS}
        assert resources["accelerators"] and set(resources["accelerators"].values()) == {1}
        for name in resources["accelerators"]:
            holds = deploy_gpus.class_of(gpus[name].memory_mib, classes)
            assert holds is not None and holds >= c       # every candidate can run the class
        exact = [g.name for g in gpus.values()
                 if deploy_gpus.class_of(g.memory_mib, classes) == c]
        if exact:
            assert sorted(resources["accelerators"]) == sorted(exact)
        argv = shlex.split(task["run"])
        assert argv[argv.index("--vram") + 1] == str(c)
        assert task["envs"]["FARM_VRAM"] == str(c)
        # spot: a short grace, so a stage that will not finish before power-off is handed back
        assert task["envs"]["FARM_STOP_GRACE"] == str(deploy.SPOT_STOP_GRACE)
        assert 0 < deploy.SPOT_STOP_GRACE < 30
        assert set(task["secrets"]) >= {"FARM_BROKER_URL", "AWS_SECRET_ACCESS_KEY"}
        assert "FARM_BROKER_URL" not in task["envs"]
        assert task["envs"]["FARM_STORE_URL"] is None      # required at launch when unset here


# -- images ------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _pip_installs(path: Path) -> list[list[str]]:
    installs = []
    for line in _instructions(path):
        if not line.startswith("RUN "):
            continue
        for part in re.split(r"&&|;|\bthen\b", line[4:]):
            words = shlex.split(part)
            if "pip" in words and "install" in words[words.index("pip"):]:
                installs.append(words[words.index("install") + 1:])
    return installs


DOCKERFILES = sorted((ROOT / "deploy").glob("*.Dockerfile"))


def test_there_are_the_three_images() -> None:
    assert {p.name for p in DOCKERFILES} >= {"worker.Dockerfile", "control.Dockerfile",
                                             "onediff-worker.Dockerfile"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_pin_every_version(path: Path) -> None:
    froms = [line.split()[1] for line in _instructions(path) if line.startswith("FROM ")]
    assert froms
    for image in froms:
        name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
        assert name and tag and tag != "latest" and "/" not in tag, image
    installs = _pip_installs(path)
    assert installs
    for args in installs:
        constrained = "-c" in args or "--constraint" in args
        skip = {"-c", "--constraint", "--index-url", "--extra-index-url", "-f"}
        packages = [a for i, a in enumerate(args)
                    if not a.startswith("-") and (i == 0 or args[i - 1] not in skip)]
        for package in packages:
            local = package.startswith(".")
            if local:
                assert constrained or "--no-deps" in args, args
            else:
                assert "==" in package or constrained, (path.name, package)
                assert "==" in package, (path.name, package)
    for args in installs:
        for name in (args[i + 1] for i, a in enumerate(args) if a in ("-c", "--constraint")):
            constraints = ROOT / "deploy" / name if name != "constraints.txt" else ROOT / name
            pins = [x.strip() for x in constraints.read_text().splitlines()
                    if x.strip() and not x.startswith("#")]
            assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\[\]-]+==\S+", p) for p in pins)


def test_worker_images_pin_torch_and_run_the_worker() -> None:
    for name, torch in (("worker.Dockerfile", "torch==2.13.0"),
                        ("onediff-worker.Dockerfile", "torch==2.4.0")):
        path = ROOT / "deploy" / name
        assert any(torch in args for args in _pip_installs(path))
        lines = _instructions(path)
        entry = [line for line in lines if line.startswith("ENTRYPOINT ")][-1]
        assert '"farm", "worker"' in entry
        assert any(line.startswith("USER ") and "root" not in line for line in lines)
        assert any(line.startswith("VOLUME ") and deploy.MODEL_CACHE in line for line in lines)
    onediff = (ROOT / "deploy" / "onediff-worker.Dockerfile").read_text()
    assert "onediff==1.2.0" in onediff and "onediffx==1.2.0" in onediff
    control = _pip_installs(ROOT / "deploy" / "control.Dockerfile")
    assert not any(a.startswith("torch") or "[worker]" in a for args in control for a in args)


# -- the command -------------------------------------------------------------------------------


@pytest.mark.parametrize("target", deploy.TARGETS)
def test_farm_deploy_writes_the_files(target: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("FARM_")]:
        monkeypatch.delenv(key)
    out = tmp_path / target
    result = CliRunner().invoke(deploy_command, [
        target, "--classes", "12,24,80", "--model", "sdxl-base", "--model", "sdxl-refiner",
        "--out", str(out), "--max-replicas", "3"])
    assert result.exit_code == 0, result.output
    written = [Path(line.split(" ", 1)[1]) for line in result.stdout.splitlines()
               if line.startswith("wrote ")]
    assert written and all(p.is_file() for p in written)
    assert {p.relative_to(out).as_posix() for p in written} == set(
        deploy.render(target, make((12, 24, 80), ("sdxl-base", "sdxl-refiner"),
                                   max_replicas=3)))
    for path in written:
        if path.suffix == ".yaml":
            assert docs(path.read_text())


@pytest.mark.parametrize(("args", "message"), [
    (["--classes", "8,x"], "--classes must be a comma-separated list"),
    (["--model", "https://example.com/model"], "not a URL"),
    (["--max-replicas", "0"], "--max-replicas must be at least 1"),
    (["--hard-limit", "90000"], "FARM_VISIBILITY_TIMEOUT (86400 s) must be above"),
    (["--redis", "nohost"], "--redis must be host:port"),
    (["--redis", "https://redis.example.com:6379"], "neither redis nor rediss"),
    (["--redis", "redis://farm:secret@redis.example.com:6379"], "takes no user or password"),
    (["--redis", "redis://redis.example.com:6379/3"], "use database 0"),
    (["--redis", "redis.example.com:99999"], "not a number from 1 to 65535"),
    (["--redis", "redis.example.com:6379", "--redis-ca", "ca.pem"], "--redis-ca is for a TLS"),
    (["--redis", "rediss://redis.example.com", "--redis-ca", "missing.pem"], "cannot read"),
])
def test_farm_deploy_refuses_bad_input(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(deploy_command, ["k8s", "--out", str(tmp_path), *args],
                                env={"FARM_VRAM_CLASSES": ""})
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("text", "address", "tls"), [
    ("redis.example.com:6380", "redis.example.com:6380", False),
    ("redis://redis.example.com", "redis.example.com:6379", False),
    ("redis://redis.example.com:6380/0", "redis.example.com:6380", False),
    ("rediss://redis.example.com:6380", "redis.example.com:6380", True),
    ("rediss://[fd00::5]:6380", "[fd00::5]:6380", True),
])
def test_redis_takes_an_address_or_a_redis_url(text: str, address: str, tls: bool) -> None:
    endpoint = deploy.parse_redis(text)
    assert (endpoint.address, endpoint.tls) == (address, tls)


def test_a_tls_redis_reaches_workers_exporter_and_keda_with_its_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    spec = dataclasses.replace(make((24,), ("sdxl-base",)), redis_address="r.example.com:6380",
                               redis_tls=True, redis_ca=ca.read_text())
    files = deploy_k8s.render(spec)
    assert "10-redis.yaml" not in files      # an existing Redis: none deployed
    for pod in by_kind(files, "Deployment"):
        (container,) = pod["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["FARM_BROKER_URL"].startswith("rediss://")
        assert env["FARM_BROKER_URL"].endswith("@r.example.com:6380/0")
        assert env["FARM_BROKER_CA_FILE"] == deploy_k8s.CA_FILE
        volumes = pod["spec"]["template"]["spec"]["volumes"]
        assert {"key": deploy_k8s.CA_KEY, "path": "ca.pem"} in [
            i for v in volumes if "secret" in v for i in v["secret"]["items"]]
    for obj in by_kind(files, "ScaledObject"):
        assert {t["metadata"]["enableTLS"] for t in obj["spec"]["triggers"]} == {"true"}
    (auth,) = by_kind(files, "TriggerAuthentication")
    assert {"parameter": "ca", "name": deploy_k8s.SECRETS, "key": deploy_k8s.CA_KEY} in \
        auth["spec"]["secretTargetRef"]
    (secret,) = by_kind(files, "Secret")
    assert secret["stringData"][deploy_k8s.CA_KEY] == ca.read_text()


def test_grace_periods_exceed_the_hard_limit() -> None:
    for hard in (60, deploy.DEFAULT_HARD_LIMIT, 3000):
        assert deploy.grace_seconds(hard) > hard
    spec = make((8,), ("sdxl-base",), hard_limit=3000)
    (pod_spec,) = [d["spec"]["template"]["spec"] for d in by_kind(deploy_k8s.render(spec),
                                                                    "Deployment")
                   if d["metadata"]["name"] == deploy.worker_name(8)]
    assert pod_spec["terminationGracePeriodSeconds"] == spec.grace_seconds > 3000
    # the worker is told the grace the pod gets (the pre-stop hook sends SIGTERM at its start)
    (container,) = pod_spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FARM_STOP_GRACE"] == str(pod_spec["terminationGracePeriodSeconds"])


def test_policies_are_written_for_the_store_the_workers_use() -> None:
    settings = Settings.load(env={"FARM_STORE_URL": "s3://my-renders/farm"})
    spec = deploy.make_spec(settings, classes=(24,))
    for target in ("k8s", "skypilot"):
        files = deploy.render(target, spec)
        worker = json.loads(files["policies/worker.json"])
        assert worker == deploy_access.s3_policy("worker", "my-renders", "farm")
    compose = deploy_compose.render(spec)
    init = docs(compose["compose.yaml"])[0]["services"]["minio-init"]["command"][0]
    for role in ("worker", "cli"):
        assert f"/policies/{role}.json" in init and f"policies/{role}.json" in compose
    # a file:// store is of no use to workers elsewhere: left to fill in, not guessed
    local = deploy.make_spec(Settings.load(env={"FARM_STORE_URL": "file:///tmp/store"}),
                             classes=(24,))
    assert local.store_url is None and "policies/worker.json" not in deploy.render("k8s", local)


def test_a_class_no_cloud_gpu_holds_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(deploy_command, ["skypilot", "--classes", "24,200",
                                                 "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no listed GPU holds 200 GB" in result.output
