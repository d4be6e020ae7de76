"""Stacked expert weights for Qwen3-MoE, computed with MLX's gather matmuls.

Design decisions:
- All experts of a projection live in one `[experts, out, in]` tensor (mlx-lm's `switch_mlp` layout, so
  mlx-community checkpoints load unchanged) and are applied with `mx.gather_mm` / `mx.gather_qmm`: one
  kernel call per projection, never a Python loop over experts.
- For long prompts the (token, expert) pairs are sorted by expert first (`sorted_indices=True`), so each
  expert's weights are read once per run of tokens rather than once per token.
- Written here because mlx-lm is not a runtime dependency; parameter names and shapes match its
  `SwitchLinear` / `QuantizedSwitchLinear` exactly.
- At load the gate and up projections become one `gate_up_proj` (`[experts, 2 * hidden, in]`, see
  `qwen_mlx.fuse`): one gather matmul reads both, and its output is split in two.
- `swiglu` is compiled (shapeless, as mlx-lm's is): silu and the product run as one elementwise kernel.
  Measured on the CPU backend it gives the same bits as the two separate ops in float32, bfloat16 and float16.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn

# Below this many (token, expert) pairs the sort costs more than it saves (decoding, short prompts).
SORT_THRESHOLD = 64


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


class SwitchLinear(nn.Module):
    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine") -> QuantizedSwitchLinear:
        num_experts, output_dims, input_dims = self.weight.shape
        quantized = QuantizedSwitchLinear(input_dims, output_dims, num_experts, group_size, bits, mode)
        quantized.set_weight(self.weight)
        return quantized


class QuantizedSwitchLinear(nn.Module):
    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        num_experts: int,
        group_size: int = 64,
        bits: int = 4,
        mode: str = "affine",
    ):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        # Placeholders with the saved shapes; real values arrive through load_weights or set_weight.
        packed = input_dims * bits // 32
        self.weight = mx.zeros((num_experts, output_dims, packed), dtype=mx.uint32)
        self.scales = mx.zeros((num_experts, output_dims, input_dims // group_size))
        self.biases = mx.zeros((num_experts, output_dims, input_dims // group_size))
        self.freeze()

    def set_weight(self, weight: mx.array) -> None:
        self.weight, self.scales, self.biases = mx.quantize(weight, self.group_size, self.bits, mode=self.mode)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.biases,
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )


class SwitchGLU(nn.Module):
    """SwiGLU experts: `down(silu(gate(x)) * up(x))` for each of a token's chosen experts."""

    fusion: Any = None  # gate/up as one `gate_up_proj` (a `qwen_mlx.fuse.Fusion`)

    def __init__(self, input_dims: int, hidden_dims: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(input_dims, hidden_dims, num_experts)
        self.up_proj = SwitchLinear(input_dims, hidden_dims, num_experts)
        self.down_proj = SwitchLinear(hidden_dims, input_dims, num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        # x: (..., D); indices: (..., k) -> (..., k, D)
        x = mx.expand_dims(x, (-2, -3))  # (..., 1, 1, D): one row per token for gather_mm
        indices = mx.stop_gradient(indices)
        do_sort = indices.size >= SORT_THRESHOLD
        if do_sort:
            k = indices.shape[-1]
            flat = indices.flatten()
            order = mx.argsort(flat)
            inverse = mx.argsort(order)
            x = x.flatten(0, -3)[order // k]
            idx = flat[order]
        else:
            idx = indices
        if self.fusion is not None:
            gate, up = self.fusion.split(self.gate_up_proj(x, idx, sorted_indices=do_sort))
        else:
            up = self.up_proj(x, idx, sorted_indices=do_sort)
            gate = self.gate_proj(x, idx, sorted_indices=do_sort)
        x = self.down_proj(swiglu(gate, up), idx, sorted_indices=do_sort)
        if do_sort:
            x = mx.unflatten(x[inverse], 0, indices.shape)
        return x.squeeze(-2)
