"""Deployment files that fit real hardware and a real, empty cluster: every class either gets
GPUs of its own or is refused in one line, GPU pods fit the smallest GPU nodes, the printed
`kubectl apply` order creates the namespace first, what `farm deploy` prints about grace
periods is what the files set, and the images build from a small, pinned context."""

from __future__ import annotations

import fnmatch
import itertools
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from farm import vram
from farm.cli.deploy import deploy as deploy_command
from farm.deploy import files as deploy
from farm.deploy import gpus
from farm.deploy import k8s as deploy_k8s
from farm.deploy import skypilot as deploy_skypilot
from farm.errors import UsageError
from farm.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30

# what a user may pass to --classes: every single class, and sets from a grid of sizes
GRID = (1, 4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 120, 141, 160)
CLASS_SETS = sorted({(c,) for c in range(1, 161)}
                    | set(itertools.combinations(GRID, 2))
                    | set(itertools.combinations(GRID[::2], 3))
                    | {vram.DEFAULT_CLASSES, (8, 12, 24), (12, 24, 80), (16, 24, 48, 80)})


def make(classes: tuple[int, ...], **kw: Any) -> deploy.DeploySpec:
    return deploy.make_spec(Settings.load(env={}), classes=classes, model_names=("sdxl-base",),
                            **kw)


def selects(term: dict[str, Any], memory_mib: int) -> bool:
    """Whether a nodeSelectorTerm matches a node labelled with this much GPU memory."""
    ops = {"Gt": lambda v: memory_mib > int(v), "Lt": lambda v: memory_mib < int(v)}
    return all(e["key"] == gpus.GPU_MEMORY_LABEL and ops[e["operator"]](e["values"][0])
               for e in term["matchExpressions"])


def _docs(files: dict[str, str], kind: str) -> list[dict[str, Any]]:
    return [d for path, text in files.items() if path.endswith(".yaml")
            for d in yaml.safe_load_all(text) if d and d["kind"] == kind]


# -- classes fit real GPUs ---------------------------------------------------------------------


def test_the_table_holds_the_common_gpus() -> None:
    names = {g.name for g in gpus.GPUS}
    assert {"T4", "A10G", "L4", "L40S", "A100", "A100-80GB", "H100", "H200", "RTX3090",
            "RTX4090"} <= names
    assert len(names) == len(gpus.GPUS)
    assert all(g.memory_mib > 15_000 for g in gpus.GPUS)


