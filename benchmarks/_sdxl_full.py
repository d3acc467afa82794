"""Full-size SDXL base and refiner with random weights, for GPU measurements.

Compute and memory do not depend on weight values, so random weights time and fill a GPU the
same as the real ones (configs from ../shared/facts/SDXL.md). Nothing is downloaded: the
tokenizer is the tiny models' byte-level one (token ids stay below every vocabulary size).
`tiny=True` gives the tiny models instead, so each GPU script can be smoke-tested on a CPU.
"""

from __future__ import annotations

import copy
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
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from farm.worker import tiny

BASE_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
REFINER_UNET: dict[str, Any] = dict(
    BASE_UNET, block_out_channels=(384, 768, 1536, 1536),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280,
    projection_class_embeddings_input_dim=2560,
)
VAE: dict[str, Any] = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
CLIP_L: dict[str, Any] = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768,
              max_position_embeddings=77)
CLIP_BIGG: dict[str, Any] = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                 num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
                 projection_dim=1280, max_position_embeddings=77)


def _init_small(module: Any) -> Any:
    """Random weights at a small scale, so fp16 activations stay finite through 70 blocks."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    return module


def build(role: str, dtype: torch.dtype, *, tiny_models: bool = False,
          vae: Any = None, text_encoder_2: Any = None, device: str = "cpu") -> Any:
    """A full-size (or tiny) SDXL pipeline with random weights, on `device`, in `dtype`.
    `vae` and `text_encoder_2` let a refiner share the base's, as the real pair does. Building
    on the GPU takes seconds where filling 3.5 B random weights on a CPU takes minutes."""
    if tiny_models:
        pipe: Any = tiny.make_pipeline("tiny-sdxl" if role == "base" else "tiny-sdxl-refiner")
        return pipe.to(device=device, dtype=dtype)
    torch.manual_seed(0)
    # the scheduler keeps its tables on the CPU, so it is made outside the device context
    scheduler = EulerDiscreteScheduler.from_config(tiny.SCHEDULER_CONFIG)
    with torch.device(device):
        return _build_full(role, dtype, vae, text_encoder_2, scheduler)


def _build_full(role: str, dtype: torch.dtype, vae: Any, text_encoder_2: Any,
                scheduler: Any) -> Any:
    tokenizer = tiny.make_tokenizer()
    vae = vae or _init_small(AutoencoderKL(**VAE)).to(dtype=dtype)
    te2 = text_encoder_2 or _init_small(
        CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))).to(dtype=dtype)
    if role == "base":
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=_init_small(CLIPTextModel(CLIPTextConfig(**CLIP_L))).to(
                dtype=dtype),
            text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer,
            unet=_init_small(UNet2DConditionModel(**BASE_UNET)).to(dtype=dtype),
            scheduler=scheduler, add_watermarker=False)
    return StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tokenizer,
        unet=_init_small(UNet2DConditionModel(**REFINER_UNET)).to(dtype=dtype),
        scheduler=scheduler, requires_aesthetics_score=True, add_watermarker=False)


def tiny_vae(dtype: torch.dtype, *, tiny_models: bool = False, device: str = "cpu") -> Any:
    """TAESD-XL's shape (the real one has 64 channels per block), random weights."""
    if tiny_models:
        small: Any = tiny._tiny_vae()
        return small.to(device=device, dtype=dtype)
    with torch.device(device):
        vae: Any = _init_small(AutoencoderTiny())
    return vae.to(dtype=dtype)


def fp16_fix_vae(vae: Any) -> Any:
    """A copy of `vae` shaped and configured as madebyollin/sdxl-vae-fp16-fix: it decodes in
    fp16 (force_upcast false), where SDXL's own VAE is upcast to fp32 for the decode."""
    fixed = copy.deepcopy(vae)
    fixed.register_to_config(force_upcast=False)
    return fixed


def parameters(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())
