"""The files `farm deploy` writes, checked by the tools that will read them, not by our idea of
them: Kubernetes' own OpenAPI schemas (kubernetes-validate, strict: an unknown field fails),
KEDA's CRD schemas and the Compose Specification schema (vendored under tests/data/, versions in
their READMEs, checked with jsonschema; the CRDs' CEL rules with a CEL implementation), and
SkyPilot's own task loader (`sky.Task.from_yaml`).

None of them needs a cluster, a Docker engine or a cloud. Each validator is required: a missing
one fails these tests, it does not skip them. SkyPilot runs in its own environment
(`make test` builds .venv-skypilot): skypilot requires click<8.2, the farm pins click 8.5.
"""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import cel
import jsonschema
import kubernetes_validate
import pytest
import yaml

from farm.deploy import compose as deploy_compose
from farm.deploy import files as deploy
from farm.deploy import k8s as deploy_k8s
from farm.deploy import skypilot as deploy_skypilot
from farm.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
SKYPILOT_PYTHON = ROOT / ".venv-skypilot" / "bin" / "python"

# The two newest Kubernetes releases kubernetes-validate 1.37.0 ships schemas for (it has
# 1.14 ... 1.37), and the one before, which managed clusters still run.
K8S_VERSIONS = ("1.35.0", "1.36.0", "1.37.0")
KEDA_CRDS = {"ScaledObject": "keda.sh_scaledobjects.yaml",
             "TriggerAuthentication": "keda.sh_triggerauthentications.yaml"}

# (classes, models, --redis, store): the combinations a user passes
COMBOS = [
    ((24,), ("sdxl-base",), None, "s3://renders/farm"),
    ((12, 24, 80), ("sdxl-base", "sdxl-refiner"), "redis.example.com:6379", None),
    ((8, 24), ("tiny-sdxl", "tiny-sdxl-refiner", "sdxl-base"), None, "s3://renders"),
    ((16, 24, 48, 80), ("sdxl-refiner",), "10.0.0.5:6380", "s3://renders/farm"),
    ((24, 80), ("sdxl-base",), "rediss://redis.example.com:6380", "s3://renders/farm"),
]
IDS = ["-".join(map(str, c[0])) + ("-ext-redis" if c[2] else "") for c in COMBOS]