def test_every_class_gets_gpus_of_its_own_or_is_refused_in_one_line() -> None:
    for classes in CLASS_SETS:
        spec = make(classes)
        for target, table in (("k8s", gpus.GPUS), ("skypilot", gpus.CLOUD_GPUS)):
            try:
                # what render() checks first (test_render_refuses_what_check_classes_refuses)
                gpus.check_classes(classes, table)
            except UsageError as exc:
                _check_refusal(classes, table, str(exc))
                continue
            if target == "skypilot":
                asked = {c: set(deploy_skypilot.task(spec, c)["resources"]["accelerators"])
                         for c in classes}
                for c in classes:
                    assert asked[c] == {g.name for g in gpus.cards_of(c, classes, table)}
                    assert asked[c], (classes, c)
                # every cloud GPU is asked for by the class its worker would declare
                for g in table:
                    could = [c for c in classes if g.memory_mib >= gpus.floor_mib(c)]
                    assert [c for c in classes if g.name in asked[c]] == could[-1:], (classes, g)
                continue
            terms = {c: deploy_k8s.deployment(spec, c)["spec"]["template"]["spec"]["affinity"]
                     ["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                     ["nodeSelectorTerms"][0] for c in classes}
            for c in classes:
                assert any(selects(terms[c], g.memory_mib) for g in table), (classes, c)
            # a GPU is never left out of every class it could serve: each that holds the
            # smallest class is selected by exactly one class, the one its worker would declare
            for g in table:
                chosen = [c for c in classes if selects(terms[c], g.memory_mib)]
                could = [c for c in classes if g.memory_mib >= gpus.floor_mib(c)]
                assert chosen == ([max(could)] if could else []), (classes, g)


def _check_refusal(classes: tuple[int, ...], table: tuple[gpus.GPU, ...], message: str) -> None:
    assert "\n" not in message and message.startswith(f"--classes {','.join(map(str, classes))}")
    empty = [c for c in classes if not gpus.cards_of(c, classes, table)]
    assert empty, classes
    # it names GPUs that could run the refused class's jobs, from the table
    named = [g for g in table if re.search(rf"(?<![\w-]){re.escape(g.name)}(?![\w-])", message)]
    if any(gpus.floor_mib(c) <= max(g.memory_mib for g in table) for c in empty):
        assert named and all(g.memory_mib >= gpus.floor_mib(min(empty)) for g in named), message


@pytest.mark.parametrize("classes", [(8, 12, 24), vram.DEFAULT_CLASSES, (24, 200)], ids=str)
@pytest.mark.parametrize("target", ["k8s", "skypilot"])
def test_render_refuses_what_check_classes_refuses(target: str, classes: tuple[int, ...]) -> None:
    with pytest.raises(UsageError) as refused:
        deploy.render(target, make(classes))
    _check_refusal(classes, gpus.GPUS if target == "k8s" else gpus.CLOUD_GPUS, str(refused.value))


def test_farm_deploy_refuses_a_class_without_gpus_saying_which_it_could_use(
        tmp_path: Path) -> None:
    result = CliRunner().invoke(deploy_command, ["k8s", "--classes", "8,12,24",
                                                 "--out", str(tmp_path)])
    assert result.exit_code == 2
    (line,) = [x for x in result.output.splitlines() if x]
    assert line.startswith("error: --classes 8,12,24: no listed GPU counts as 8 GB")
    assert "T4" in line and "leave 8 out of --classes" in line
    assert not list(tmp_path.iterdir())


# -- pods fit the nodes ---------------------------------------------------------------------------


def _quantity(text: str) -> float:
    units = {"Gi": GIB, "Mi": 2**20, "m": 1e-3, "": 1}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text).groups()  # type: ignore[union-attr]
    return float(number) * units[unit]


@pytest.mark.parametrize("classes", [(12, 24, 80), (16, 24, 48, 80), (8, 24)], ids=str)
def test_gpu_pods_fit_a_4_vcpu_16_gib_node_up_to_24_gb(classes: tuple[int, ...]) -> None:
    files = deploy_k8s.render(make(classes))
    workers = [d for d in _docs(files, "Deployment")
               if d["metadata"]["name"].startswith("farm-worker-")]
    assert len(workers) == len(classes)
    for d in workers:
        c = int(d["metadata"]["name"].removeprefix("farm-worker-").removesuffix("gb"))
        (container,) = d["spec"]["template"]["spec"]["containers"]
        requests = container["resources"]["requests"]
        # allocatable on a 4 vCPU / 16 GiB node, less kubelet, system and GPU daemonsets;
        # larger cards come on nodes of at least 4 vCPU / 32 GiB (g6e.xlarge)
        assert _quantity(requests["cpu"]) <= 3.5
        assert _quantity(requests["memory"]) <= (12 if c <= 24 else 28) * GIB
        assert d["spec"]["replicas"] == 0


# -- the printed order applies to an empty cluster --------------------------------------------


def kubectl_reads(out: Path, argument: str) -> list[Path]:
    """The files `kubectl apply -f ARG` reads, in order: a file, or a folder's .json, .yaml and
    .yml files (not its subfolders, without -R), by name."""
    path = out / argument
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir()
                  if p.is_file() and p.suffix in (".json", ".yaml", ".yml"))


@pytest.mark.parametrize("redis", [None, "redis.example.com:6379"])
def test_the_printed_apply_order_creates_the_namespace_before_anything_in_it(
        redis: str | None, tmp_path: Path) -> None:
    out = tmp_path / "k8s"
    result = CliRunner().invoke(deploy_command, ["k8s", "--classes", "12,24", "--out", str(out),
                                                 *(["--redis", redis] if redis else [])])
    assert result.exit_code == 0, result.output
    (step,) = [x for x in result.output.splitlines() if x.startswith("next: ")]
    commands = step.split(", then: ", 1)[1].split(" && ")
    assert commands == list(deploy_k8s.APPLY_STEPS)
    created: set[tuple[str, str | None, str]] = set()
    applied: list[Path] = []
    for command in commands:
        argv = shlex.split(command)
        assert argv[:2] == ["kubectl", "apply"] and argv[2] == "-f"
        for path in kubectl_reads(out, argv[3]):
            applied.append(path)
            for doc in yaml.safe_load_all(path.read_text()):
                if not doc:
                    continue
                namespace = doc["metadata"].get("namespace")
                if namespace is not None:
                    assert ("Namespace", None, namespace) in created, (path.name, doc["kind"])
                for ref in _refs(doc):
                    assert (ref[0], namespace, ref[1]) in created, (path.name, ref)
                created.add((doc["kind"], namespace, doc["metadata"]["name"]))
    # every manifest is applied (the folder's and the Secret), and nothing else is read as one
    assert set(applied) == {*out.glob("*.yaml"), *(out / "secrets").iterdir()}


