"""SkyPilot: a task per VRAM class that runs one worker on a spot GPU in any cloud, pointed at
the farm's broker and store.

Launch it as a managed job (`sky jobs launch`), once per worker wanted: SkyPilot picks the
cheapest cloud and region that has one of the class's GPUs as spot capacity, and when the spot
instance is reclaimed it starts the job again elsewhere. A worker that gets SIGTERM with the
reclaim hands back a stage that will not finish within FARM_STOP_GRACE (short here) with its
latents, for another worker to resume (worker/drain.py); one killed outright leaves its stage to
the heartbeat sweep (farm/recovery.py), so nothing is lost either way.

Two ways to get the farm onto the machine:
- default: `workdir: .` syncs the checkout (run `sky` from the repository root) and `setup`
  installs it into a virtual environment, with the pinned torch and constraints.txt;
- `--image REGISTRY/IMAGE:TAG` (a pushed worker image): the task runs that image as a container
  (SkyPilot's "containers as tasks": `docker run` on its default VM image, which has Docker and
  the NVIDIA runtime), as the image's own non-root user. Not `image_id: docker:...`: that makes
  the image the runtime environment, into which SkyPilot installs its runtime and logs in over
  SSH as the image's user, who must have passwordless sudo; the worker image's user has a
  no-login shell and no sudo, by design.
"""

from __future__ import annotations

import shlex
from typing import Any

from farm.deploy import files, gpus

UV = "uv==0.13.8"          # installs a Python 3.12 the farm needs on any base image
TORCH = "torch==2.13.0"    # the worker image's torch; its PyPI build is CUDA 13 (driver >= 580)
VENV = "~/farm-venv"
SECRETS = ("FARM_BROKER_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
STOP_GRACE = files.SPOT_STOP_GRACE
# the container's model cache: a Docker volume, created from the image's /models and so owned
# by its user (a host folder would be root's)
MODEL_VOLUME = "farm-models"


def uses_image(spec: files.DeploySpec) -> bool:
    """Whether the tasks run in a pushed image rather than installing the checkout."""
    return spec.image != files.DEFAULT_IMAGE


def setup_script() -> str:
    return "\n".join([
        "set -e",
        f"pip install -q {UV}",
        f"uv venv --python 3.12 {VENV}",
        # TORCH_INDEX_URL: the PyTorch index of an older CUDA when the machine's driver is < 580
        f'uv pip install -q --python {VENV}/bin/python --index-url "$TORCH_INDEX_URL" {TORCH}',
        f"uv pip install -q --python {VENV}/bin/python -c constraints.txt '.[worker]'",
    ]) + "\n"


def docker_command(spec: files.DeploySpec, vram_class: int, env_names: list[str]) -> str:
    """`docker run` of the worker image, handed the task's variables and secrets by name.
    `exec`, so the SIGTERM SkyPilot sends reaches the docker client, which passes it on to the
    container (tini, then the worker)."""
    passed = [arg for name in env_names for arg in ("-e", name)]
    return "exec " + shlex.join([
        "docker", "run", "--rm", "--gpus", "all", "-v", f"{MODEL_VOLUME}:{files.MODEL_CACHE}",
        *passed, spec.image, "--vram", str(vram_class), *files.worker_args(spec)])


def task(spec: files.DeploySpec, vram_class: int) -> dict[str, Any]:
    envs: dict[str, Any] = {**files.worker_env(spec, vram_class, STOP_GRACE),
                            # null: SkyPilot refuses to launch until --env gives it
                            "FARM_STORE_URL": spec.store_url}
    if spec.s3_endpoint_url:
        envs["FARM_S3_ENDPOINT_URL"] = spec.s3_endpoint_url
    # nothing probes readiness here; the model cache is the VM's disk (or a Docker volume)
    envs.pop("FARM_READY_FILE")
    resources: dict[str, Any] = {
        "accelerators": gpus.accelerators(vram_class, spec.classes),
        "use_spot": True,
        "disk_size": 100,      # the weights, the venv and the compile caches
        # restart on errors too (e.g. exit 3: the broker was unreachable for a while)
        "job_recovery": {"strategy": "FAILOVER", "max_restarts_on_errors": 3},
    }
    doc: dict[str, Any] = {"name": files.worker_name(vram_class), "resources": resources}
    command = files.worker_command(spec, vram_class)
    if uses_image(spec):
        doc["envs"] = envs
        doc["setup"] = f"docker pull {shlex.quote(spec.image)}\n"
        command = docker_command(spec, vram_class, [*envs, *SECRETS])
    else:
        doc["workdir"] = "."
        doc["envs"] = {**envs, "FARM_HOME": "~/farm-home", "HF_HOME": "~/farm-home/huggingface",
                       "TORCH_INDEX_URL": "https://pypi.org/simple"}
        doc["setup"] = setup_script()
        command = command.replace("exec farm", f"exec {VENV}/bin/farm", 1)
    # required at launch: `sky jobs launch --secret FARM_BROKER_URL ...`; never in the file
    doc["secrets"] = {name: None for name in SECRETS}
    doc["run"] = command + "\n"
    return doc


def render(spec: files.DeploySpec) -> dict[str, str]:
    gpus.check_classes(spec.classes, gpus.CLOUD_GPUS)
    head = files.header("skypilot", spec)
    out = {f"worker-{c}gb.yaml": files.dump_yaml([task(spec, c)], head)
           for c in spec.classes}
    out["farm.env"] = files.farm_env_file(spec)
    out.update(files.store_policy_files(spec))
    return out
