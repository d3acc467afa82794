"""The turbo preset's deep feature cache (worker/deepcache.py) and the worker's recipe options
(worker/recipe.py), on the tiny SDXL model (CPU, offline), and turbo through a real worker."""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from farm import broker, models  # noqa: E402
from farm.errors import ConfigError  # noqa: E402
from farm.images import read_parameters  # noqa: E402
from farm.jobs import JobSpec  # noqa: E402
from farm.keys import image_key  # noqa: E402
from farm.scheduler.submit import submit  # noqa: E402
from farm.settings import Settings  # noqa: E402
from farm.store import open_store  # noqa: E402
from farm.worker import compile  # noqa: E402
from farm.worker.deepcache import FeatureCache  # noqa: E402
from farm.worker.pipelines import LoadedModel, load_model, pixels_digest, render  # noqa: E402
from tests.conftest import run_farm  # noqa: E402


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("farm-home")
    return Settings(home=home, models_dir=home / "models", threads=1)


@pytest.fixture(scope="module")
def base(settings: Settings) -> LoadedModel:
    return load_model(models.TINY_BASE, settings, "cpu")


def job(settings: Settings, **fields: Any) -> JobSpec:
    data = {"prompt": "a red fox in the snow", "seed": 7, "steps": 6, "width": 64, "height": 64}
    return JobSpec.from_dict({**data, **fields}, settings)


def psnr(a: Any, b: Any) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@contextmanager
def block_calls(unet: Any) -> Iterator[Counter[str]]:
    """How often each level of the UNet really computed: a hook on a resnet inside each block,
    which runs only when its block's own forward does (not when the cache stands in for it)."""
    calls: Counter[str] = Counter()
    watched = {"shallow down": unet.down_blocks[0], "deep down": unet.down_blocks[1],
               "mid": unet.mid_block, "deep up": unet.up_blocks[-2],
               "shallow up": unet.up_blocks[-1]}
    hooks = [block.resnets[0].register_forward_hook(
        lambda *_, name=name: calls.update([name])) for name, block in watched.items()]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def test_turbo_reuses_the_deep_features_on_alternate_steps(base: LoadedModel,
                                                           settings: Settings) -> None:
    with block_calls(base.pipe.unet) as calls:
        render(base, job(settings))
    assert set(calls.values()) == {6}, calls  # balanced: every block on each of the 6 steps
    with block_calls(base.pipe.unet) as calls:
        render(base, job(settings, preset="turbo"))
    assert calls == {"shallow down": 6, "shallow up": 6, "deep down": 3, "mid": 3, "deep up": 3}
    with block_calls(base.pipe.unet) as calls:
        render(base, job(settings, preset="turbo", deep_cache=3))
    assert calls["deep up"] == 2 and calls["shallow up"] == 6  # steps 0 and 3 in full


def test_turbo_is_deterministic_and_close_to_balanced_but_not_equal(
        base: LoadedModel, settings: Settings) -> None:
    before = pixels_digest(render(base, job(settings)))
    turbo = render(base, job(settings, preset="turbo", n=2))
    again = render(base, job(settings, preset="turbo", n=2))
    assert pixels_digest(turbo) == pixels_digest(again)
    # image 1 of a job equals that image rendered alone: the cache starts afresh per image
    alone = render(base, job(settings, preset="turbo", seed=8))
    assert pixels_digest(turbo[1:]) == pixels_digest(alone)
    balanced = render(base, job(settings, n=2))
    assert pixels_digest(balanced[:1]) == before != pixels_digest(turbo[:1])
    assert 25 < psnr(turbo[0], balanced[0]) < math.inf
    # the cache leaves nothing behind: no block keeps a replaced forward
    unet = base.pipe.unet
    for block in (*unet.down_blocks, unet.mid_block, *unet.up_blocks):
        assert "forward" not in vars(block)
    assert not unet._forward_pre_hooks