def _refs(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """What an object names that must exist first for it to apply or start cleanly."""
    refs = []
    if doc["kind"] == "ScaledObject":
        refs += [("TriggerAuthentication", t["authenticationRef"]["name"])
                 for t in doc["spec"]["triggers"]]
        refs.append(("Deployment", doc["spec"]["scaleTargetRef"]["name"]))
    if doc["kind"] in ("Deployment", "StatefulSet"):
        text = yaml.safe_dump(doc["spec"]["template"])
        refs += [("Secret", n) for n in set(re.findall(r"secretKeyRef:\n\s+key: \S+\n\s+name: (\S+)", text))]
        refs += [("ConfigMap", n) for n in set(re.findall(r"configMapRef:\n\s+name: (\S+)", text))]
    return refs


# -- what the command prints is what the files set ---------------------------------------------


def test_farm_deploy_prints_the_grace_its_files_set(tmp_path: Path) -> None:
    for target in ("k8s", "skypilot"):
        out = tmp_path / target
        result = CliRunner().invoke(deploy_command, [target, "--classes", "24", "--out",
                                                     str(out), "--hard-limit", "900"])
        assert result.exit_code == 0, result.output
        printed = int(re.search(r"(?:grace period|stop grace) (\d+) s", result.output)[1])  # type: ignore[index]
        if target == "k8s":
            (d,) = _docs({"w.yaml": (out / "30-worker-24gb.yaml").read_text()}, "Deployment")
            assert printed == d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        else:
            task = yaml.safe_load((out / "worker-24gb.yaml").read_text())
            assert printed == int(task["envs"]["FARM_STOP_GRACE"]) == deploy_skypilot.STOP_GRACE


# -- images ------------------------------------------------------------------------------------


def _apt_installs(path: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", path.read_text())
    packages = []
    for line in text.splitlines():
        if not line.startswith("RUN "):
            continue
        for part in re.split(r"&&|;", line[4:]):
            words = shlex.split(part)
            if words[:2] in (["apt-get", "install"], ["apt", "install"]):
                packages += [w for w in words[2:] if not w.startswith("-")]
    return packages


@pytest.mark.parametrize("path", sorted((ROOT / "deploy").glob("*.Dockerfile")),
                         ids=lambda p: p.name)
def test_apt_packages_are_pinned(path: Path) -> None:
    packages = _apt_installs(path)
    if path.name != "control.Dockerfile":
        assert packages, "the worker images install python or a compiler and tini with apt"
    for package in packages:
        name, _, version = package.partition("=")
        assert name and re.fullmatch(r"[0-9][A-Za-z0-9.+~:-]*\*?", version), (path.name, package)
        # a pattern pins at most the Debian revision, never the upstream version
        assert version.count("*") <= 1 and "-" in version.rstrip("*"), (path.name, package)


def _ignored(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule for these simple patterns: a pattern matches the path or a
    folder above it; `**/` matches any depth; the last matching pattern wins (! re-includes)."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if pattern.startswith("**/"):
            candidates += ["/".join(parts[i:j]) for i in range(len(parts))
                           for j in range(i + 1, len(parts) + 1)]
            pattern = pattern[3:]
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_local_environments_out_and_what_the_images_copy_in() -> None:
    patterns = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines()
                if x.strip() and not x.startswith("#")]
    for local in (".venv/lib/python3.11/site-packages/torch/__init__.py", ".venv-skypilot/bin/sky",
                  ".git/objects/pack/x.pack", "farm-demo/out.png", "farm/__pycache__/a.pyc",
                  ".mypy_cache/x", ".pytest_cache/x", "deploy-out/k8s/farm.env"):
        assert _ignored(patterns, local), local
    copied = set()
    for dockerfile in (ROOT / "deploy").glob("*.Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from" not in line:
                copied.update(line.split()[1:-1])
    assert copied >= {"pyproject.toml", "README.md", "farm", "deploy"}
    for source in copied:
        files = [source] if (ROOT / source).is_file() else [
            p.relative_to(ROOT).as_posix() for p in (ROOT / source).rglob("*.py")]
        assert files and not any(_ignored(patterns, f) for f in files), source
