"""Fused projections, made at load: q/k/v in one matmul, gate/up in one (dense MLPs and the experts' gather).

A decode step reads every weight once; one matmul over the concatenated rows instead of three (or two)
saves the kernel launches and reads the input once. The forward splits the fused output at known offsets.

Design decisions:
- Concatenating along the output rows is exact: each output element depends on its own weight row only,
  and MLX's affine format keeps `scales` and `biases` per output row too, so packed weights, scales and
  biases concatenate as they are, with no requantizing. The same holds for stacked experts
  (`[experts, out, in]`, rows on axis -2) and for one rank's slices after `Model.shard`, which cuts q/k/v
  and gate/up by output rows: each rank fuses its own slices.
- Parts fuse only when they are alike: the same kind of layer, bits, group size, mode, dtypes and input
  width, and no bias. A mixed recipe may give `v_proj` more bits than `q_proj`; that layer stays unfused.
- The fused layer takes its first part's place in its parent, so flattening the parameters and expanding
  each fused layer into its parts gives the unfused names in the unfused order: `unfused_parameters` is
  what saving writes (mlx-lm's format, byte for byte) and `unfused_modules` what describes quantization.
- Layers are built without their constructors, which would draw random initial weights and so move MLX's
  global random state (a seeded run would sample differently with fusion on).
- `unfuse` is the inverse, for what cuts or quantizes by module path (`Model.shard`, `quantize_model`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import AllToShardedLinear, QuantizedAllToShardedLinear
from mlx.utils import tree_flatten

from .experts import QuantizedSwitchLinear, SwitchLinear

# (fused name, the parts it replaces, in output order); a module takes part when it has a `fusion` slot.
FUSIONS = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj")))
# All-to-sharded layers compute `x @ W.T` in the forward (their extra is a gradient all-reduce), so a rank's
# slices fuse into a plain layer.
FUSABLE = (nn.Linear, nn.QuantizedLinear, AllToShardedLinear, QuantizedAllToShardedLinear, SwitchLinear,
           QuantizedSwitchLinear)  # fmt: skip
ROWS = -2  # the output axis of every weight, scale and bias: [out, in] and [experts, out, in]


@dataclass(frozen=True)
class Fusion:
    """Layer `name` holds `parts` (their output rows `rows`) concatenated along the output axis."""

    name: str
    parts: tuple[str, ...]
    rows: tuple[int, ...]

    def split(self, y: mx.array, axis: int = -1) -> list[mx.array]:
        return mx.split(y, list(itertools.accumulate(self.rows[:-1])), axis=axis)


def fuse(model: nn.Module, evaluate: bool = False) -> nn.Module:
    """Fuse every q/k/v and gate/up that can be, in place; return `model`.

    Lazy unless `evaluate`: then each part and each fused layer is evaluated in turn, so loading holds at
    most one fused layer twice (parts read eagerly, e.g. a rank's slices on several Macs, would otherwise
    all be held alongside their fused copies until evaluated).
    """
    for _, module in list(model.named_modules()):
        if not hasattr(module, "fusion") or module.fusion is not None:
            continue
        for name, parts in FUSIONS:
            layers = [module[part] for part in parts if part in module]
            if len(layers) < len(parts) or not _alike(layers):
                continue
            if evaluate:  # each part first: what it is computed from (a rank's expert slices) goes before the join
                for layer in layers:
                    mx.eval(layer.parameters())
            joined = {key: mx.concatenate([layer[key] for layer in layers], axis=ROWS) for key in layers[0]}
            if evaluate:
                mx.eval(joined)
            _replace(module, parts, {name: _layer(layers[0], joined)})
            module.fusion = Fusion(name, parts, tuple(layer["weight"].shape[ROWS] for layer in layers))
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Undo `fuse` in place: every fused layer back into its parts (slices of it); return `model`."""
    for _, module in list(model.named_modules()):
        fusion = getattr(module, "fusion", None)
        if fusion is None:
            continue
        fused = module[fusion.name]
        pieces = {key: fusion.split(value, ROWS) for key, value in fused.items()}
        layers = {part: _layer(fused, {key: pieces[key][i] for key in pieces}) for i, part in enumerate(fusion.parts)}
        _replace(module, (fusion.name,), layers)
        module.fusion = None
    return model


