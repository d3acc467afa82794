"""One cold start of a compiled tiny worker, in a fresh process (run by bench_compile.py).

    python -m benchmarks._compile_probe BACKEND CACHE_IN|- CACHE_OUT|- ROUNDS

Loads tiny-sdxl twice (an eager copy and one to compile), loads fleet-cache artefacts from
CACHE_IN when given, compiles and warms the 64x64 bucket (timed: the cold start), saves the
artefacts to CACHE_OUT, then renders ROUNDS images on each copy, interleaved. Prints JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    backend, cache_in, cache_out, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    t_start = time.perf_counter()
    import torch

    from farm import models
    from farm.jobs import JobSpec
    from farm.settings import Settings
    from farm.worker import compile, pipelines

    torch.set_num_threads(1)
    settings = Settings(home=Path(tempfile.mkdtemp(prefix="farm-probe-")), threads=1)
    eager = pipelines.load_model(models.TINY_BASE, settings, "cpu")
    model = pipelines.load_model(models.TINY_BASE, settings, "cpu")
    imported = time.perf_counter() - t_start
    t0 = time.perf_counter()
    if cache_in != "-":
        torch.compiler.load_cache_artifacts(Path(cache_in).read_bytes())
    compile.wrap(model, backend)
    pipelines.warm_buckets(model, ((64, 64),))
    cold = time.perf_counter() - t0
    if cache_out != "-":
        saved = torch.compiler.save_cache_artifacts()
        assert saved is not None
        Path(cache_out).write_bytes(saved[0])
    spec = JobSpec.from_dict({"prompt": "a lighthouse", "seed": 1, "steps": 8, "width": 64,
                              "height": 64}, settings)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    diff = 0
    for _ in range(rounds):
        for name, m in (("eager", eager), ("compiled", model)):
            t = time.perf_counter()
            image = pipelines.render(m, spec)[0]
            times[name].append(time.perf_counter() - t)
            if name == "eager":
                ref = image
            else:
                import numpy as np

                diff = max(diff, int(np.abs(np.array(image).astype(int)
                                            - np.array(ref).astype(int)).max()))
    print(json.dumps({"backend": backend, "cached": cache_in != "-", "imports_s": imported,
                      "cold_compile_s": cold, "graphs": compile.graphs(), "per_image": times,
                      "max_pixel_diff": diff}))


if __name__ == "__main__":
    main()
