"""Tiny SDXL-architecture models with seeded random weights, built offline.

No machine here can download weights, yet tests, the demo and the benchmarks must run the same
code as a real SDXL: `from_pretrained` of a diffusers folder, two CLIP text encoders, the
text_time addition embedding, an 8x VAE. So we build SDXL-shaped models small enough for a CPU
and save them in the diffusers layout. The images are noise, but deterministic noise.

Layout follows diffusers' own SDXL fast tests (`get_dummy_components`), except that the VAE has
4 blocks (downscale 8 like SDXL, not 2) and the UNet has SDXL's 3 levels (refiner: 4).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)
from transformers.utils import logging as hf_logging

NAMES = ("tiny-sdxl", "tiny-sdxl-refiner")
# Bump when any config below changes: a folder built by an older recipe is then rebuilt.
RECIPE_VERSION = 2
MARKER = "farm_tiny.json"

# SDXL's own scheduler config (stabilityai/stable-diffusion-xl-base-1.0 scheduler_config.json).
# The DDIM keys matter: built from_config of this, DDIM must not clip samples as it does by default.
SCHEDULER_CONFIG: dict[str, Any] = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
    timestep_spacing="leading", num_train_timesteps=1000, prediction_type="epsilon",
    interpolation_type="linear", use_karras_sigmas=False, clip_sample=False,
    set_alpha_to_one=False, sample_max_value=1.0, skip_prk_steps=True,
)

# text encoders: one small CLIP-L stand-in, one small bigG stand-in (bigger, with projection)
TE1_HIDDEN, TE2_HIDDEN, TE2_PROJECTION = 32, 64, 64
ADD_TIME_DIM = 8
# the byte-level vocabulary of make_tokenizer(): 256 symbols, 256 word ends, then bos and eos
VOCAB_SIZE = 2 * 256 + 2
BOS_ID, EOS_ID = 512, 513
# one seed per component, the same in base and refiner: with equal configs, text_encoder_2 and
# the VAE come out identical in both, as in the real pair (base latents decode with either VAE)
SEEDS = {"text_encoder": 1, "text_encoder_2": 2, "vae": 3, "unet": 4, "refiner_unet": 5,
         "vae_tiny": 6}
# a tiny TAESD-XL stand-in beside the pipeline, for the profiles that swap in the tiny VAE
TINY_VAE_FOLDER = "vae_tiny"

_BUILD_LOCK = threading.Lock()  # the global torch RNG is shared by threads


def build_tiny(name: str, dest: Path) -> Path:
    """Build tiny model `name` into folder `dest` unless a complete one is already there.

    Safe against concurrent builders (threads or processes): each writes a private temp folder
    beside `dest` and renames it into place, so a reader sees no folder or a complete one.
    """
    if name not in NAMES:
        raise ValueError(f"unknown tiny model {name!r} (known: {', '.join(NAMES)})")
    dest = Path(dest)
    if is_complete(dest, name):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _BUILD_LOCK:
        if is_complete(dest, name):
            return dest
        _remove_abandoned(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; it becomes the model folder itself
        try:
            pipe: Any = make_pipeline(name)
            with quiet_progress():
                pipe.save_pretrained(tmp, safe_serialization=True)
                _seeded("vae_tiny", _tiny_vae).save_pretrained(tmp / TINY_VAE_FOLDER,
                                                               safe_serialization=True)
            (tmp / MARKER).write_text(json.dumps({"name": name, "recipe": RECIPE_VERSION}))
            _publish(tmp, dest, name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def is_complete(folder: Path, name: str) -> bool:
    """True if `folder` holds a finished build of `name` by the current recipe."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return bool(marker.get("name") == name and marker.get("recipe") == RECIPE_VERSION)


