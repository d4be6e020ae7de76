"""Float32 parity: qwen_mlx logits against transformers' own Qwen3 / Qwen3-MoE on tiny real checkpoints."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from fixtures import LEGACY_TWINS, VARIANTS

import qwen_mlx
from qwen_mlx.cache import make_cache
from qwen_mlx.checkpoint import check_safetensors

# Both sides run float32. Two tiny layers accumulate ~1e-6..1e-5 of summation-order noise on logits of a
# few units; a wrong rotation, norm or routing weight moves them by 1e-2 or more.
TOLERANCE = 1e-4

YARN_VARIANTS = [name for name in VARIANTS if "yarn" in name]
# Cached-decoding checks: dense, YaRN (cache offset feeds the scaled rotation), and MoE in both layouts.
CACHE_VARIANTS = ["dense_tied", "dense_yarn", "moe_norm_topk", "moe_yarn_hub"]
UNEVEN_CHUNKS = (7, 1, 13, 2, 5)


def logits_of(model: qwen_mlx.Model, batch: Sequence[Sequence[int]], cache: list | None = None) -> np.ndarray:
    out = model(mx.array(batch), cache=cache) if cache is not None else model(mx.array(batch))
    assert out.dtype == mx.float32, f"float32 weights gave {out.dtype} logits"
    return np.array(out)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def decode_in_chunks(model: qwen_mlx.Model, ids: Sequence[int], chunk_sizes: Sequence[int]) -> np.ndarray:
    """Feed `ids` through one cache in the given chunk sizes (the rest one token at a time)."""
    cache = make_cache(model)
    pieces, start = [], 0
    for size in chunk_sizes:
        pieces.append(logits_of(model, [ids[start : start + size]], cache))
        start += size
    while start < len(ids):
        pieces.append(logits_of(model, [ids[start : start + 1]], cache))
        start += 1
    return np.concatenate(pieces, axis=1)


HALF_PRECISION = {"dense_bf16": (mx.bfloat16, "BF16"), "dense_fp16": (mx.float16, "F16")}
# dense_deep exists for the converter's memory test; two tiny layers already cover what it would check here.
FULL_PRECISION = [name for name in VARIANTS if name not in HALF_PRECISION and name != "dense_deep"]


@pytest.mark.parametrize("name", FULL_PRECISION)
def test_logits_match_transformers(name: str, checkpoint, prompt_ids, torch_logits) -> None:
    path = checkpoint(name)
    ours = logits_of(qwen_mlx.load(path), [prompt_ids])
    reference = torch_logits(path, [prompt_ids])
    # Guard against a degenerate fixture that would make the tolerance meaningless.
    assert np.std(reference) > 0.5
    diff = max_abs_diff(ours, reference)
    assert diff <= TOLERANCE, f"{name}: max |Δ| = {diff:.3g} > {TOLERANCE}"


@pytest.mark.parametrize("name", list(HALF_PRECISION))
def test_half_precision_checkpoints(name: str, checkpoint, prompt_ids, torch_logits) -> None:
    # transformers upcasts the stored weights to float32 exactly; so do we with dtype="float32".
    path = checkpoint(name)
    dtype, stored = HALF_PRECISION[name]
    assert {d for d, _ in check_safetensors(path / "model.safetensors").values()} == {stored}
    reference = torch_logits(path, [prompt_ids])
    upcast = logits_of(qwen_mlx.load(path, dtype="float32"), [prompt_ids])
    diff = max_abs_diff(upcast, reference)
    assert diff <= TOLERANCE, f"{name} upcast to float32: max |Δ| = {diff:.3g} > {TOLERANCE}"
    # Loaded as stored, the model computes in its own precision, as mlx-lm does: its logits are the oracle
    # there (torch's float32 ones differ by the half-precision rounding, ~0.1 in bfloat16).
    model = qwen_mlx.load(path)
    native = model(mx.array([prompt_ids]))
    assert native.dtype == dtype and model.model.embed_tokens.weight.dtype == dtype
    mlx_lm_model, _ = mlx_lm.load(str(path))
    reference = np.array(mlx_lm_model(mx.array([prompt_ids])).astype(mx.float32))
    diff = max_abs_diff(np.array(native.astype(mx.float32)), reference)
    assert diff <= 1e-3, f"{name} computed in {dtype}: max |Δ| against mlx-lm = {diff:.3g}"


@pytest.mark.parametrize("name", YARN_VARIANTS)
def test_yarn_past_original_context(name: str, checkpoint, prompt_ids, torch_logits) -> None:
    path = checkpoint(name)
    config = json.loads((path / "config.json").read_text())
    rope = config.get("rope_parameters") or config["rope_scaling"]
    original = rope["original_max_position_embeddings"]
    assert rope["rope_type"] == "yarn" and len(prompt_ids) > original
    ours = logits_of(qwen_mlx.load(path), [prompt_ids])[:, original:]
    reference = torch_logits(path, [prompt_ids])[:, original:]
    diff = max_abs_diff(ours, reference)
    assert diff <= TOLERANCE, f"{name}: positions ≥ {original}: max |Δ| = {diff:.3g}"


@pytest.mark.parametrize("legacy, twin", sorted(LEGACY_TWINS.items()))
def test_legacy_config_layout_is_the_same_model(legacy: str, twin: str, checkpoint, prompt_ids, torch_logits) -> None:
    # Same weights, config in transformers 4.x vs 5.x layout: transformers and we must both read them alike.
    legacy_path, twin_path = checkpoint(legacy), checkpoint(twin)
    assert "rope_parameters" not in json.loads((legacy_path / "config.json").read_text())
    np.testing.assert_array_equal(torch_logits(legacy_path, [prompt_ids]), torch_logits(twin_path, [prompt_ids]))
    ours_legacy = logits_of(qwen_mlx.load(legacy_path), [prompt_ids])
    ours_twin = logits_of(qwen_mlx.load(twin_path), [prompt_ids])
    assert max_abs_diff(ours_legacy, ours_twin) == 0.0


@pytest.mark.parametrize("name", CACHE_VARIANTS)
def test_incremental_decoding_matches_full_forward(name: str, checkpoint, prompt_ids) -> None:
    model = qwen_mlx.load(checkpoint(name))
    full = logits_of(model, [prompt_ids])
    prefill_then_steps = decode_in_chunks(model, prompt_ids, [30])
    diff = max_abs_diff(prefill_then_steps, full)
    assert diff <= TOLERANCE, f"{name}: prefill 30 + single steps: max |Δ| = {diff:.3g}"
    uneven = decode_in_chunks(model, prompt_ids, UNEVEN_CHUNKS)
    diff = max_abs_diff(uneven, full)
    assert diff <= TOLERANCE, f"{name}: chunks {UNEVEN_CHUNKS}: max |Δ| = {diff:.3g}"


@pytest.mark.parametrize("name", ["dense_untied", "moe_no_norm_topk"])
def test_batch_rows_are_independent(name: str, checkpoint, prompt_ids) -> None:
    model = qwen_mlx.load(checkpoint(name))
    single = logits_of(model, [prompt_ids])
    doubled = logits_of(model, [prompt_ids, prompt_ids])
    for row in range(2):
        diff = max_abs_diff(doubled[row : row + 1], single)
        assert diff <= TOLERANCE, f"{name}: identical row {row}: max |Δ| = {diff:.3g}"
    # Two different rows: each must equal its own single-row forward (no mixing across the batch).
    other = list(reversed(prompt_ids))
    mixed = logits_of(model, [prompt_ids, other])
    assert max_abs_diff(mixed[0:1], single) <= TOLERANCE
    assert max_abs_diff(mixed[1:2], logits_of(model, [other])) <= TOLERANCE


def test_fixture_layouts(checkpoint) -> None:
    # The variants must really carry the config layouts the parity tests claim to cover.
    def config_of(name: str) -> dict:
        return json.loads((checkpoint(name) / "config.json").read_text())

    assert "num_local_experts" in config_of("moe_norm_topk") and "rope_parameters" in config_of("moe_norm_topk")
    hub = config_of("moe_hub")
    assert hub["num_experts"] == 4 and "num_local_experts" not in hub and hub["rope_theta"] == 1e6
    assert config_of("moe_yarn_hub")["rope_scaling"]["rope_type"] == "yarn"
    sharded: Path = checkpoint("dense_sharded")
    assert (sharded / "model.safetensors.index.json").exists() and not (sharded / "model.safetensors").exists()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) >= 2