def test_the_cache_computes_in_full_when_the_cfg_cut_off_changes_the_batch(
        base: LoadedModel, settings: Settings) -> None:
    """The cut-off after step int(6 * 0.4) = 2: steps 0-2 with CFG (UNet batch 2), 3-5 without
    (batch 1). Step 3 would reuse a batch-2 feature, so it runs in full; then every other
    step again."""
    with block_calls(base.pipe.unet) as calls:
        render(base, job(settings, preset="turbo", cfg_cutoff=0.4))
    assert calls["deep up"] == 4 and calls["shallow up"] == 6  # steps 0, 2, 3, 4


def test_a_resumed_image_starts_with_a_full_step_in_phase(base: LoadedModel) -> None:
    unet = base.pipe.unet
    sample = torch.zeros(1, 4, 8, 8)
    with FeatureCache(unet, 2, start_step=3) as cache:
        cache._before_call(unet, (sample,), {})   # step 3: nothing cached yet, so full
        cache._before_call(unet, (sample,), {})   # step 4: in phase, full
    assert (cache.full_calls, cache.cached_calls) == (2, 0)
    with pytest.raises(ValueError, match="interval of at least 2"):
        FeatureCache(unet, 1)


def test_recipe_options_load_and_render_close_to_eager(base: LoadedModel,
                                                       settings: Settings) -> None:
    tuned = load_model(models.TINY_BASE, settings.replace(recipe="fuse-qkv,channels-last"), "cpu")
    assert tuned.recipe == ("fuse-qkv", "channels-last") and base.recipe == ()
    attn = tuned.pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert attn.fused_projections and hasattr(attn, "to_qkv")
    conv = tuned.pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    spec = job(settings)
    assert psnr(render(tuned, spec)[0], render(base, spec)[0]) > 50


def test_compile_vae_compiles_every_decoder_in_place_and_keys_the_cache(
        base: LoadedModel, settings: Settings) -> None:
    """Compiling is lazy: wrapping costs nothing until a render, so no render here."""
    model = load_model(models.TINY_BASE, settings.replace(recipe="compile-vae",
                                                          compile="regional"), "cpu")
    compile.wrap(model, "regional")
    for vae in (model.profile_vae, model.tiny_vae):
        assert vae.decoder._compiled_call_impl is not None
    assert base.profile_vae.decoder._compiled_call_impl is None
    # the same weights with another recipe compile to other artefacts: another cache entry
    key = compile.cache_key(model, "regional", ((64, 64),), "resident", "cpu")
    assert key != compile.cache_key(base, "regional", ((64, 64),), "resident", "cpu")


@pytest.mark.parametrize(("recipe", "message"), [
    ("cuda-graphs", "recipe option cuda-graphs needs a CUDA GPU; this worker runs on cpu"),
    ("fp8", "recipe option fp8 needs a CUDA GPU; this worker runs on cpu"),
    ("compile-vae", "recipe option compile-vae needs --compile inductor or regional, got none"),
])
def test_a_recipe_the_cpu_cannot_run_is_refused_before_loading(
        settings: Settings, recipe: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_model(models.TINY_BASE, settings.replace(recipe=recipe), "cpu")
    assert str(err.value) == message


def test_a_turbo_job_through_a_real_worker(env: dict[str, str], base: LoadedModel,
                                           tmp_path: Path) -> None:
    settings = Settings.load(env=env)
    try:
        spec = JobSpec.from_dict({"prompt": "a tram in the rain", "seed": 11, "steps": 6,
                                  "width": 64, "height": 64, "preset": "turbo"}, settings)
        result = submit(settings, [spec])
        out = run_farm(env, "worker", "--device", "cpu", "--max-jobs", "1", "--name", "turbo",
                       timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        png = open_store(settings).get(image_key(result.batch, result.jobs[0].id, 0))
        assert "Deep cache: 2" in (read_parameters(png) or "")
        assert "Preset: turbo" in (read_parameters(png) or "")
        # the worker's image is the in-process turbo render of the same job, not balanced's
        image = Image.open(io.BytesIO(png)).convert("RGB")
        assert pixels_digest([image]) == pixels_digest(render(base, spec))
        balanced = JobSpec.from_dict({**spec.to_dict(), "preset": "balanced", "deep_cache": 0},
                                     settings, stored=True)
        assert pixels_digest([image]) != pixels_digest(render(base, balanced))
    finally:
        broker.stop_broker(settings)
