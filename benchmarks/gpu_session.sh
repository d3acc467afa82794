#!/usr/bin/env bash
# One prepared run on a lent CUDA machine: the GPU figures the README quotes.
#
#   OUT=gpu-results bash benchmarks/gpu_session.sh
#
# Runs benchmarks/gpu_sdxl.py (eager vs compiled, compile and cached cold start, fast preset,
# peak VRAM) and then benchmarks/gpu_vram_table.py (peak VRAM per profile and bucket), each under
# its own time limit; both write their JSON as they go, so a run cut short keeps what it measured.
# Python packages the machine lacks can sit as wheels in .whl/ (installed to /tmp/site first).
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
quiet() { grep -v -e "should be kept in float32" -e "^\[transformers\]" -e "it/s\]"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers, transformers, triton; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'triton', \
triton.__version__, 'cpus', __import__('os').cpu_count())"; } 2>&1 | tee "$OUT/machine.txt"
timeout "${SDXL_LIMIT:-380}" python3 -m benchmarks.gpu_sdxl --images "${IMAGES:-3}" \
    --out "$OUT/gpu-sdxl.json" 2>&1 | quiet | tee "$OUT/gpu-sdxl.log"
timeout "${VRAM_LIMIT:-150}" python3 -m benchmarks.gpu_vram_table --steps 2 \
    --buckets "${BUCKETS:-1mp,2mp,4mp}" --out "$OUT/vram-measured.json" 2>&1 | quiet \
    | tee "$OUT/vram.log"
