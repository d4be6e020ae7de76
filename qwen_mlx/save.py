"""Saving a model in mlx-lm's on-disk format, atomically.

The folder matches what `mlx_lm.convert` writes, so it loads in `mlx_lm.load` as well as ours: shards of
at most 5 GiB (`model.safetensors`, or `model-0000K-of-0000N.safetensors`) with metadata
`format: mlx`, `model.safetensors.index.json` with `total_size`, `total_parameters` and a sorted weight
map, and `config.json` with keys sorted and the `quantization` block duplicated as
`quantization_config`. Everything is written into a temporary folder beside the target and renamed into
place only when complete, so a failure never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelArgs
from .errors import QwenMLXError
from .quant import parameter_count

MAX_SHARD_BYTES = 5 << 30
# Files besides the weights that make a folder usable on its own: tokenizer, chat template, defaults.
COMPANION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def make_shards(weights: dict[str, mx.array], max_bytes: int = MAX_SHARD_BYTES) -> list[dict[str, mx.array]]:
    """Split in order into shards of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[dict[str, mx.array]] = []
    size = 0
    for name, value in weights.items():
        if not shards or size + value.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    return shards


def export_config(config: dict[str, Any], args: ModelArgs) -> dict[str, Any]:
    """The config as mlx-lm writes it (sorted, `quantization_config` mirroring `quantization`).

    The settings mlx-lm reads only under their transformers 4.x names are written under those names too,
    so a folder converted from a transformers 5 checkpoint still loads in `mlx_lm.load`.
    """
    config = {k: v for k, v in config.items() if k != "_name_or_path"}
    if args.num_experts:
        config["num_experts"] = args.num_experts  # transformers 5 writes num_local_experts
    if config.get("rope_theta") is None:
        config["rope_theta"] = args.rope_theta
    if config.get("rope_scaling") is None and args.rope_type != "default":
        config["rope_scaling"] = args.rope_scaling
    if "quantization" in config:
        config["quantization_config"] = config["quantization"]
    else:
        config.pop("quantization_config", None)
    return dict(sorted(config.items()))


def write_folder(out: Path, write, overwrite: bool = False) -> Path:
    """Run `write(tmp_folder)` and move the result to `out` only when it completes."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise QwenMLXError(f"{out} already exists and is not empty; choose another folder or allow overwriting")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save(model: nn.Module, out: str | Path, *, overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `model` (quantized or not) to the folder `out` in mlx-lm's format; return the folder."""
    weights = dict(tree_flatten(model.parameters()))
    config = export_config(getattr(model, "config", {}), model.args)
    source = getattr(model, "path", None)

    def write(folder: Path) -> None:
        shards = make_shards(weights, max_shard_bytes)
        pattern = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = pattern.format(i, len(shards))
            mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
            weight_map.update(dict.fromkeys(shard, name))
        index = {
            "metadata": {
                "total_size": sum(v.nbytes for v in weights.values()),
                "total_parameters": parameter_count(model),
            },
            "weight_map": dict(sorted(weight_map.items())),
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4), encoding="utf-8")
        (folder / "config.json").write_text(json.dumps(config, indent=4), encoding="utf-8")
        if source is not None:
            for name in COMPANION_FILES:
                if (Path(source) / name).is_file():
                    shutil.copy2(Path(source) / name, folder / name)

    return write_folder(Path(out), write, overwrite=overwrite)