def _remove_abandoned(dest: Path, age_s: float = 3600.0) -> None:
    # temp folders of builders that were killed mid-way; a live build takes seconds, not an hour
    now = time.time()
    for leftover in dest.parent.glob(f".{dest.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime > age_s:
                shutil.rmtree(leftover, ignore_errors=True)


def _publish(tmp: Path, dest: Path, name: str) -> None:
    """Move a finished build into place; whoever renames first wins, later builds are dropped."""
    if dest.exists() and not is_complete(dest, name):
        # a stale recipe or a foreign leftover: move it aside first (rename is atomic, rmtree
        # is not, so nobody ever sees a half-deleted model at `dest`)
        aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        try:
            os.rename(dest, aside / "model")
        except FileNotFoundError:
            pass  # another builder moved it already
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(tmp, dest)
    except OSError:
        # rename onto a non-empty folder fails: a concurrent builder published first
        if not is_complete(dest, name):
            raise


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Silence diffusers' and transformers' progress bars ("Loading pipeline components",
    "Loading weights", "Writing model shards"): noise in worker logs."""
    saved = hf_logging.is_progress_bar_enabled(), diffusers_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if saved[0]:
            hf_logging.enable_progress_bar()
        if saved[1]:
            diffusers_logging.enable_progress_bar()


def make_pipeline(name: str) -> StableDiffusionXLPipeline | StableDiffusionXLImg2ImgPipeline:
    """The in-memory tiny pipeline (same weights every call)."""
    if name == "tiny-sdxl":
        return StableDiffusionXLPipeline(
            vae=_seeded("vae", _vae),
            text_encoder=_seeded("text_encoder", lambda: CLIPTextModel(_clip_config(TE1_HIDDEN))),
            text_encoder_2=_seeded("text_encoder_2", _text_encoder_2),
            tokenizer=make_tokenizer(),
            tokenizer_2=make_tokenizer(),
            unet=_seeded("unet", _base_unet),
            scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    if name == "tiny-sdxl-refiner":
        # like stabilityai/stable-diffusion-xl-refiner-1.0: no first text encoder, aesthetic
        # score conditioning, empty negative prompts are encoded rather than zeroed
        return StableDiffusionXLImg2ImgPipeline(
            vae=_seeded("vae", _vae),
            text_encoder=None,
            text_encoder_2=_seeded("text_encoder_2", _text_encoder_2),
            tokenizer=None,
            tokenizer_2=make_tokenizer(),
            unet=_seeded("refiner_unet", _refiner_unet),
            scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
            add_watermarker=False,
        )
    raise ValueError(f"unknown tiny model {name!r} (known: {', '.join(NAMES)})")


def make_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over the 256 byte-level symbols, with no merges.

    Every UTF-8 byte has a token (alone and as a word end), so any text at all - emoji, CJK,
    control characters - tokenizes without unknown tokens; words just cost more tokens than with
    CLIP's real 49k merges. Built in memory: nothing to download.
    """
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _seeded(component: str, make: Callable[[], Any]) -> Any:
    torch.manual_seed(SEEDS[component])
    return make()


def _clip_config(hidden: int, projection: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
        hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5,
        hidden_act="gelu", projection_dim=projection or hidden,
    )


def _text_encoder_2() -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(_clip_config(TE2_HIDDEN, TE2_PROJECTION))


def _vae() -> AutoencoderKL:
    # 4 blocks -> 3 downsamples -> latents at H/8 x W/8, as in SDXL
    return AutoencoderKL(
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=128, scaling_factor=0.13025, force_upcast=True,
    )


def _tiny_vae() -> AutoencoderTiny:
    # TAESD's shape (3 upsamplings: 8x, 4 latent channels), far fewer channels
    return AutoencoderTiny(
        in_channels=3, out_channels=3, latent_channels=4,
        encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
    )


def _base_unet() -> UNet2DConditionModel:
    # SDXL base: 3 levels, no attention at the top one; cross-attention over both encoders'
    # hidden states concatenated; 6 time ids (size, crop, target size) + pooled text
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4),
        cross_attention_dim=TE1_HIDDEN + TE2_HIDDEN, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=ADD_TIME_DIM,
        projection_class_embeddings_input_dim=6 * ADD_TIME_DIM + TE2_PROJECTION,
    )


def _refiner_unet() -> UNet2DConditionModel:
    # SDXL refiner: 4 levels, attention in the middle two; only text_encoder_2's hidden states;
    # 5 time ids (size, crop, aesthetic score) + pooled text
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 64, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                          "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=1, attention_head_dim=(1, 2, 4, 4),
        cross_attention_dim=TE2_HIDDEN, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=ADD_TIME_DIM,
        projection_class_embeddings_input_dim=5 * ADD_TIME_DIM + TE2_PROJECTION,
    )
