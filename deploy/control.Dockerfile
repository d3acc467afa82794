# syntax=docker/dockerfile:1
# The control image: the `farm` CLI without torch (submit, status, results, workers, clean,
# deploy, metrics serve). Small enough to run anywhere that submits.
#
#   docker build -f deploy/control.Dockerfile -t farm-control:0.1.0 .    # from the repo root
#   docker run --rm -e FARM_BROKER_URL=... -e FARM_STORE_URL=s3://... -v "$PWD:/work" \
#       farm-control:0.1.0 submit /work/prompts.jsonl
#
# Pinned: the base image and every package (deploy/image-constraints.txt: the set `make test`
# runs). No torch: `pip install .` without the worker extra, and a test asserts the
# CLI's commands never import it. Not built here: this machine has no Docker engine.
FROM python:3.12.12-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY deploy/image-constraints.txt constraints.txt ./
RUN pip install -c image-constraints.txt setuptools==84.2.1
COPY pyproject.toml README.md ./
COPY farm farm
COPY scheduler scheduler
COPY worker worker
COPY cli cli
COPY deploy deploy
RUN pip install --no-build-isolation -c image-constraints.txt -c constraints.txt . \
 && python -c "import farm.scheduler, farm.cli, farm.deploy" \
 && ! python -c "import torch" 2>/dev/null

RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin farm
USER 10001:10001
WORKDIR /work
ENTRYPOINT ["farm"]
CMD ["--help"]
