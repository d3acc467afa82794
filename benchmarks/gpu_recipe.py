"""Full-size SDXL base on a GPU with random weights: each recipe option, the turbo preset and
batched rendering against fp16 eager, seconds per image and PSNR (dB) against eager's pixels.
1024x1024, 30 steps.

    python -m benchmarks.gpu_recipe --out gpu-recipe.json                  # CUDA, < 7 min
    python -m benchmarks.gpu_recipe --cpu-smoke --parts eager,batch        # same code, tiny, CPU

With --cpu-smoke the fp8 parts run too where torchao is installed: torchao refuses a CPU
(its hardware check), but its float8 kernels (torch._scaled_mm) run there, so the smoke run
skips that check and traces and compiles the quantized UNet as a GPU run does: where a GPU
run's fp8 time goes, told apart from what any device pays.

Parts, in order, each under the time left (`--budget`; a compiled part is skipped, and says
so, when less than its estimate is left), the JSON written after each:

    eager      fp16 eager (the reference); fuse-qkv; channels-last; turbo (deep_cache 2)
    batch      B = 1, 2, 4 jobs in one pipeline call: images/s, PSNR of each against alone
    compiled   the UNet compiled (`--compile`: inductor, the whole UNet at static shapes, or
               regional, its repeated blocks with dynamic shapes as a CUDA worker does by
               default) with fuse-qkv + channels-last + the VAE decoder compiled (the CFG-on
               shape only)
    turbo-compiled  turbo on the compiled UNet (its cached steps compile a graph of their own)
    graphs     mode="reduce-overhead" (CUDA graphs) on that UNet, compiled again (inductor only)
    fp8-eager  torchao float8 as `fp8` (below) applies it, on an eager copy of the UNet: how long
               the quantization and the first image take, seconds per image, PSNR. Where the
               compiled fp8's time goes (`--parts eager,fp8-eager,fp8`)
    fp8        torchao float8 (dynamic activations, float8 weights) on that UNet, compiled again
               (last of the compiled parts: with the regional compile on an H200, 2026-12-04,
               it had not rendered its first image 310 s after it began)
    fp8-storage     the model store's fp8 variant as a worker holds it: UNet weights stored in
                    float8_e4m3fn, each layer cast up to fp16 to compute (diffusers' layerwise
                    casting), eager: UNet bytes before and after, seconds per image, PSNR (on a
                    copy of the UNet, so the parts after it keep the fp16 weights)

A whole-UNet compile takes minutes (228 s for two shapes on an H200), so a 7-minute run with
`--compile inductor` measures the eager parts and about one compiled part (`--parts eager,fp8`
and so on for the others); a regional compile took 21 s there for every bucket, so with
`--compile regional` one run holds every part but `graphs`.

A part that fails records its error and the run goes on. Each option is applied on the same
pipeline and taken off again, so every figure compares the same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks._stats import psnr
from benchmarks.gpu_sdxl import _model, _size, _spec
from farm.worker import compile, recipe
from farm.worker.model import LoadedModel
from farm.worker.render import render

PARTS = ("eager", "batch", "compiled", "turbo-compiled", "graphs", "fp8-eager", "fp8",
         "fp8-storage")
# seconds a compiled part needs at least, by backend (on an H200: one whole-UNet compile at
# one shape about 150 s, 228 s for two shapes on 2026-11-29; regional 21 s for every bucket
# with nothing cached on 2026-12-04)
COMPILE_ESTIMATE_S = {"inductor": 150.0, "regional": 40.0}


def _sync(model: LoadedModel) -> None:
    if model.device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(model: LoadedModel, spec: Any, n: int) -> tuple[float, Any]:
    """The median seconds of n renders after one untimed (first-call costs, compiling), and
    the image."""
    image = render(model, spec)[0]
    times = []
    for _ in range(n):
        _sync(model)
        t = time.perf_counter()
        image = render(model, spec)[0]
        _sync(model)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], image


def _allow_fp8_on_cpu() -> None:
    """Skip torchao's check for an fp8 GPU (a CPU smoke run only; see the module's text)."""
    from torchao.float8 import inference
    from torchao.quantization import quant_api

    for module in (inference, quant_api):
        module._check_hardware_support = lambda *args, **kwargs: None  # type: ignore[attr-defined]


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class Session:
    def __init__(self, out: Path, budget: float, smoke: bool, images: int,
                 backend: str = "inductor") -> None:
        self.out, self.budget, self.smoke, self.images = out, budget, smoke, images
        self.backend, self.is_compiled = backend, False
        self.t0 = time.perf_counter()
        self.figures: dict[str, Any] = {
            "gpu": "cpu (smoke run)" if smoke else torch.cuda.get_device_name(0),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "size": list(_size(smoke)), "steps": 30, "compile_backend": backend, "parts": {}}
        self.model = _model(smoke)
        self.spec = _spec(smoke)
        self.reference: Any = None

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def note(self, part: str, **found: Any) -> None:
        self.figures["parts"].setdefault(part, {}).update(found)
        self.figures["total_s"] = time.perf_counter() - self.t0
        self.out.write_text(json.dumps(self.figures, indent=2, default=str))
        print(part, " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in found.items()), flush=True)

    def variant(self, part: str, name: str, spec: Any = None) -> None:
        seconds, image = _timed(self.model, spec or self.spec, self.images)
        ref = self.figures["parts"]["eager"]["fp16_eager_s"]
        self.note(part, **{f"{name}_s": seconds, f"{name}_over_eager": seconds / ref,
                           f"{name}_psnr_db": psnr(image, self.reference)})

    # -- parts -----------------------------------------------------------------------------

    def eager(self) -> None:
        seconds, self.reference = _timed(self.model, self.spec, self.images)
        self.note("eager", fp16_eager_s=seconds)
        pipe = self.model.pipe
        pipe.fuse_qkv_projections()
        self.variant("eager", "fuse_qkv")
        pipe.unfuse_qkv_projections()
        for module in (pipe.unet, pipe.vae):
            module.to(memory_format=torch.channels_last)
        self.variant("eager", "channels_last")
        for module in (pipe.unet, pipe.vae):
            module.to(memory_format=torch.contiguous_format)
        self.variant("eager", "turbo", _spec(self.smoke, preset="turbo"))

    def batch(self) -> None:
        pipe, (w, h) = self.model.pipe, _size(self.smoke)
        prompts = ["a lighthouse on a basalt cliff at dusk", "a red fox in fresh snow",
                   "a tram crossing a bridge in the rain", "a bowl of ramen, steam rising"]

        def call(k: int) -> tuple[float, list[Any]]:
            gens = [torch.Generator("cpu").manual_seed(100 + i) for i in range(k)]
            _sync(self.model)
            t = time.perf_counter()
            out = pipe(prompt=prompts[:k], width=w, height=h, num_inference_steps=30,
                       generator=gens, output_type="pil")
            _sync(self.model)
            return time.perf_counter() - t, list(out.images)

        alone = [call(1)[1][0]]
        per_one, _ = call(1)
        for i in (1, 2, 3):  # image i alone, for the PSNR of the batched ones
            gen = torch.Generator("cpu").manual_seed(100 + i)
            alone.append(pipe(prompt=prompts[i], width=w, height=h, num_inference_steps=30,
                              generator=gen, output_type="pil").images[0])
        self.note("batch", b1_s=per_one, b1_images_per_s=1 / per_one)
        for k in (2, 4):
            call(k)  # first call at this batch size
            seconds, images = call(k)
            self.note("batch", **{f"b{k}_s": seconds, f"b{k}_images_per_s": k / seconds,
                                  f"b{k}_speedup": per_one * k / seconds,
                                  f"b{k}_min_psnr_db": min(psnr(x, y) for x, y
                                                           in zip(images, alone, strict=False))})

    def _compile(self, mode: str | None = None) -> None:
        """Compile the pipeline's UNet (its eager form when it was compiled before): the whole
        UNet at static shapes (`inductor`), or its repeated blocks with dynamic height and
        width as a worker does by default on CUDA (`regional`, compiled in place)."""
        pipe = self.model.pipe
        if self.backend == "regional":
            compile.configure()
            pipe.unet.compile_repeated_blocks(dynamic=compile.DYNAMIC_SHAPES, mode=mode)
        else:
            unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
            pipe.unet = torch.compile(unet, dynamic=False, mode=mode)
        self.is_compiled = True

    def compiled(self) -> None:
        pipe = self.model.pipe
        self.model.recipe = ("fuse-qkv", "channels-last", "compile-vae")
        recipe.apply_at_load(pipe, self.model.recipe)
        t = time.perf_counter()
        self._compile()
        recipe.compile_vae((pipe.vae,), self.model.recipe)
        render(self.model, self.spec)
        self.note("compiled", compile_s=time.perf_counter() - t)
        self.variant("compiled", "recipe")

    def turbo_compiled(self) -> None:
        """Turbo on the compiled UNet: its cached steps are a graph of their own."""
        if not self.is_compiled:
            self.compiled()
        t = time.perf_counter()
        render(self.model, _spec(self.smoke, preset="turbo"))
        self.note("turbo-compiled", first_call_s=time.perf_counter() - t)
        self.variant("turbo-compiled", "turbo", _spec(self.smoke, preset="turbo"))

    def fp8(self) -> None:
        recipe.quantize_fp8(getattr(self.model.pipe.unet, "_orig_mod", self.model.pipe.unet))
        self._compile()  # regional: the blocks compiled in place compile again for the new weights
        t = time.perf_counter()
        render(self.model, self.spec)
        self.note("fp8", compile_s=time.perf_counter() - t)
        self.variant("fp8", "fp8")

    @contextmanager
    def _unet(self, unet: torch.nn.Module) -> Iterator[None]:
        """Render with `unet` in the pipeline, then put the pipeline's own UNet back."""
        pipe = self.model.pipe
        kept, pipe.unet = pipe.unet, unet
        try:
            yield
        finally:
            pipe.unet = kept

    def fp8_eager(self) -> None:
        """torchao float8 on an eager copy of the UNet: quantization, first image, steady."""
        kept = self.model.pipe.unet
        unet = copy.deepcopy(getattr(kept, "_orig_mod", kept))
        t = time.perf_counter()
        recipe.quantize_fp8(unet)
        _sync(self.model)
        self.note("fp8-eager", quantize_s=time.perf_counter() - t)
        with self._unet(unet):
            t = time.perf_counter()
            render(self.model, self.spec)
            _sync(self.model)
            self.note("fp8-eager", first_call_s=time.perf_counter() - t)
            self.variant("fp8-eager", "fp8_eager")

    def graphs(self) -> None:
        if self.backend != "inductor":
            self.note("graphs", skipped="cuda-graphs needs --compile inductor")
            return
        self._compile(mode="reduce-overhead")
        t = time.perf_counter()
        render(self.model, self.spec)
        self.note("graphs", compile_s=time.perf_counter() - t)
        self.variant("graphs", "cuda_graphs")

    def fp8_storage(self) -> None:
        kept = self.model.pipe.unet
        fp16 = getattr(kept, "_orig_mod", kept)
        unet = copy.deepcopy(fp16)  # eager, the fp16 weights untouched
        unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                      compute_dtype=self.model.dtype)
        before, after = _bytes(fp16), _bytes(unet)
        self.note("fp8-storage", unet_bytes_fp16=before, unet_bytes_fp8=after,
                  fp8_over_fp16=after / before)
        with self._unet(unet):
            self.variant("fp8-storage", "fp8_storage")

    def run(self, parts: list[str]) -> None:
        steps: dict[str, Callable[[], None]] = {
            "eager": self.eager, "batch": self.batch, "compiled": self.compiled,
            "fp8": self.fp8, "graphs": self.graphs, "turbo-compiled": self.turbo_compiled,
            "fp8-storage": self.fp8_storage, "fp8-eager": self.fp8_eager}
        for part in parts:
            needs = (30.0 if part in ("eager", "batch", "fp8-storage", "fp8-eager")
                     else COMPILE_ESTIMATE_S[self.backend])
            if self.left() < needs:
                self.note(part, skipped=f"{self.left():.0f} s left, needs about {needs:.0f} s")
                continue
            try:
                steps[part]()
            except Exception as exc:  # noqa: BLE001 - one part's failure is a finding
                traceback.print_exc()
                self.note(part, error=f"{type(exc).__name__}: {exc}"[:500])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-recipe.json")
    parser.add_argument("--images", type=int, default=2, help="timed images per variant")
    parser.add_argument("--budget", type=float, default=400.0, help="seconds for all parts")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--compile", choices=("inductor", "regional"), default="inductor",
                        help="the compiled parts: the whole UNet at static shapes, or its "
                             "repeated blocks with dynamic shapes (a CUDA worker's default)")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts or "eager" not in parts[:1]:
        parser.error(f"--parts: start with eager (the reference), then any of {PARTS}")
    if args.cpu_smoke:
        torch.set_num_threads(1)  # as a CPU worker runs; more threads contend on a shared CPU
        if {"fp8", "fp8-eager"} & set(parts):
            _allow_fp8_on_cpu()
    Session(Path(args.out), args.budget, args.cpu_smoke, args.images, args.compile).run(parts)


if __name__ == "__main__":
    main()
