"""Quantized weights against mlx-lm, the reference for the on-disk format.

Both directions: a checkpoint `mlx_lm.convert` quantizes loads in qwen_mlx with mlx-lm's logits, and a
checkpoint qwen_mlx quantizes and saves loads in `mlx_lm.load` with ours.
"""

from __future__ import annotations

import gc
import json

import mlx.core as mx
import numpy as np
import pytest
from fixtures import assert_same_logits, mlx_logits
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load
from safetensors import safe_open

import qwen_mlx
from qwen_mlx.fuse import unfused_modules
from qwen_mlx.quant import bits_per_weight


@pytest.mark.parametrize(
    "name, bits, group_size",
    [
        ("dense_untied", 4, 64),
        ("dense_tied", 8, 64),
        ("dense_wide", 4, 128),
        ("dense_sharded", 8, 32),
        # mlx-lm reads only the `num_experts` spelling of real Qwen3 MoE repos.
        ("moe_hub", 4, 64),
        ("moe_hub", 8, 32),
    ],
)
def test_mlx_lm_converted_checkpoint_gives_mlx_lm_logits(name, bits, group_size, mlx_lm_converted, prompt_ids) -> None:
    path = mlx_lm_converted(name, bits, group_size)
    quantization = json.loads((path / "config.json").read_text())["quantization"]
    assert (quantization["bits"], quantization["group_size"]) == (bits, group_size)

    ours = qwen_mlx.load(path)
    # float32 scales and biases: two 32-bit numbers per group on top of the packed weights (norms are tiny).
    assert abs(bits_per_weight(ours) - (bits + 64 / group_size)) < 0.05
    reference, _ = mlx_lm_load(str(path))
    assert_same_logits(mlx_logits(ours, prompt_ids), mlx_logits(reference, prompt_ids), f"{name} {bits}-bit")


def test_mlx_lm_mixed_precision_recipe(mlx_lm_converted, prompt_ids) -> None:
    # mixed_4_6 writes per-module entries into the quantization block: v_proj, down_proj, lm_head at 6 bits.
    path = mlx_lm_converted("dense_wide", 4, 64, "mixed_4_6")
    block = json.loads((path / "config.json").read_text())["quantization"]
    overrides = {k: v for k, v in block.items() if isinstance(v, dict)}
    assert {v["bits"] for v in overrides.values()} >= {4, 6}

    ours = qwen_mlx.load(path)
    modules = dict(unfused_modules(ours))  # by the checkpoint's paths: a fused q/k/v is listed under each part
    for module_path, entry in overrides.items():
        assert modules[module_path].bits == entry["bits"], module_path
    reference, _ = mlx_lm_load(str(path))
    assert_same_logits(mlx_logits(ours, prompt_ids), mlx_logits(reference, prompt_ids), "mixed_4_6")


@pytest.mark.parametrize(
    "name, bits, group_size",
    [
        ("dense_untied", 4, 64),
        ("dense_tied", 8, 64),
        ("dense_wide", 4, 128),
        ("dense_wide", 8, 32),
        ("moe_norm_topk", 4, 64),
        ("moe_sparse_step2", 8, 128),
        ("moe_mlp_only", 4, 32),
    ],
)
def test_our_quantized_save_loads_in_mlx_lm(name, bits, group_size, checkpoint, prompt_ids, tmp_path) -> None:
    ours = qwen_mlx.load_model(checkpoint(name), quantize=bits, group_size=group_size)
    expected = mlx_logits(ours.model, prompt_ids)
    out = qwen_mlx.save(ours, tmp_path / "saved")

    config = json.loads((out / "config.json").read_text())
    block = config["quantization"]
    assert (block["bits"], block["group_size"], block["mode"]) == (bits, group_size, "affine")
    assert config["quantization_config"] == block
    if "moe" in name:
        # The router stays at 8 bits, group 64, and says so in the block as mlx-lm does.
        assert block["model.layers.1.mlp.gate"] == {"group_size": 64, "bits": 8}
        assert config["num_experts"] == ours.model.args.num_experts
    with safe_open(str(next(out.glob("*.safetensors"))), "np") as f:
        assert f.metadata() == {"format": "mlx"}

    reloaded = qwen_mlx.load(out)
    assert_same_logits(mlx_logits(reloaded, prompt_ids), expected, f"{name}: reloaded by qwen_mlx")
    reference, _ = mlx_lm_load(str(out))
    assert_same_logits(mlx_logits(reference, prompt_ids), expected, f"{name}: loaded by mlx_lm")


def test_quantized_logits_stay_close_to_full_precision(checkpoint, prompt_ids) -> None:
    # Not a parity check: a sanity bound that catches quantizing the wrong axis or dropping scales. Random
    # Gaussian weights quantize worse than trained ones, hence the loose 4-bit bound.
    path = checkpoint("dense_wide")
    full = mlx_logits(qwen_mlx.load(path), prompt_ids)
    for bits, min_correlation in ((8, 0.999), (4, 0.85)):
        quantized = mlx_logits(qwen_mlx.load(path, quantize=bits), prompt_ids)
        correlation = np.corrcoef(quantized.ravel(), full.ravel())[0, 1]
        assert correlation > min_correlation, f"{bits}-bit logits correlate {correlation:.4f} with full precision"


def test_quantizing_on_load_never_holds_the_full_model(checkpoint) -> None:
    path = checkpoint("dense_wide")
    full_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    held = mx.get_active_memory()  # what earlier tests in this process still hold is not this load's
    model = qwen_mlx.load(path, quantize=4)
    peak = mx.get_peak_memory() - held
    quantized_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    # Two 78 MB embedding matrices dominate: one at a time is materialised, then packed to 4 bits.
    assert quantized_bytes < 0.2 * full_bytes
    assert peak < 0.75 * full_bytes, f"peak {peak / 1e6:.0f} MB for a {full_bytes / 1e6:.0f} MB checkpoint"


@pytest.mark.parametrize("name", ["dense_untied", "moe_yarn"])
def test_full_precision_save_round_trips(name, checkpoint, prompt_ids, tmp_path) -> None:
    # An unquantized MLX folder: the same weights back, YaRN settings kept (mlx-lm's MoE drops them, so
    # only the dense folder is compared with mlx-lm).
    loaded = qwen_mlx.load_model(checkpoint(name))
    expected = mlx_logits(loaded.model, prompt_ids)
    out = qwen_mlx.save(loaded, tmp_path / "saved")
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert (out / "tokenizer.json").is_file()
    np.testing.assert_array_equal(mlx_logits(qwen_mlx.load(out), prompt_ids), expected)
    if name.startswith("dense"):
        reference, _ = mlx_lm_load(str(out))
        assert_same_logits(mlx_logits(reference, prompt_ids), expected, f"{name}: loaded by mlx_lm")
