"""Unified-memory controls for Apple Silicon, harmless elsewhere.

On Metal, a model's weights should stay resident: MLX's wired-memory limit keeps them from being paged
out between tokens, and a model larger than the GPU's recommended working set gets a clear warning
before it thrashes. On other backends (MLX's CPU backend on Linux, CUDA) every function here is a no-op.
"""

from __future__ import annotations

import warnings

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# Past this share of the recommended working set, the KV cache and activations will not fit beside the
# weights.
TIGHT_FRACTION = 0.9


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
