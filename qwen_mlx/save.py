"""Saving a model in mlx-lm's on-disk format, atomically.

The folder matches what `mlx_lm.convert` writes, so it loads in `mlx_lm.load` as well as ours: shards of
at most 5 GiB (`model.safetensors`, or `model-0000K-of-0000N.safetensors`) with metadata
`format: mlx`, `model.safetensors.index.json` with `total_size`, `total_parameters` and a sorted weight
map, and `config.json` with keys sorted and the `quantization` block duplicated as
`quantization_config`. Everything is written into a temporary folder beside the target and renamed into
place only when complete, so a failure never leaves a half-written model behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .checkpoint import Loaded
from .config import ModelArgs
from .errors import QwenMLXError
from .quant import parameter_count, quantization_block

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


def check_out_folder(out: Path, overwrite: bool, hint: str = "allow overwriting") -> None:
    """Refuse an `out` that exists and holds something, unless it may be overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise QwenMLXError(f"{out} already exists and is not empty; choose another folder or {hint}")


def write_folder(out: Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Run `write(tmp_folder)` and move the result to `out` only when it completes.

    Whatever stops it (an error, Ctrl-C, SIGTERM turned into SystemExit), the temporary folder goes and
    an `out` being replaced is put back as it was.
    """
    out = Path(out).expanduser()
    check_out_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
    try:
        # mkdtemp makes the folder private (0700); the result should get the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        write(tmp)
        if out.exists() or out.is_symlink():
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        if old.exists() and not out.exists():
            old.rename(out)
        _remove(tmp)
        raise
    _remove(old)
    return out


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def write_weights(
    folder: Path,
    weights: dict[str, mx.array],
    total_parameters: int,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    on_tensor: Callable[[str, mx.array], None] | None = None,
) -> None:
    """Write mlx-lm's shards and index into `folder`, emptying `weights` as it goes.

    The arrays may be lazy: each shard is evaluated tensor by tensor (`on_tensor` is called after each,
    e.g. to advance a progress bar), written, and released before the next, so peak memory is about one
    shard plus the inputs its tensors are computed from.
    """
    total_size = sum(v.nbytes for v in weights.values())
    shards = make_shards(weights, max_shard_bytes)
    weights.clear()
    pattern = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    weight_map = {}
    for i in range(len(shards)):
        shard, shards[i] = shards[i], {}
        name = pattern.format(i + 1, len(shards))
        for tensor, value in shard.items():
            mx.eval(value)
            if on_tensor is not None:
                on_tensor(tensor, value)
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, name))
        del shard
        mx.clear_cache()
    index = {
        "metadata": {"total_size": total_size, "total_parameters": total_parameters},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4), encoding="utf-8")


def write_config(folder: Path, config: dict[str, Any]) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=4), encoding="utf-8")


def copy_companions(source: Path | None, folder: Path) -> None:
    """Copy the tokenizer, chat template and generation defaults that sit beside the weights."""
    if source is None:
        return
    source = Path(source)
    for name in COMPANION_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    # transformers 5 and mlx-lm keep the chat template in its own file; older repos inline it.
    if not (folder / "chat_template.jinja").exists() and (folder / "tokenizer_config.json").is_file():
        try:
            template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            template = None
        if isinstance(template, str):
            (folder / "chat_template.jinja").write_text(template, encoding="utf-8")


def save(
    model: nn.Module | Loaded,
    out: str | Path,
    *,
    config: dict[str, Any] | None = None,
    source: Path | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write a model (quantized or not) to the folder `out` in mlx-lm's format; return the folder.

    Given what `qwen_mlx.loader.load_model` returned, the checkpoint's config and its tokenizer, chat
    template and generation defaults come along. A bare model is described from its shapes (`config` and
    `source` may say more).
    """
    if isinstance(model, Loaded):
        config = model.config if config is None else config
        source = model.path if source is None else source
        model = model.model
    if config is None:
        config = {k: v for k, v in dataclasses.asdict(model.args).items() if v is not None}
        if block := quantization_block(model):
            config["quantization"] = block
    config = export_config(config, model.args)

    def write(folder: Path) -> None:
        weights = dict(tree_flatten(model.parameters()))
        write_weights(folder, weights, parameter_count(model), max_shard_bytes)
        write_config(folder, config)
        copy_companions(source, folder)

    return write_folder(Path(out), write, overwrite=overwrite)
