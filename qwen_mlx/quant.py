"""Affine quantization of Qwen3 weights with MLX's own quantized layers, in mlx-lm's on-disk format.

Design decisions:
- MLX's `nn.quantize`, `QuantizedLinear`/`QuantizedEmbedding` and `mx.gather_qmm` do the work; this
  module only decides which module gets which bits and records it the way mlx-lm does: a `quantization`
  block `{"group_size", "bits", "mode", "<module path>": {...}}`, where a per-module entry overrides the
  default (an entry without `mode` is affine).
- Like mlx-lm, a module whose input width is not a multiple of the group size stays in full precision,
  and the MoE router (`mlp.gate`) is kept at 8 bits, group 64: routing decisions are the most
  quantization-sensitive part of the model and the router is tiny.
- Paths are the checkpoint's: a model with fused projections (`qwen_mlx.fuse`) is described by its parts'
  paths (they share their bits, or they would not have been fused), and unfused for quantizing.
- Loading follows mlx-lm's rule: a module is quantized when the block names it or its `.scales` tensor
  is on disk, with bits and group size read back from the tensor shapes where the block is silent.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import QwenMLXError
from .fuse import fuse, is_fused, unfuse, unfused_modules

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
ROUTER_QUANTIZATION = {"group_size": 64, "bits": 8}

# A recipe maps a module path to True (the default bits), False (keep full precision) or a
# {"bits", "group_size"} dict.
Recipe = Callable[[str], "bool | dict[str, Any]"]


def check_bits(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QwenMLXError(f"cannot quantize to {bits} bits; choose one of {', '.join(map(str, SUPPORTED_BITS))}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise QwenMLXError(
            f"group size {group_size} is not supported; choose one of {', '.join(map(str, SUPPORTED_GROUP_SIZES))}"
        )


def is_quantized(model: nn.Module) -> bool:
    return any(k.endswith(".scales") for k, _ in tree_flatten(model.parameters()))


def quantization_plan(
    model: nn.Module, bits: int, group_size: int = 64, recipe: Recipe | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
    """Decide each module's quantization without touching weights.

    Returns the config's `quantization` block and `{module path: {"group_size", "bits"}}` for every module
    to quantize. The model may be lazy (never evaluated): only parameter shapes are read.
    """
    check_bits(bits, group_size)
    block: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    plan: dict[str, dict[str, int]] = {}
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized"):
            continue
        choice = recipe(path) if recipe else True
        if path.endswith("mlp.gate"):
            choice = dict(ROUTER_QUANTIZATION)
        if choice is False:
            continue
        params = choice if isinstance(choice, dict) else block
        if module.weight.shape[-1] % params["group_size"]:
            continue
        if isinstance(choice, dict):
            block[path] = dict(choice)
        plan[path] = {"group_size": params["group_size"], "bits": params["bits"]}
    return block, plan


def quantize_model(model: nn.Module, bits: int, group_size: int = 64, recipe: Recipe | None = None) -> dict:
    """Quantize `model` in place (lazily) and return its config's `quantization` block."""
    fused = is_fused(model)
    unfuse(model)  # the plan and the recipe name the checkpoint's modules
    block, plan = quantization_plan(model, bits, group_size, recipe)
    nn.quantize(model, group_size, bits, mode="affine", class_predicate=lambda path, _: plan.get(path, False))
    if fused:
        fuse(model)
    return block


def quantization_block(model: nn.Module) -> dict | None:
    """The config's `quantization` block that describes `model` as it is (None for a float model): the most
    common bits and group size, and an entry for each module quantized otherwise."""
    found = {
        path: (module.group_size, module.bits)
        for path, module in unfused_modules(model)
        if "scales" in module and hasattr(module, "bits") and hasattr(module, "group_size")
    }
    if not found:
        return None
    (group_size, bits), _ = Counter(found.values()).most_common(1)[0]
    block: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for path, (g, b) in sorted(found.items()):
        if (g, b) != (group_size, bits):
            block[path] = {"group_size": g, "bits": b}
    return block


def check_saved_block(block: Any, source: str) -> None:
    """A config's `quantization` block must describe affine quantization, the only kind we read."""
    if not isinstance(block, dict):
        raise QwenMLXError(f"{source}: 'quantization' must be an object")
    if block.get("mode", "affine") != "affine" or "group_size" not in block or "bits" not in block:
        raise QwenMLXError(
            f"{source}: quantization {block!r} is not supported; qwen-mlx reads affine quantization "
            "(mode 'affine' with group_size and bits), as written by mlx-lm and qwen-mlx"
        )


def saved_module_quantization(
    block: dict, path: str, in_dims: int, weights: dict[str, mx.array], source: str
) -> dict[str, int] | None:
    """`{"group_size", "bits"}` of module `path` as stored on disk, or None when it is full precision.

    mlx-lm's rule: the block's entry for the module wins; otherwise a module with a `.scales` tensor is
    quantized, with bits and group size read back from the packed shapes.
    """
    entry = block.get(path)
    if isinstance(entry, dict):
        if entry.get("mode", "affine") != "affine":
            raise QwenMLXError(
                f"{source}: module {path} uses quantization mode {entry['mode']!r}; only affine is supported"
            )
        return {"group_size": entry["group_size"], "bits": entry["bits"]}
    if entry is True:
        return {"group_size": block["group_size"], "bits": block["bits"]}
    if entry is False or f"{path}.scales" not in weights:
        return None
    group_size = in_dims // weights[f"{path}.scales"].shape[-1]
    bits = weights[f"{path}.weight"].shape[-1] * 32 // in_dims
    return {"group_size": group_size, "bits": bits}


def apply_saved_quantization(model: nn.Module, block: dict, weights: dict[str, mx.array], source: str) -> None:
    """Replace the modules that are quantized on disk by quantized ones with the saved shapes."""
    check_saved_block(block, source)

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized"):
            return False
        return saved_module_quantization(block, path, module.weight.shape[-1], weights, source) or False

    nn.quantize(model, block["group_size"], block["bits"], mode="affine", class_predicate=predicate)


def parameter_count(model: nn.Module) -> int:
    """Logical parameters, counting each packed quantized weight at its unpacked size."""
    total = 0
    for _, module in model.named_modules():
        for name, value in module.items():
            if not isinstance(value, mx.array) or name in ("scales", "biases"):
                continue
            if name == "weight" and hasattr(module, "bits") and "scales" in module:
                total += value.size * 32 // module.bits
            else:
                total += value.size
    return total


def bits_per_weight(model: nn.Module) -> float:
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return nbytes * 8 / parameter_count(model)
