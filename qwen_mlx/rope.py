"""Rotary position embeddings for Qwen3: the default kind and static YaRN, both on `mx.fast.rope`.

Design decisions:
- YaRN follows transformers' `_compute_yarn_parameters` exactly (correction range, `truncate`,
  `attention_factor` or the mscale rule, `factor` derived from the context lengths when absent), so that
  the logits match the reference past `original_max_position_embeddings`. The attention factor scales
  cos and sin in transformers; scaling the rotated features before the kernel is the same thing.
- Written here rather than taken from mlx-lm because mlx-lm is not a runtime dependency, and its
  Qwen3-MoE ignores `rope_scaling` altogether.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn


class YarnRoPE(nn.Module):
    def __init__(self, dims: int, base: float, scaling: dict[str, Any], max_position_embeddings: int):
        super().__init__()
        self.dims = dims
        original = scaling.get("original_max_position_embeddings") or max_position_embeddings
        factor = scaling.get("factor") or max_position_embeddings / original
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        self.attention_factor = float(attention_factor)

        def correction_dim(rotations: float) -> float:
            return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dims - 1)
        if low == high:
            high += 0.001  # the reference's guard against a zero-width ramp

        ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
        extrapolation = 1.0 - ramp  # weight of the original frequencies, per pair of dims
        periods = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        inv_freq = (1.0 / (factor * periods)) * (1 - extrapolation) + (1.0 / periods) * extrapolation
        # mx.fast.rope takes periods (1 / inverse frequency); the leading underscore keeps them out of
        # the parameters, so they are neither saved nor loaded.
        self._freqs = 1.0 / inv_freq

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if self.attention_factor != 1.0:
            x = x * self.attention_factor
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs)


def make_rope(dims: int, base: float, scaling: dict[str, Any] | None, max_position_embeddings: int) -> nn.Module:
    """The RoPE module for a config; `ModelArgs` has already refused rope types not handled here."""
    rope_type = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if rope_type == "yarn":
        return YarnRoPE(dims, base, scaling, max_position_embeddings)
    return nn.RoPE(dims, traditional=False, base=base)
