"""The worker's model building, loading and rendering, on the tiny SDXL models (CPU, offline)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import unicodedata
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline  # noqa: E402

from farm import models  # noqa: E402
from farm.errors import ModelUnavailable  # noqa: E402
from farm.jobs import JobSpec  # noqa: E402
from farm.settings import Settings  # noqa: E402
from farm.worker import pipelines, tiny  # noqa: E402
from farm.worker.pipelines import LoadedModel, load_model, pixels_digest, render  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("farm-home")
    # one intra-op thread: on a shared 2-core machine torch's default (all cores) makes a render
    # vary from 0.2 s to 8 s as threads wait on each other; load_model applies it
    return Settings(home=home, models_dir=home / "models", threads=1)


@pytest.fixture(scope="session")
def base(settings: Settings) -> LoadedModel:
    return load_model(models.TINY_BASE, settings, "cpu")


@pytest.fixture(scope="session")
def refiner(settings: Settings) -> LoadedModel:
    return load_model(models.TINY_REFINER, settings, "cpu")


def job(settings: Settings, **fields: Any) -> JobSpec:
    data = {"prompt": "a red fox in the snow", "seed": 7, "steps": 3, "width": 64, "height": 64}
    return JobSpec.from_dict({**data, **fields}, settings)


def safetensors_hashes(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*.safetensors"))}


# -- building ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", tiny.NAMES)
def test_tiny_build_gives_the_same_weights_every_time(name: str, settings: Settings,
                                                      base: LoadedModel, tmp_path: Path) -> None:
    first = settings.models_path / name          # built by the fixtures' load_model
    tiny.build_tiny(name, first)
    second = tiny.build_tiny(name, tmp_path / name)
    hashes = safetensors_hashes(first)
    assert len(hashes) >= 3
    assert hashes == safetensors_hashes(second)
    assert pipelines.weights_hash(pipelines.weight_files(first)) == pipelines.weights_hash(
        pipelines.weight_files(second))


def test_build_leaves_a_complete_model_alone(settings: Settings, base: LoadedModel) -> None:
    folder = settings.models_path / "tiny-sdxl"
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    before = unet.stat().st_mtime_ns
    start = time.perf_counter()
    assert tiny.build_tiny("tiny-sdxl", folder) == folder
    assert time.perf_counter() - start < 0.5
    assert unet.stat().st_mtime_ns == before


def test_build_replaces_an_incomplete_folder(tmp_path: Path) -> None:
    dest = tmp_path / "tiny-sdxl-refiner"
    dest.mkdir()
    (dest / "half-written.bin").write_bytes(b"x")
    tiny.build_tiny("tiny-sdxl-refiner", dest)
    assert tiny.is_complete(dest, "tiny-sdxl-refiner")
    assert not (dest / "half-written.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-sdxl-refiner"]  # no temp left


def test_concurrent_builds_publish_one_complete_model(tmp_path: Path) -> None:
    dest = tmp_path / "tiny-sdxl-refiner"
    errors: list[BaseException] = []

    def build() -> None:
        try:
            tiny.build_tiny("tiny-sdxl-refiner", dest)
        except BaseException as exc:  # reported below, in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert tiny.is_complete(dest, "tiny-sdxl-refiner")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-sdxl-refiner"]


def test_publishing_after_another_builder_won_keeps_the_winner(tmp_path: Path) -> None:
    dest = tiny.build_tiny("tiny-sdxl-refiner", tmp_path / "m")
    loser = tmp_path / "loser"
    shutil.copytree(dest, loser)
    before = safetensors_hashes(dest)
    tiny._publish(loser, dest, "tiny-sdxl-refiner")      # must not raise
    assert tiny.is_complete(dest, "tiny-sdxl-refiner")
    assert safetensors_hashes(dest) == before


# -- tokenizer ----------------------------------------------------------------------------------

ODD_PROMPTS = [
    "🦄🔥 a unicorn, 日本語のテキスト, Ωμέγα, café naïve",
    "zero\u200bwidth\ttabs\nnewlines  and   spaces",
    "﷽ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x01\x7f combining e\u0301",
    "👨‍👩‍👧‍👦 family emoji, flags 🇯🇵🇫🇷, skin tone 👍🏽",
]


@pytest.mark.parametrize("prompt", ODD_PROMPTS)
def test_tokenizers_take_any_text(base: LoadedModel, prompt: str) -> None:
    for tok in (base.pipe.tokenizer, base.pipe.tokenizer_2):  # as loaded by from_pretrained
        ids = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(ids) == 77
        assert ids[0] == tok.bos_token_id
        assert max(ids) < tiny.VOCAB_SIZE
        # nothing was lost to an unknown token: the text comes back (CLIP normalises case,
        # whitespace and NFC, and its decoder puts a space after every word)
        back = tok.decode(ids, skip_special_tokens=True)
        expected = unicodedata.normalize("NFC", prompt).lower()
        assert "".join(back.split()) == "".join(expected.split())


def test_odd_and_overlong_prompts_render(base: LoadedModel, settings: Settings) -> None:
    long_prompt = "a very long prompt, " * 40   # far past 77 tokens: truncated, not an error
    for prompt in (ODD_PROMPTS[0], long_prompt):
        spec = job(settings, prompt=prompt, negative_prompt="🙈 blurry", steps=2)
        [image] = render(base, spec)
        assert image.size == (64, 64)


# -- loading ----------------------------------------------------------------------------------


def test_base_loads_through_from_pretrained(base: LoadedModel, settings: Settings) -> None:
    pipe = base.pipe
    assert type(pipe) is StableDiffusionXLPipeline
    assert Path(pipe.name_or_path) == settings.models_path / "tiny-sdxl"
    assert (base.device, base.dtype) == ("cpu", torch.float32)
    assert pipe.unet.dtype == torch.float32
    assert pipe.vae_scale_factor == 8
    assert type(pipe.tokenizer).__name__ == type(pipe.tokenizer_2).__name__ == "CLIPTokenizer"
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert len(base.weights_hash) == 64
    assert base.load_seconds > 0
    sched = dict(pipe.scheduler.config)
    assert (sched["beta_schedule"], sched["timestep_spacing"], sched["steps_offset"]) == (
        "scaled_linear", "leading", 1)


def test_refiner_is_shaped_like_sdxl_refiner(refiner: LoadedModel, base: LoadedModel) -> None:
    pipe = refiner.pipe
    assert type(pipe) is StableDiffusionXLImg2ImgPipeline
    assert pipe.text_encoder is None and pipe.tokenizer is None
    assert pipe.config.requires_aesthetics_score is True
    unet, te2 = pipe.unet.config, pipe.text_encoder_2.config
    assert unet.cross_attention_dim == te2.hidden_size
    assert pipe.unet.add_embedding.linear_1.in_features == (
        5 * unet.addition_time_embed_dim + te2.projection_dim)
    # the real pair shares text_encoder_2 and the VAE; so do the tiny ones, weight for weight
    for part in ("vae", "text_encoder_2"):
        ours, theirs = getattr(pipe, part).state_dict(), getattr(base.pipe, part).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_weights_hash_is_stable_across_loads(base: LoadedModel, settings: Settings,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    original = StableDiffusionXLPipeline.from_pretrained

    def spy(cls: type, *args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", classmethod(spy))
    again = load_model(models.TINY_BASE, settings, "cpu")
    assert calls and Path(calls[0][0]) == settings.models_path / "tiny-sdxl"
    assert again.weights_hash == base.weights_hash


def test_missing_local_path_is_model_unavailable(settings: Settings, tmp_path: Path) -> None:
    spec = models.resolve(str(tmp_path / "no-such-model.safetensors"))
    with pytest.raises(ModelUnavailable) as info:
        load_model(spec, settings, "cpu")
    message = str(info.value)
    assert spec.ref in message and "\n" not in message


def test_folder_that_is_not_a_model_is_model_unavailable(settings: Settings,
                                                         tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="cannot load"):
        load_model(models.resolve(str(tmp_path)), settings, "cpu")


def test_uncached_hub_model_offline_is_model_unavailable(settings: Settings, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub

    # huggingface_hub reads these variables once at import: set the constants too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(ModelUnavailable) as info:
        load_model(models.SDXL_BASE, settings, "cpu")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert models.SDXL_BASE.ref in message and "hf download" in message and "\n" not in message


def test_weight_files_follow_the_variant(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "X", "unet": ["diffusers", "UNet2DConditionModel"],
         "image_encoder": [None, None]}))
    (tmp_path / "unet").mkdir()
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin", "config.json"):
        (tmp_path / "unet" / name).write_bytes(name.encode())
    (tmp_path / "sd_xl_base_1.0.safetensors").write_bytes(b"single file, not loaded")
    rels = [rel for rel, _ in pipelines.weight_files(tmp_path)]
    assert rels == ["unet/diffusion_pytorch_model.safetensors"]
    rels = [rel for rel, _ in pipelines.weight_files(tmp_path, "fp16")]
    assert rels == ["unet/diffusion_pytorch_model.fp16.safetensors"]


# -- rendering --------------------------------------------------------------------------------


@pytest.mark.parametrize("width,height", [(64, 64), (192, 80), (104, 152)])
def test_images_have_the_requested_size(base: LoadedModel, settings: Settings, width: int,
                                        height: int) -> None:
    [image] = render(base, job(settings, width=width, height=height, steps=2))
    assert image.size == (width, height) and image.mode == "RGB"


def test_every_scheduler_renders_and_switching_does_not_drift(base: LoadedModel,
                                                              settings: Settings) -> None:
    digests = {}
    for name in pipelines.SCHEDULERS:
        images = render(base, job(settings, scheduler=name))
        assert type(base.pipe.scheduler) is pipelines.SCHEDULERS[name]
        assert images[0].size == (64, 64)
        digests[name] = pixels_digest(images)
    assert len(set(digests.values())) > 1
    assert pixels_digest(render(base, job(settings, scheduler="euler"))) == digests["euler"]


def test_ancestral_sampler_is_seeded(base: LoadedModel, settings: Settings) -> None:
    first = pixels_digest(render(base, job(settings, scheduler="euler_a", seed=5)))
    assert pixels_digest(render(base, job(settings, scheduler="euler_a", seed=5))) == first
    assert pixels_digest(render(base, job(settings, scheduler="euler_a", seed=6))) != first


def test_image_k_of_a_job_equals_rendering_it_alone(base: LoadedModel,
                                                    settings: Settings) -> None:
    images = render(base, job(settings, scheduler="euler_a", seed=100, n=3))
    assert len(images) == 3
    assert len({pixels_digest([im]) for im in images}) == 3
    for k in (0, 2):
        [alone] = render(base, job(settings, scheduler="euler_a", seed=100 + k, n=1))
        assert pixels_digest([alone]) == pixels_digest([images[k]])


def test_a_fresh_process_renders_the_same_pixels(base: LoadedModel, settings: Settings) -> None:
    spec = job(settings, scheduler="dpmpp_2m", seed=42, n=2, width=112, height=144,
               negative_prompt="blurry")
    here = pixels_digest(render(base, spec))
    code = (
        "import json, sys, torch\n"
        "from pathlib import Path\n"
        "from farm import models\n"
        "from farm.jobs import JobSpec\n"
        "from farm.settings import Settings\n"
        "from farm.worker.pipelines import load_model, pixels_digest, render\n"
        "args = json.loads(sys.argv[1])\n"
        "torch.set_num_threads(args['threads'])\n"
        "s = Settings(home=Path(args['home']), models_dir=Path(args['models']))\n"
        "m = load_model(models.TINY_BASE, s, 'cpu')\n"
        "print('DIGEST', pixels_digest(render(m, JobSpec.from_dict(args['spec'], s, stored=True))))\n"
    )
    # same thread count: CPU kernels may sum in another order with another one
    args = {"threads": torch.get_num_threads(), "home": str(settings.home),
            "models": str(settings.models_path), "spec": spec.to_dict()}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    [line] = [x for x in out.stdout.splitlines() if x.startswith("DIGEST ")]
    assert line.split()[1] == here


def test_callback_runs_every_step_and_can_cancel(base: LoadedModel, settings: Settings) -> None:
    seen: list[int] = []

    def count(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        seen.append(step)
        return kwargs

    render(base, job(settings, n=2, steps=3), callback=count)
    assert seen == [0, 1, 2, 0, 1, 2]

    class Canceled(Exception):
        pass

    def cancel(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        raise Canceled

    with pytest.raises(Canceled):
        render(base, job(settings, steps=3), callback=cancel)


def test_refiner_refines_base_latents(base: LoadedModel, refiner: LoadedModel) -> None:
    # the ensemble-of-experts split later stages use: base stops at 50 %, refiner goes on
    gen = torch.Generator("cpu").manual_seed(1)
    latents = base.pipe(prompt="a fox", width=64, height=64, num_inference_steps=4,
                        denoising_end=0.5, output_type="latent", generator=gen).images
    assert tuple(latents.shape) == (1, 4, 8, 8)
    [image] = refiner.pipe(prompt="a fox", image=latents, num_inference_steps=4,
                           denoising_start=0.5, generator=gen).images
    assert image.size == (64, 64)


def test_refiner_cannot_render_a_job(refiner: LoadedModel, settings: Settings) -> None:
    with pytest.raises(ValueError, match="refiner"):
        render(refiner, job(settings))


def test_warm_runs_both_roles(base: LoadedModel, refiner: LoadedModel) -> None:
    assert pipelines.warm(base) > 0
    assert pipelines.warm(refiner) > 0
