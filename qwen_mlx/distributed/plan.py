"""The plan of a distributed run: the mode, the group `mlx.launch` started, and how the model is split.

Every check that a split is possible (heads, experts, quantization groups, layers) is here, so the launcher
can make it once before any rank starts, and each rank again on what it loaded.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..errors import QwenMLXError

MODES = ("tp", "pp")
LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Plan:
    """How this rank takes part: the mode, the group, and (pipeline) the layers each rank runs."""

    mode: str
    group: Any  # mx.distributed.Group
    layers: tuple[int, ...] = ()  # pp: number of layers per rank, in rank order

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    def stage(self) -> tuple[int, int]:
        """The layers [start, stop) this rank runs (pipeline)."""
        start = sum(self.layers[: self.rank])
        return start, start + self.layers[self.rank]


def in_a_rank() -> bool:
    """True inside a process started by `mlx.launch` (it sets MLX_RANK)."""
    return "MLX_RANK" in os.environ


def join(mode: str) -> Any:
    """This process's group: the ranks `mlx.launch` started (backend from MLX_DISTRIBUTED_BACKEND or any)."""
    if mode not in MODES:
        raise QwenMLXError(f"--distributed {mode!r} is not a mode: use tp (tensor parallel) or pp (pipeline)")
    backend = os.environ.get("QWEN_MLX_BACKEND", "any")
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as error:
        raise QwenMLXError(f"could not join the distributed run ({error})") from None
    if group.size() < 2:
        raise QwenMLXError("--distributed needs at least 2 ranks: give --hostfile with 2 or more hosts, or --ranks N")
    return group


def divisors_up_to(value: int, limit: int = 16) -> list[int]:
    return [n for n in range(2, limit + 1) if value % n == 0]


def check_tensor_parallel(args, n: int, group_size: int | None = None) -> None:
    """Refuse a rank count that does not split this model evenly, saying what would."""
    needs = [("key-value heads", args.num_key_value_heads), ("attention heads", args.num_attention_heads)]
    dense_layers = [i for i in range(args.num_hidden_layers) if not args.is_sparse_layer(i)]
    if dense_layers:
        needs.append(("MLP width (intermediate_size)", args.intermediate_size))
    if args.num_experts:
        needs.append(("experts", args.num_experts))
    for what, value in needs:
        if value % n:
            fits = [d for d in divisors_up_to(math.gcd(*(v for _, v in needs))) if d > 1]
            hint = f"use {' or '.join(map(str, fits))} ranks" if fits else "no rank count splits it evenly"
            raise QwenMLXError(
                f"tensor parallelism over {n} ranks needs the model's {what} ({value}) to divide by {n}: "
                f"{hint}, or choose --distributed pp, which has no such limit"
            )
    if group_size:  # a quantized row cut must fall on a quantization group boundary
        widths = [("attention output", args.num_attention_heads * args.head_dim)]
        if dense_layers:
            widths.append(("MLP width", args.intermediate_size))
        for what, width in widths:
            if (width // n) % group_size:
                raise QwenMLXError(
                    f"tensor parallelism over {n} ranks would cut the {what} ({width}) into pieces of "
                    f"{width // n}, not a multiple of the quantization group ({group_size}); use fewer ranks "
                    "or --distributed pp"
                )


def split_layers(num_layers: int, n: int, layers: str | None = None, weights: list[float] | None = None) -> tuple:
    """Layers per rank: `--layers 10,18` as given, else in proportion to `weights` (free memory), else even."""
    if layers:
        try:
            split = tuple(int(part) for part in layers.split(","))
        except ValueError:
            raise QwenMLXError(f"--layers {layers!r} must be whole numbers separated by commas, one per rank") from None
        if len(split) != n or any(s < 1 for s in split) or sum(split) != num_layers:
            raise QwenMLXError(
                f"--layers {layers} must give each of the {n} ranks at least one layer and add up to the "
                f"model's {num_layers} layers"
            )
        return split
    if num_layers < n:
        raise QwenMLXError(f"the model has {num_layers} layers, too few for {n} pipeline stages; use fewer ranks")
    weights = weights if weights and all(w > 0 for w in weights) else [1.0] * n
    total = sum(weights)
    exact = [num_layers * w / total for w in weights]
    split = [max(1, int(e)) for e in exact]
    while sum(split) < num_layers:  # largest remainder first
        i = max(range(n), key=lambda r: exact[r] - split[r])
        split[i] += 1
    while sum(split) > num_layers:
        i = max((r for r in range(n) if split[r] > 1), key=lambda r: split[r] - exact[r])
        split[i] -= 1
    return tuple(split)


def free_memory() -> float:
    """What this host can give the model, in bytes: the GPU working set on Metal, else physical memory."""
    if mx.metal.is_available():
        return float(mx.device_info().get("max_recommended_working_set_size", 0))
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (ValueError, OSError):
        return 0.0


def quantization_group(config: dict, quantize: int | None, group_size: int = 64) -> int | None:
    """The quantization group a tensor-parallel cut must respect: the checkpoint's, or the one it is
    quantized to on load; None for float weights."""
    return (config.get("quantization") or {}).get("group_size") or (group_size if quantize else None)


def plan(mode: str, args, layers: str | None = None, group_size: int | None = None) -> Plan:
    group = join(mode)
    n = group.size()
    if mode == "tp":
        check_tensor_parallel(args, n, group_size)
        return Plan(mode, group)
    weights = None
    if not layers:
        # Every rank learns every host's memory, so all compute the same split.
        mine = mx.zeros((n,), mx.float32).at[group.rank()].add(free_memory() / (1 << 30))
        weights = mx.distributed.all_sum(mine, group=group).tolist()
    return Plan(mode, group, split_layers(args.num_hidden_layers, n, layers, weights))


def stage_names(plan: Plan):
    """(keep(name), rename(name)) for the tensors of this pipeline stage, renumbered from 0."""
    start, stop = plan.stage()

    def keep(name: str) -> bool:
        m = LAYER_NAME.match(name)
        return m is None or start <= int(m.group(1)) < stop

    def rename(name: str) -> str:
        m = LAYER_NAME.match(name)
        return name if m is None else f"model.layers.{int(m.group(1)) - start}.{name[m.end() :]}"

    return keep, rename
