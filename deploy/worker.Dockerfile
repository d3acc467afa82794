# syntax=docker/dockerfile:1
# The CUDA worker: `farm worker` with torch for CUDA, the worker extra, and a model cache volume.
#
#   docker build -f deploy/worker.Dockerfile -t farm-worker:0.1.0 .      # from the repo root
#   docker run --gpus 1 -e FARM_BROKER_URL=... -e FARM_STORE_URL=s3://... farm-worker:0.1.0 \
#       --model sdxl-base --vram auto
#
# Pinned: the base image (CUDA 13.0.1 runtime, Ubuntu 24.04 and its Python 3.12), torch 2.13.0
# (PyPI's Linux build is for CUDA 13.0, so the host needs an NVIDIA driver >= 580; on an older
# driver build with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128), and
# every other package through deploy/image-constraints.txt, the set `make test` runs.
# Not built here: this machine has no Docker engine (tests/unit/test_deploy.py reads the file).
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.12 and tini from the base image's Ubuntu release, 24.04 (noble): python3 and
# python3-venv as noble-updates has them; tini 0.19.0-1 with whichever noble rebuild suffix the
# archive carries (tini's noble revision could not be looked up from where this was written).
# A pinned version that an update supersedes leaves the archive's index: then the build fails
# here, and the pin is moved on deliberately. tini is PID 1 so the worker gets SIGTERM as an
# ordinary process: a worker stopped while it still loads exits at once instead of ignoring
# the signal (PID 1 has no default action), and Kubernetes' pre-stop `kill -TERM 1` reaches it
# through tini.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3=3.12.3-0ubuntu2.1 \
        python3-venv=3.12.3-0ubuntu2.1 'tini=0.19.0-1*' \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/farm
ENV PATH=/opt/farm/bin:$PATH

WORKDIR /src
COPY deploy/image-constraints.txt constraints.txt ./
RUN pip install --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple \
        -c image-constraints.txt torch==2.13.0 \
 && pip install -c image-constraints.txt setuptools==84.2.1
COPY pyproject.toml README.md ./
COPY farm farm
COPY scheduler scheduler
COPY worker worker
COPY cli cli
COPY deploy deploy
RUN pip install --no-build-isolation -c image-constraints.txt -c constraints.txt '.[worker]'

# A non-root user that owns the model cache. /models holds the Hub downloads (HF_HOME) and the
# built tiny models (FARM_HOME): mount a volume there so a restart does not download SDXL again.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin farm \
 && mkdir -p /models/huggingface /models/farm /tmp/farm \
 && chown -R farm:farm /models /tmp/farm
ENV HF_HOME=/models/huggingface \
    FARM_HOME=/models/farm \
    FARM_READY_FILE=/tmp/farm/ready \
    FARM_DEVICE=cuda:0
VOLUME /models
USER 10001:10001
WORKDIR /home/farm

# SIGTERM is the warm shutdown: stop taking work, finish the current stage, exit 0
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "farm", "worker"]
