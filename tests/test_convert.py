"""The converter on real transformers checkpoints: mlx-lm's format, mlx-lm's tensors, FP8, recipes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from fixtures import assert_same_logits, make_fp8_checkpoint, mlx_logits
from mlx_lm import load as mlx_lm_load
from safetensors.torch import load_file

import qwen_mlx
from qwen_mlx.convert import convert
from qwen_mlx.convert.recipes import available_recipes, is_sensitive, load_recipe


def tensors_of(folder: Path) -> dict[str, mx.array]:
    tensors: dict[str, mx.array] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(mx.load(str(file)))
    return tensors


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    a, b = tensors_of(ours), tensors_of(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert mx.array_equal(a[name], b[name]).item(), f"{name} differs from mlx_lm.convert's"


def run_convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwen_mlx.convert", *args, "--quiet"], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def converted(checkpoint, tmp_path_factory):
    """`converted(variant, **options) -> Path`: our conversion, made once per set of options."""
    root = tmp_path_factory.mktemp("converted")
    made: dict[tuple, Path] = {}

    def get(name: str, **options) -> Path:
        key = (name, *sorted(options.items()))
        if key not in made:
            out = root / "-".join(str(part) for part in key).replace("/", "_")
            convert(checkpoint(name), out, evaluate=False, progress=False, **options)
            made[key] = out
        return made[key]

    return get


@pytest.mark.parametrize(
    "name, bits, group_size",
    [("dense_wide", 4, 64), ("dense_wide", 8, 32), ("dense_sharded", 4, 128), ("moe_hub", 4, 64)],
)
def test_quantized_output_equals_mlx_lm_convert_tensor_for_tensor(
    name, bits, group_size, converted, mlx_lm_converted
) -> None:
    ours = converted(name, bits=bits, group_size=group_size)
    theirs = mlx_lm_converted(name, bits, group_size)
    assert_same_tensors(ours, theirs)
    ours_config = json.loads((ours / "config.json").read_text())
    theirs_config = json.loads((theirs / "config.json").read_text())
    assert ours_config["quantization"] == theirs_config["quantization"]
    assert ours_config["quantization_config"] == ours_config["quantization"]


@pytest.mark.parametrize("name, bits", [("dense_untied", 4), ("dense_tied", 8), ("moe_norm_topk", 4), ("moe_yarn", 8)])
def test_converted_folder_loads_in_both_runtimes(name, bits, converted, checkpoint, prompt_ids) -> None:
    out = converted(name, bits=bits)
    ours = mlx_logits(qwen_mlx.load(out), prompt_ids)
    # Loading the float checkpoint quantized on the way in is the same computation as converting it.
    on_load = mlx_logits(qwen_mlx.load(checkpoint(name), quantize=bits), prompt_ids)
    assert_same_logits(ours, on_load, f"{name}: converted vs quantized on load")
    if name != "moe_yarn":  # mlx-lm's Qwen3-MoE ignores YaRN, so it is no oracle there
        reference, _ = mlx_lm_load(str(out))
        assert_same_logits(mlx_logits(reference, prompt_ids), ours, f"{name}: mlx_lm.load")


def test_output_folder_has_everything_mlx_lm_writes(converted) -> None:
    out = converted("dense_sharded", bits=4, max_shard_bytes=4 << 20)
    files = {p.name for p in out.iterdir()}
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for file in ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"):
        assert file in files
    assert {"generation_config.json", "chat_template.jinja", "README.md"} <= files
    assert "{%" in (out / "chat_template.jinja").read_text()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = tensors_of(out)
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    for shard in shards:
        # A shard stays under the limit unless one tensor alone is larger (mlx-lm's rule too).
        assert (out / shard).stat().st_size <= 4 << 20 or len(mx.load(str(out / shard))) == 1
        _, metadata = mx.load(str(out / shard), return_metadata=True)
        assert metadata == {"format": "mlx"}
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mlx\n") and "qwen_mlx.load" in card


def test_mixed_recipe_matches_mlx_lm_and_loads_there(converted, mlx_lm_converted, prompt_ids) -> None:
    ours = converted("dense_wide", bits=4, recipe="mixed_4_6")
    theirs = mlx_lm_converted("dense_wide", 4, 64, "mixed_4_6")
    assert_same_tensors(ours, theirs)
    block = json.loads((ours / "config.json").read_text())["quantization"]
    assert block == json.loads((theirs / "config.json").read_text())["quantization"]
    assert block["lm_head"]["bits"] == 6 and block["model.layers.0.self_attn.q_proj"]["bits"] == 4
    reference, _ = mlx_lm_load(str(ours))
    assert_same_logits(mlx_logits(reference, prompt_ids), mlx_logits(qwen_mlx.load(ours), prompt_ids), "mixed_4_6")


def test_mixed_recipe_on_moe_keeps_the_router_at_8_bits(converted, mlx_lm_converted) -> None:
    # The one documented difference from mlx-lm's recipes: its recipes quantize the router with the body.
    ours = json.loads((converted("moe_hub", bits=4, recipe="mixed_4_6") / "config.json").read_text())["quantization"]
    theirs = mlx_lm_converted("moe_hub", 4, 64, "mixed_4_6")
    theirs = json.loads((theirs / "config.json").read_text())["quantization"]
    routers = {k for k in ours if k.endswith("mlp.gate")}
    assert routers and all(ours[k] == {"group_size": 64, "bits": 8} for k in routers)
    assert all(theirs[k]["bits"] == 4 for k in routers)
    assert {k: v for k, v in ours.items() if k not in routers} == {k: v for k, v in theirs.items() if k not in routers}


def test_mixed_4_8_recipe_gives_embedding_and_head_8_bits(converted) -> None:
    block = json.loads((converted("dense_wide", recipe="mixed_4_8") / "config.json").read_text())["quantization"]
    assert block["bits"] == 4
    assert block["model.embed_tokens"]["bits"] == 8 and block["lm_head"]["bits"] == 8
    sensitive = [k for k in block if k.endswith(("v_proj", "down_proj"))]
    assert sensitive and all(block[k]["bits"] == (8 if is_sensitive(k, 2) else 4) for k in sensitive)


def test_recipes_ship_as_data_files() -> None:
    assert {"mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6", "mixed_4_8"} <= set(available_recipes())
    for name in available_recipes():
        assert load_recipe(name).description
    # mlx-lm's layer rule for a 36-layer model (Qwen3-4B): first/last eighth and every third between.
    chosen = [i for i in range(36) if is_sensitive(f"model.layers.{i}.mlp.down_proj", 36)]
    assert chosen[:6] == [0, 1, 2, 3, 6, 9] and chosen[-4:] == [32, 33, 34, 35]


def test_fp8_checkpoint_dequantizes_within_fp8_rounding(checkpoint, tmp_path, prompt_ids) -> None:
    fp8 = tmp_path / "fp8"
    originals = make_fp8_checkpoint(checkpoint("dense_bf16"), fp8)
    raw = load_file(fp8 / "model.safetensors")
    out = tmp_path / "out"
    convert(fp8, out, evaluate=False, progress=False)
    ours = tensors_of(out)
    assert originals and all(ours[name].dtype == mx.bfloat16 for name in originals)
    for name, original in originals.items():
        # Exactly transformers' own decoding (e4m3 value times its block's scale), rounded to bfloat16.
        rows, cols = original.shape
        scale = raw[f"{name}_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
        expected = (raw[name].float() * scale).to(torch.bfloat16).float().numpy()
        got = np.array(ours[name].astype(mx.float32))
        np.testing.assert_array_equal(got, expected, err_msg=name)
        # Within e4m3's rounding (3 mantissa bits: half a step is 2^-4 relative) of the bf16 original.
        original = original.float().numpy()
        step = np.maximum(np.abs(original), scale.numpy() * 2.0**-6)
        assert np.all(np.abs(got - original) <= step * 2.0**-4 * 1.01 + 1e-6), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    # Close to the bf16 original as a model, too.
    full = mlx_logits(qwen_mlx.load(checkpoint("dense_bf16"), dtype="float32"), prompt_ids)
    decoded = mlx_logits(qwen_mlx.load(out, dtype="float32"), prompt_ids)
    assert np.corrcoef(full.ravel(), decoded.ravel())[0, 1] > 0.99


def test_fp8_moe_checkpoint_quantizes_and_loads_in_mlx_lm(checkpoint, tmp_path, prompt_ids) -> None:
    fp8 = tmp_path / "fp8"
    originals = make_fp8_checkpoint(checkpoint("moe_hub"), fp8)
    assert any(".experts." in name for name in originals)
    out = tmp_path / "out"
    # float32: the experts too narrow for group 64 stay unquantized, and MLX's CPU backend (these test
    # machines) runs gather_mm in float32 only; Metal runs it in bfloat16.
    convert(fp8, out, bits=4, dtype="float32", evaluate=False, progress=False)
    block = json.loads((out / "config.json").read_text())["quantization"]
    assert block["model.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8}
    reference, _ = mlx_lm_load(str(out))
    assert_same_logits(mlx_logits(reference, prompt_ids), mlx_logits(qwen_mlx.load(out), prompt_ids), "fp8 moe")


def test_dequantize_round_trips(converted, prompt_ids, tmp_path) -> None:
    quantized = converted("dense_untied", bits=8, dtype="float32")
    out = tmp_path / "dequantized"
    convert(quantized, out, dequantize=True, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    packed, floats = tensors_of(quantized), tensors_of(out)
    name = "model.layers.0.self_attn.q_proj"
    expected = mx.dequantize(
        packed[f"{name}.weight"], packed[f"{name}.scales"], packed[f"{name}.biases"], group_size=64, bits=8
    )
    assert mx.array_equal(floats[f"{name}.weight"], expected).item()
    assert not any(k.endswith(".scales") for k in floats)
    assert_same_logits(
        mlx_logits(qwen_mlx.load(out), prompt_ids), mlx_logits(qwen_mlx.load(quantized), prompt_ids), "dequantized"
    )


def test_requantizing_an_mlx_folder(converted, prompt_ids, tmp_path) -> None:
    eight = converted("dense_tied", bits=8)
    out = tmp_path / "four"
    convert(eight, out, bits=4, evaluate=False, progress=False)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    reference, _ = mlx_lm_load(str(out))
    assert_same_logits(mlx_logits(reference, prompt_ids), mlx_logits(qwen_mlx.load(out), prompt_ids), "requantized")


def test_cli_with_mlx_lm_spellings(checkpoint, tmp_path) -> None:
    out = tmp_path / "cli"
    result = run_convert("--hf-path", str(checkpoint("dense_tied")), "--mlx-path", str(out), "-q", "--no-eval")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out} (4-bit" in result.stdout
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4


def test_cli_help_explains_each_option_with_examples() -> None:
    for command in ([sys.executable, "-m", "qwen_mlx.convert"], [sys.executable, "-m", "qwen_mlx", "convert"]):
        result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        for flag in ("--q-bits", "--q-group-size", "--dtype", "--recipe", "--dequantize", "--force", "--no-eval"):
            assert flag in result.stdout
        assert "examples:" in result.stdout and "mixed_4_6" in result.stdout


def test_quality_report_is_written_and_4_bit_costs_more_than_8_bit(checkpoint, tmp_path) -> None:
    reports = {}
    for bits in (4, 8):
        out = tmp_path / f"q{bits}"
        result = convert(checkpoint("dense_wide"), out, bits=bits, eval_tokens=48, progress=False)
        saved = json.loads((out / "quantization_report.json").read_text())
        assert saved == pytest.approx(result.report)
        assert saved["tokens"] == 47 and saved["bits_per_weight"] == pytest.approx(result.bits_per_weight)
        assert saved["size_bytes"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))
        assert "KL mean" in (out / "README.md").read_text()
        reports[bits] = saved
    assert reports[4]["kl_mean"] > reports[8]["kl_mean"] > 0
    assert reports[4]["kl_max"] > reports[8]["kl_max"]
    assert reports[8]["top1_agreement"] >= reports[4]["top1_agreement"]
    for report in reports.values():
        assert 0 < report["perplexity_source"] < float("inf") and 0 < report["perplexity_result"] < float("inf")


def test_quality_report_is_skipped_when_the_source_would_not_fit(checkpoint, tmp_path, monkeypatch) -> None:
    from qwen_mlx.convert import core

    monkeypatch.setattr(core, "memory_for_models", lambda: 1 << 20)
    messages: list[str] = []
    result = convert(checkpoint("dense_tied"), tmp_path / "out", bits=4, progress=False, log=messages.append)
    assert result.report is None and not (tmp_path / "out" / "quantization_report.json").exists()
    assert any("skipping the quality report" in m and "--no-eval" in m for m in messages)
