"""A DeepCache-style feature cache for the `turbo` preset: on most steps, reuse the UNet's deep
features from the last full step and compute only its shallow blocks.

Adjacent denoising steps change the UNet's high-level (deep, low-resolution) features very
little, while its outermost blocks carry the detail (Ma et al., "DeepCache", 2023). In a
diffusers UNet2DConditionModel the skip connections pair each down block with an up block:

    conv_in → down[0] → down[1] … down[-1] → mid → up[0] … up[-2] → up[-1] → conv_out
              └──────────────── skip connections ────────────────────────┘

`up[-1]` needs only `down[0]`'s outputs (and conv_in's) plus whatever `up[-2]` hands it. So on a
cached step:

    1. down[0] runs as usual (its skip outputs feed up[-1]);
    2. down[1:], mid and up[:-2] return placeholders at once (nothing reads them);
    3. up[-2] returns its output from the last full step (the deep feature);
    4. up[-1] and conv_out run as usual.

A full step runs every block and keeps up[-2]'s output. Which UNet call is full: every
`interval`-th, counted from the first call of the denoising loop (one call per step; CFG
batches the conditional and unconditional halves in one call), and any call whose input shape
differs from the cached feature's (the CFG cut-off halves the batch mid-run).

The blocks' `forward` are replaced on the instance while the cache is active (`with
FeatureCache(unet, 2):`) and restored afterwards, so the weights, the state dict and every job
without the cache are untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch

# the intervals a job may ask for (JobSpec.deep_cache); 0: off
MIN_INTERVAL, MAX_INTERVAL = 2, 8


class FeatureCache:
    """Reuse `unet`'s deep features on all but every `interval`-th call, while active.

    `start_step`: the step the denoising loop starts at (a resumed image), so its phase
    matches the uninterrupted run's. The counters say what happened: `full_calls`,
    `cached_calls`, and `deep_calls` (how often the deep up block really ran)."""

    def __init__(self, unet: Any, interval: int, start_step: int = 0) -> None:
        if interval < MIN_INTERVAL:
            raise ValueError(f"a feature cache needs an interval of at least {MIN_INTERVAL}, "
                             f"got {interval}")
        self.unet = getattr(unet, "_orig_mod", unet)  # a torch.compile'd UNet's own module
        if len(self.unet.up_blocks) < 2 or len(self.unet.down_blocks) < 2:
            raise ValueError("a feature cache needs a UNet with at least two levels")
        self.interval = interval
        self.step = start_step
        self.reuse = False
        self.feature: torch.Tensor | None = None
        self.feature_input: tuple[int, ...] | None = None
        self.full_calls = self.cached_calls = self.deep_calls = 0
        self._patched: list[Any] = []
        self._hook: Any = None

    # -- activation ------------------------------------------------------------------------

    def __enter__(self) -> FeatureCache:
        unet = self.unet
        for block in unet.down_blocks[1:]:
            outputs = len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0)
            self._patch(block, self._skip_down(block.forward, outputs))
        if unet.mid_block is not None:
            self._patch(unet.mid_block, self._skip(unet.mid_block.forward))
        for block in unet.up_blocks[:-2]:
            self._patch(block, self._skip(block.forward))
        self._patch(unet.up_blocks[-2], self._deep(unet.up_blocks[-2].forward))
        self._hook = unet.register_forward_pre_hook(self._before_call, with_kwargs=True)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for block in self._patched:
            del block.forward  # the class's own forward again
        self._patched.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.feature = None

    def _patch(self, block: Any, forward: Callable[..., Any]) -> None:
        block.forward = forward
        self._patched.append(block)

    # -- per call --------------------------------------------------------------------------

    def _before_call(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        phase_full = self.step % self.interval == 0
        self.reuse = (not phase_full and self.feature is not None
                      and self.feature_input == tuple(sample.shape))
        if self.reuse:
            self.cached_calls += 1
        else:
            self.full_calls += 1
            self.feature_input = tuple(sample.shape)
        self.step += 1

    def _skip_down(self, forward: Callable[..., Any], outputs: int) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            if self.reuse:  # placeholders: only the skipped up blocks would read them
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                return hidden, (hidden,) * outputs
            return forward(*args, **kwargs)
        return run

    def _skip(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            if self.reuse:
                return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            return forward(*args, **kwargs)
        return run

    def _deep(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            if self.reuse:
                return self.feature
            self.deep_calls += 1
            self.feature = forward(*args, **kwargs)
            return self.feature
        return run
