"""Fused projections (`qwen_mlx.fuse`): the same logits and tokens as unfused, the same files when saved."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors import safe_open

import qwen_mlx
from qwen_mlx.cache import make_cache
from qwen_mlx.fuse import fuse, is_fused, unfuse, unfused_parameters
from qwen_mlx.quant import bits_per_weight, parameter_count, quantization_block, quantize_model

# Float32 both sides; concatenating rows changes no summation, so only a kernel's blocking could differ.
TOLERANCE = 1e-5
# A mixed recipe: layer 0's q/k/v all at 8 bits (they fuse, at 8), layer 1's v_proj alone (it cannot).
MIXED = {"bits": 8, "group_size": 64}
MIXED_MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                 "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj")  # fmt: skip


def mixed_recipe(path: str) -> bool | dict:
    return dict(MIXED) if path in MIXED_MODULES else True


def both(path: Path, **options) -> tuple[qwen_mlx.Model, qwen_mlx.Model]:
    return qwen_mlx.load(path, **options), qwen_mlx.load(path, fuse=False, **options)


def assert_same_logits(fused, unfused, ids: list[int]) -> None:
    a, b = np.array(fused(mx.array([ids]))), np.array(unfused(mx.array([ids])))
    assert a.dtype == np.float32 and np.std(b) > 0.1
    assert float(np.max(np.abs(a - b))) <= TOLERANCE


def greedy(model, prompt: list[int], count: int, kv_bits: int | None = None) -> list[int]:
    cache = make_cache(model, kv_bits)
    logits = model(mx.array([prompt]), cache)[:, -1]
    out: list[int] = []
    while len(out) < count:
        out.append(mx.argmax(logits, axis=-1).item())
        logits = model(mx.array([out[-1:]]), cache)[:, -1]
    return out


def fused_layers(model) -> dict[str, str]:
    """`{module path: fused layer name}` for every module that holds a fused layer."""
    return {path: m.fusion.name for path, m in model.named_modules() if getattr(m, "fusion", None) is not None}


@pytest.mark.parametrize(
    "name, bits, kv_bits",
    [
        ("dense_untied", None, None),
        ("dense_tied", 4, None),
        ("dense_untied", 8, None),
        ("dense_wide", 4, 8),  # head_dim 32: a quantized KV cache
        ("moe_norm_topk", None, None),
        ("moe_norm_topk", 4, None),
        ("moe_mlp_only", 8, None),  # a dense MLP layer among MoE ones
    ],
)
def test_fused_model_gives_unfused_logits_and_tokens(name, bits, kv_bits, checkpoint, prompt_ids) -> None:
    fused, unfused = both(checkpoint(name), quantize=bits)
    layers = fused_layers(fused)
    assert not is_fused(unfused)
    for i, layer in enumerate(fused.layers):
        assert layers[f"model.layers.{i}.self_attn"] == "qkv_proj" and "q_proj" not in layer.self_attn
        mlp = f"model.layers.{i}.mlp" + (".switch_mlp" if "switch_mlp" in layer.mlp else "")
        assert layers[mlp] == "gate_up_proj"
    assert_same_logits(fused, unfused, prompt_ids)
    assert greedy(fused, prompt_ids[:12], 8, kv_bits) == greedy(unfused, prompt_ids[:12], 8, kv_bits)
    # What reads parameters sees the checkpoint's count, bytes and names.
    assert parameter_count(fused) == parameter_count(unfused)
    assert bits_per_weight(fused) == bits_per_weight(unfused)
    assert list(unfused_parameters(fused)) == [k for k, _ in tree_flatten(unfused.parameters())]


def test_mixed_bits_stay_unfused_and_describe_the_same_block(checkpoint, prompt_ids) -> None:
    # Quantized after loading, from the same float weights on both sides, with v_proj at 8 bits in layer 1.
    fused, unfused = both(checkpoint("dense_untied"))
    block = quantize_model(unfused, 4, recipe=mixed_recipe)
    assert quantize_model(fused, 4, recipe=mixed_recipe) == block
    assert {k for k, v in block.items() if isinstance(v, dict)} == set(MIXED_MODULES)
    layers = fused_layers(fused)
    assert "model.layers.1.self_attn" not in layers  # 4, 4 and 8 bits do not concatenate
    assert fused.layers[1].self_attn.v_proj.bits == 8
    assert layers["model.layers.0.self_attn"] == "qkv_proj" and fused.layers[0].self_attn.qkv_proj.bits == 8
    assert layers["model.layers.1.mlp"] == "gate_up_proj"
    assert quantization_block(fused) == quantization_block(unfused) == block
    assert_same_logits(fused, unfused, prompt_ids)


def test_fusion_leaves_the_random_state_alone(checkpoint) -> None:
    # A seeded sampler draws the same numbers whether the model it follows was fused or not.
    draws = []
    for fuse_projections in (True, False):
        mx.random.seed(7)
        qwen_mlx.load(checkpoint("dense_untied"), fuse=fuse_projections)
        draws.append(mx.random.uniform(shape=(4,)).tolist())
    assert draws[0] == draws[1]


def test_unfuse_restores_the_layout_and_fuse_again_is_exact(checkpoint, prompt_ids) -> None:
    fused, unfused = both(checkpoint("moe_norm_topk"), quantize=4)
    unfuse(fused)
    assert not is_fused(fused)
    assert [k for k, _ in tree_flatten(fused.parameters())] == [k for k, _ in tree_flatten(unfused.parameters())]
    assert_same_logits(fused, unfused, prompt_ids)
    assert is_fused(fuse(fused))
    assert_same_logits(fused, unfused, prompt_ids)


def tensors(folder: Path) -> dict[str, bytes]:
    """Every tensor of a folder's safetensors, as raw bytes with dtype and shape."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "numpy") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                array = f.get_tensor(name)
                out[name] = (str(array.dtype), array.shape, array.tobytes())
    return out


@pytest.mark.parametrize("name, bits", [("dense_untied", 4), ("moe_norm_topk", 8), ("dense_tied", None)])
def test_saving_a_fused_model_writes_what_was_loaded(name, bits, checkpoint, tmp_path) -> None:
    # The loaded folder is mlx-lm's format, written from an unfused model; the fused load saves it back.
    source = qwen_mlx.save(qwen_mlx.load_model(checkpoint(name), quantize=bits, fuse=False), tmp_path / "source")
    loaded = qwen_mlx.load_model(source)
    assert is_fused(loaded.model)
    out = qwen_mlx.save(loaded, tmp_path / "out")
    assert tensors(out) == tensors(source)
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    for file in ("config.json", "model.safetensors.index.json"):
        assert json.loads((out / file).read_text()) == json.loads((source / file).read_text()), file
    # A bare fused model is described from its shapes as the unfused one is: the parts' names, their bits.
    bare = qwen_mlx.save(loaded.model, tmp_path / "bare")
    assert tensors(bare) == tensors(source)
    assert json.loads((bare / "config.json").read_text()).get("quantization") == quantization_block(
        qwen_mlx.load(source, fuse=False)
    )


def test_saving_a_fused_hugging_face_checkpoint_keeps_its_tensors(checkpoint, tmp_path) -> None:
    source = checkpoint("dense_untied")
    out = qwen_mlx.save(qwen_mlx.load_model(source), tmp_path / "out")
    assert tensors(out) == tensors(source)
