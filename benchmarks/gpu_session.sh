#!/usr/bin/env bash
# One prepared run on a lent CUDA machine: the GPU figures the README quotes.
#
#   OUT=gpu-results bash benchmarks/gpu_session.sh                  # the recipe part, < 8 min
#   OUT=gpu-results PARTS=sdxl,vram bash benchmarks/gpu_session.sh  # the parts measured before
#
# Parts (PARTS, comma-separated; default: recipe), each under its own time limit, each writing
# its JSON as it goes, so a run cut short keeps what it measured:
#   recipe  benchmarks/gpu_recipe.py: fp16 eager, fuse-qkv, channels-last, turbo, batches of
#           1/2/4, then compiled with the recipe, fp8 (torchao), CUDA graphs and turbo compiled,
#           each with its PSNR against eager (RECIPE_PARTS picks, RECIPE_BUDGET seconds in all;
#           a compiled part takes minutes, so a run gets the eager parts and about one compiled
#           part: RECIPE_PARTS=eager,fp8 and so on for the rest)
#   sdxl    benchmarks/gpu_sdxl.py: eager vs compiled, compile and cached cold start, fast
#           preset, peak VRAM (about 5.5 min)
#   vram    benchmarks/gpu_vram_table.py: peak VRAM per profile and bucket (about 2.5 min)
#   buckets compiling all nine SDXL buckets (benchmarks/_bucket_probe.py, full-size SDXL base,
#           inductor): nothing cached, then a new process with the fleet cache's artefacts (the
#           cold start with all nine buckets); per bucket its compile seconds and seconds per
#           image against eager (about 7.5 min; BUCKET_MODE=dynamic, the worker's way, or
#           static; BUCKET_BACKEND=inductor, the CUDA default, or regional)
# buckets runs alone (PARTS=buckets: its two limits, 320 + 130 s, keep the run under 8 min).
# Python packages the machine lacks can sit as wheels in .whl/ (installed to /tmp/site first):
# the fp8 part needs torchao (a release built for the machine's torch).
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
PARTS=",${PARTS:-recipe},"
if [[ $PARTS == *,recipe,* ]]; then
    timeout "${RECIPE_LIMIT:-440}" python3 -m benchmarks.gpu_recipe --budget "${RECIPE_BUDGET:-420}" \
        --parts "${RECIPE_PARTS:-eager,batch,compiled,fp8,graphs,turbo-compiled}" \
        --out "$OUT/gpu-recipe.json" 2>&1 | quiet | tee "$OUT/gpu-recipe.log"
fi
if [[ $PARTS == *,sdxl,* ]]; then
    timeout "${SDXL_LIMIT:-380}" python3 -m benchmarks.gpu_sdxl --images "${IMAGES:-3}" \
        --out "$OUT/gpu-sdxl.json" 2>&1 | quiet | tee "$OUT/gpu-sdxl.log"
fi
if [[ $PARTS == *,vram,* ]]; then
    timeout "${VRAM_LIMIT:-150}" python3 -m benchmarks.gpu_vram_table --steps 2 \
        --buckets "${BUCKETS:-1mp,2mp,4mp}" --out "$OUT/vram-measured.json" 2>&1 | quiet \
        | tee "$OUT/vram.log"
fi
if [[ $PARTS == *,buckets,* ]]; then
    # ---- compile every bucket, once per fleet (issue 15) --------------------------------------
    # 1. a new machine, nothing cached: compile and warm all nine buckets, save the artefacts
    # 2. another new machine (a fresh process, an empty local inductor cache) with those
    #    artefacts loaded first, as the fleet compile cache gives them: its cold start
    # Each probe prints a JSON line after every bucket, so a part cut short keeps its figures.
    mode=${BUCKET_MODE:-dynamic}
    backend=${BUCKET_BACKEND:-inductor}
    artefacts=$(mktemp -d)/buckets.bin
    name="$OUT/buckets-$mode-$backend"
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout "${BUCKETS_COLD_LIMIT:-320}" \
        python3 -m benchmarks._bucket_probe "$mode" "$backend" sdxl 1 - "$artefacts" \
        > "$name-cold.jsonl" 2> >(quiet > "$name-cold.log")
    tail -n 1 "$name-cold.jsonl"
    if [[ -s $artefacts ]]; then
        TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout "${BUCKETS_CACHED_LIMIT:-130}" \
            python3 -m benchmarks._bucket_probe "$mode" "$backend" sdxl 1 "$artefacts" - \
            > "$name-cached.jsonl" 2> >(quiet > "$name-cached.log")
        tail -n 1 "$name-cached.jsonl"
    fi
fi