def is_fused(model: nn.Module) -> bool:
    return any(getattr(module, "fusion", None) is not None for _, module in model.named_modules())


def unfused_parameters(model: nn.Module) -> dict[str, mx.array]:
    """`{name: array}` as the unfused model flattens them (mlx-lm's names and order); fused layers split."""
    fusions = _fusions(model)
    out: dict[str, mx.array] = {}
    for name, value in tree_flatten(model.parameters()):
        layer_path, _, key = name.rpartition(".")
        parent, _, layer = layer_path.rpartition(".")
        fusion = fusions.get(parent)
        if fusion is None or layer != fusion.name:
            out[name] = value
            continue
        if f"{parent}.{fusion.parts[0]}.{key}" in out:
            continue  # this fused layer was expanded at its first parameter
        pieces = {k: fusion.split(v, ROWS) for k, v in _module(model, layer_path).items()}
        for i, part in enumerate(fusion.parts):
            for k in pieces:
                out[f"{parent}.{part}.{k}"] = pieces[k][i]
    return out


def unfused_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """`named_modules`, with each fused layer listed under each of its parts' paths (they share its bits)."""
    fusions = _fusions(model)
    for path, module in model.named_modules():
        parent, _, layer = path.rpartition(".")
        fusion = fusions.get(parent)
        if fusion is not None and layer == fusion.name:
            for part in fusion.parts:
                yield f"{parent}.{part}", module
        else:
            yield path, module


def _fusions(model: nn.Module) -> dict[str, Fusion]:
    return {path: m.fusion for path, m in model.named_modules() if getattr(m, "fusion", None) is not None}


def _module(model: nn.Module, path: str) -> nn.Module:
    module = model
    for key in path.split("."):
        module = module[int(key)] if isinstance(module, list) else module[key]
    return module


def _alike(layers: list[nn.Module]) -> bool:
    """Whether `layers` concatenate exactly: same kind, quantization and dtypes, same input width, no bias."""
    first = layers[0]
    keys = list(first.keys())

    def settings(layer: nn.Module) -> tuple:
        return tuple(getattr(layer, name, None) for name in ("bits", "group_size", "mode"))

    def matches(a: mx.array, b: mx.array) -> bool:  # dtype and shape, all but the output rows
        return (
            isinstance(a, mx.array)
            and a.dtype == b.dtype
            and a.shape[:ROWS] + a.shape[-1:] == b.shape[:ROWS] + b.shape[-1:]
        )

    return "bias" not in first and all(
        isinstance(layer, FUSABLE)
        and list(layer.keys()) == keys
        and settings(layer) == settings(first)
        and all(matches(layer[key], first[key]) for key in keys)
        for layer in layers
    )


def _layer(like: nn.Module, params: dict[str, mx.array]) -> nn.Module:
    """A plain layer of `like`'s kind and quantization holding `params` (no constructor: see the docstring)."""
    quantized, stacked = "scales" in params, params["weight"].ndim == 3
    kind = {(False, False): nn.Linear, (True, False): nn.QuantizedLinear, (False, True): SwitchLinear,
            (True, True): QuantizedSwitchLinear}[quantized, stacked]  # fmt: skip
    layer = kind.__new__(kind)
    nn.Module.__init__(layer)
    if quantized:
        layer.group_size, layer.bits, layer.mode = like.group_size, like.bits, getattr(like, "mode", "affine")
    for key, value in params.items():
        setattr(layer, key, value)
    if quantized:
        layer.freeze()  # as MLX's own quantized layers are
    return layer


def _replace(parent: nn.Module, old: tuple[str, ...], new: dict[str, nn.Module]) -> None:
    """Put the `new` layers where `old[0]` was in `parent` (keeping the order of the rest), drop all of `old`."""
    items = list(parent.items())
    parent.clear()
    for key, value in items:
        if key == old[0]:
            for new_key, layer in new.items():
                parent[new_key] = layer
        elif key not in old:
            parent[key] = value
