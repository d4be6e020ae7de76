"""Unified-memory controls for Apple Silicon, harmless elsewhere.

On Metal, a model's weights should stay resident: MLX's wired-memory limit keeps them from being paged
out between tokens, and a model larger than the GPU's recommended working set gets a clear warning
before it thrashes. On other backends (MLX's CPU backend on Linux, CUDA) `check_fits` is a no-op.

"Will it fit" (`estimate`) is arithmetic on a model's shapes (`ModelShape`, read from config.json and
the safetensors headers by `qwen_mlx.models`, no weight read), so `list`, `info` and a model picker can
ask it of every model on disk:
- weights: the bytes the headers declare (what MLX maps, exactly);
- KV cache: 2 * layers * kv_heads * head_dim values a token, in the activation dtype or 4/8-bit with a
  scale and bias per group, in mlx-lm's 256-token allocation steps, plus one layer's copy while it grows;
- activations: the peak of one prefill chunk (the engine evaluates only the cache for all but the last
  token): the attention scores (chunk x heads x context, unless Metal's fused kernel computes them in
  tiles), the causal mask, the chunk's hidden tensors, and one row of float32 logits over the vocabulary;
- the budget: Metal's recommended working set, else the memory Linux says is available.
It models what the engine does, so it is checked against MLX's measured peak (tests/test_models.py).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# Past this share of the recommended working set, the KV cache and activations will not fit beside the
# weights.
TIGHT_FRACTION = 0.9
KV_STEP = 256  # mlx-lm's KVCache grows its buffers in steps of this many tokens
KV_GROUP_SIZE = 64  # qwen_mlx.cache's group for a quantized KV cache (capped at head_dim)
PREFILL_STEP_SIZE = 2048  # qwen_mlx.engine's chunk (repeated: the engine imports this module's users)
FUSED_ATTENTION_HEAD_DIMS = (64, 80, 128)  # Metal's fused prefill attention; elsewhere scores are materialized
LOGITS_BYTES = 4  # the last token's logits and log-probabilities are float32


class MemoryWarning(UserWarning):
    """The model will not fit (or only just fits) in this Mac's GPU memory."""


def model_nbytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def metal_working_set() -> int | None:
    """The GPU's recommended working set in bytes on Metal; None on other backends."""
    if not mx.metal.is_available():
        return None
    return int(mx.device_info().get("max_recommended_working_set_size", 0)) or None


def check_fits(model: nn.Module) -> None:
    """Warn when the weights will not fit; on Metal, wire memory up to the recommended working set."""
    limit = metal_working_set()
    if limit is None:
        return
    need = model_nbytes(model)
    gib = 1 << 30
    if need > limit:
        warnings.warn(
            f"the model needs {need / gib:.1f} GiB but this Mac's GPU can keep about {limit / gib:.1f} GiB "
            "resident: it will swap and be very slow; use a 4-bit or smaller model",
            MemoryWarning,
            stacklevel=3,
        )
    elif need > TIGHT_FRACTION * limit:
        warnings.warn(
            f"the model needs {need / gib:.1f} GiB of the {limit / gib:.1f} GiB this Mac's GPU can keep "
            "resident: little is left for the context; long prompts may be slow",
            MemoryWarning,
            stacklevel=3,
        )
    mx.set_wired_limit(limit)


@dataclass
class ModelShape:
    """What the memory estimate needs to know about a model, from its config and safetensors headers."""

    weights_bytes: int
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    mlp_width: int  # intermediate_size, or experts_per_token * moe_intermediate_size (+ the router's scores)
    activation_bytes: int  # 2 for bf16/fp16 activations, 4 for float32
    context_length: int


@dataclass
class Estimate:
    context: int
    kv_bits: int | None
    weights: int
    kv_cache: int
    activations: int
    budget: int | None

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget


def kv_bytes_per_token(shape: ModelShape, kv_bits: int | None = None) -> float:
    values = 2 * shape.layers * shape.kv_heads * shape.head_dim  # keys and values, every layer
    if kv_bits is None:
        return values * shape.activation_bytes
    group = min(KV_GROUP_SIZE, shape.head_dim)
    return values * (kv_bits / 8 + 2 * shape.activation_bytes / group)  # packed values, then scales and biases


def memory_budget() -> int | None:
    """Bytes a model may use: Metal's recommended working set, else Linux's MemAvailable (or free pages)."""
    if (working_set := metal_working_set()) is not None:
        return working_set
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def estimate(
    shape: ModelShape,
    context: int,
    kv_bits: int | None = None,
    *,
    prefill_step_size: int = PREFILL_STEP_SIZE,
    budget: int | None = None,
    fused_attention: bool | None = None,
) -> Estimate:
    """Peak memory to hold the model and prefill `context` tokens, from the shapes alone."""
    context = max(1, context)
    kv = math.ceil(kv_bytes_per_token(shape, kv_bits) * math.ceil(context / KV_STEP) * KV_STEP)
    growing = kv // shape.layers  # a layer's buffer and its longer copy are both alive for a moment
    chunk = min(prefill_step_size, context)
    if fused_attention is None:
        fused_attention = mx.metal.is_available() and shape.head_dim in FUSED_ATTENTION_HEAD_DIMS
    scores = 0 if fused_attention else chunk * shape.attention_heads * context * shape.activation_bytes
    mask = chunk * context  # the causal mask, one byte a position
    qkv = (shape.attention_heads + 2 * shape.kv_heads) * shape.head_dim
    hidden = chunk * (4 * shape.hidden_size + 2 * qkv + 3 * shape.mlp_width) * shape.activation_bytes
    logits = 2 * shape.vocab_size * LOGITS_BYTES
    return Estimate(
        context=context,
        kv_bits=kv_bits,
        weights=shape.weights_bytes,
        kv_cache=kv,
        activations=growing + scores + mask + hidden + logits,
        budget=budget,
    )


def largest_context(shape: ModelShape, budget: int, kv_bits: int | None = None, **options) -> int:
    """The longest context (up to the model's own) whose estimate fits `budget`; 0 when none does."""
    low, high = 0, shape.context_length
    while low < high:  # the estimate grows with the context: bisect
        middle = (low + high + 1) // 2
        if estimate(shape, middle, kv_bits, **options).total <= budget:
            low = middle
        else:
            high = middle - 1
    return low