def make(classes: tuple[int, ...], names: tuple[str, ...], redis: str | None,
         store: str | None, **kw: Any) -> deploy.DeploySpec:
    env = {"FARM_STORE_URL": store} if store else {}
    if redis and redis.startswith("rediss://"):   # TLS with a CA of its own (--redis-ca)
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as ca:
            ca.write("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
        kw = {**kw, "redis_ca": Path(ca.name)}
    return deploy.make_spec(Settings.load(env=env), classes=classes, model_names=names,
                            redis_address=redis, **kw)


def yaml_docs(files: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    return [(path, doc) for path, text in files.items() if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc is not None]


# -- Kubernetes ---------------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """The CRD schema as the API server applies it to `kubectl apply` (field validation Strict,
    kubectl's default): a field the schema does not name is an error, unless the schema says
    x-kubernetes-preserve-unknown-fields or gives additionalProperties."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def keda_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((DATA / "keda" / KEDA_CRDS[kind]).read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    assert version["name"] == "v1alpha1"
    return dict(version["schema"]["openAPIV3Schema"])


def keda_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = _strict(copy.deepcopy(keda_schema(kind)))
    # ObjectMeta is checked by the API server itself, not by the CRD: by Kubernetes' schema here
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def cel_rules(schema: dict[str, Any], value: Any, where: str = "") -> list[str]:
    """The CRD's x-kubernetes-validations (CEL) rules that `value` breaks, evaluated with a CEL
    implementation at the node each is declared on, as the API server does on create (rules on
    `oldSelf` apply to updates only)."""
    broken = []
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" not in rule["rule"] and not cel.evaluate(rule["rule"], {"self": value}):
            broken.append(f"{where or '/'}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                broken += cel_rules(sub, item, f"{where}/{key}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            broken += cel_rules(schema["items"], item, f"{where}/{i}")
    return broken


def check_keda(doc: dict[str, Any]) -> None:
    errors = sorted(keda_validator(doc["kind"]).iter_errors(doc), key=str)
    assert not errors, [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    broken = cel_rules(keda_schema(doc["kind"]), doc)
    assert not broken, broken


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_kubernetes_files_pass_kubernetes_and_keda_schemas(combo: tuple[Any, ...]) -> None:
    files = deploy_k8s.render(make(*combo))
    kinds, names = [], []
    for path, doc in yaml_docs(files):
        kinds.append(doc["kind"])
        names.append(doc["metadata"]["name"])
        if doc["apiVersion"].startswith("keda.sh/"):
            check_keda(doc)
            # ... and its metadata as Kubernetes checks any object's
            meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
            kubernetes_validate.validate(meta, K8S_VERSIONS[-1], strict=True)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = "/".join(map(str, exc.path))
                pytest.fail(f"{path}: {doc['kind']} fails Kubernetes {version} at {where}: "
                            f"{exc.message}")
    expected = {"Namespace", "ConfigMap", "Secret", "Deployment", "ScaledObject",
                "TriggerAuthentication"}
    if combo[2] is None:
        expected |= {"Service", "StatefulSet"}
    assert expected <= set(kinds)
    workers = [n for k, n in zip(kinds, names, strict=True)
               if k == "Deployment" and n.startswith("farm-worker-")]
    assert len(workers) == kinds.count("ScaledObject") == len(combo[0])


def test_the_validators_catch_what_they_are_here_for() -> None:
    """A misspelt field fails each of them: they are strict, not merely parsing."""
    files = deploy_k8s.render(make(*COMBOS[0]))
    docs = {d["kind"]: d for _, d in yaml_docs(files)
            if d["metadata"]["name"].startswith("farm-worker-") or d["kind"] != "Deployment"}
    bad = copy.deepcopy(docs["Deployment"])
    bad["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)
    scaled = copy.deepcopy(docs["ScaledObject"])
    scaled["spec"]["triggers"][0]["authRef"] = scaled["spec"]["triggers"][0]["authenticationRef"]
    with pytest.raises(AssertionError, match="authRef"):
        check_keda(scaled)
    scaled = copy.deepcopy(docs["ScaledObject"])
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 2   # KEDA wants strings there
    with pytest.raises(AssertionError):
        check_keda(scaled)
    scaled = copy.deepcopy(docs["ScaledObject"])
    scaled["spec"]["minReplicaCount"] = scaled["spec"]["maxReplicaCount"] + 1
    with pytest.raises(AssertionError, match="minReplicaCount must be less than or equal"):
        check_keda(scaled)
    compose = yaml.safe_load(deploy_compose.render(make(*COMBOS[0]))["compose.yaml"])
    compose["services"]["redis"]["healthcheck"]["intervall"] = "5s"
    assert list(compose_validator().iter_errors(compose))


# -- compose ------------------------------------------------------------------------------------


def compose_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((DATA / "compose" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_compose_file_passes_the_compose_specification(combo: tuple[Any, ...]) -> None:
    (doc,) = [d for _, d in yaml_docs(deploy_compose.render(make(*combo)))]
    errors = sorted(compose_validator().iter_errors(doc), key=str)
    assert not errors, [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    assert {f"worker-{c}gb" for c in combo[0]} <= set(doc["services"])


# -- SkyPilot -----------------------------------------------------------------------------------

# Loads each task with SkyPilot's loader and reports what SkyPilot made of it. The environment
# overrides are what `sky jobs launch --env NAME=VALUE` passes to the same loader.
LOAD = r"""
import json, sys
import sky
import yaml
from sky import task as task_lib

results = []
for path, overrides in json.loads(sys.argv[1]):
    try:
        if overrides:
            config = yaml.safe_load(open(path))
            task = task_lib.Task.from_yaml_config(config, env_overrides=list(overrides.items()))
        else:
            task = sky.Task.from_yaml(path)
    except Exception as exc:
        results.append({"path": path, "error": f"{type(exc).__name__}: {exc}"})
        continue
    results.append({
        "path": path, "name": task.name, "run": task.run, "setup": task.setup,
        "workdir": task.workdir, "envs": task.envs,
        "resources": sorted(
            [{"accelerators": r.accelerators, "use_spot": r.use_spot,
              "image_id": r.image_id, "disk_size": r.disk_size} for r in task.resources],
            key=lambda r: sorted(r["accelerators"])),
    })
print(json.dumps(results, default=str))
"""


def sky_load(paths: list[tuple[Path, dict[str, str]]], home: Path) -> list[dict[str, Any]]:
    assert SKYPILOT_PYTHON.exists(), (
        f"{SKYPILOT_PYTHON} is missing: `make .venv-skypilot/.installed` builds it")
    result = subprocess.run(
        [str(SKYPILOT_PYTHON), "-c", LOAD, json.dumps([(str(p), o) for p, o in paths])],
        capture_output=True, text=True, timeout=300, env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
        cwd=home)
    assert result.returncode == 0, result.stderr[-3000:]
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("image", [None, "registry.example.com/farm-worker:0.1.0"],
                         ids=["checkout", "image"])
def test_skypilot_tasks_load_with_skypilots_own_loader(image: str | None,
                                                        tmp_path: Path) -> None:
    paths: list[tuple[Path, dict[str, str]]] = []
    expected: dict[str, tuple[deploy.DeploySpec, int]] = {}
    for i, (classes, names, _, store) in enumerate(COMBOS):
        spec = make(classes, names, None, store, image=image)
        for path in deploy.write(deploy_skypilot.render(spec), tmp_path / str(i)):
            if path.suffix == ".yaml":
                # no store where the files were made: `--env FARM_STORE_URL=...` at launch
                paths.append((path, {} if store else {"FARM_STORE_URL": "s3://renders/farm"}))
                expected[str(path)] = (spec, int(path.stem.split("-")[1].removesuffix("gb")))
    home = tmp_path / "home"
    home.mkdir()
    for loaded in sky_load(paths, home):
        assert "error" not in loaded, loaded
        spec, vram_class = expected[loaded["path"]]
        task = deploy_skypilot.task(spec, vram_class)
        assert loaded["name"] == task["name"]
        assert [r["accelerators"] for r in loaded["resources"]] == [
            {name: 1} for name in sorted(task["resources"]["accelerators"])]
        assert all(r["use_spot"] and r["disk_size"] == 100 for r in loaded["resources"])
        assert loaded["envs"]["FARM_VRAM"] == str(vram_class)
        assert loaded["envs"]["FARM_STOP_GRACE"] == str(deploy_skypilot.STOP_GRACE)
        argv = shlex.split(loaded["run"])
        assert argv[argv.index("--vram") + 1] == str(vram_class)
        if image is None:
            assert loaded["workdir"] and "uv pip install" in loaded["setup"]
            continue
        # the image runs as a container task, as its own user: no image_id (runtime
        # environment), which would need a user SkyPilot can log in as with sudo
        assert all(r["image_id"] is None for r in loaded["resources"])
        assert loaded["workdir"] is None and loaded["setup"].split() == ["docker", "pull", image]
        assert argv[:4] == ["exec", "docker", "run", "--rm"] and image in argv
        passed = {argv[i + 1] for i, a in enumerate(argv[:argv.index(image)]) if a == "-e"}
        assert passed == set(loaded["envs"]) | set(deploy_skypilot.SECRETS)


def test_skypilot_refuses_a_task_whose_store_is_not_given(tmp_path: Path) -> None:
    spec = make((24,), ("sdxl-base",), None, None)
    (path,) = [p for p in deploy.write(deploy_skypilot.render(spec), tmp_path / "out")
               if p.suffix == ".yaml"]
    home = tmp_path / "home"
    home.mkdir()
    (loaded,) = sky_load([(path, {})], home)
    assert "FARM_STORE_URL" in loaded["error"]
