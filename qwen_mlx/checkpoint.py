"""Reading one checkpoint folder into a Qwen3 `Model`: config, safetensors, saved quantization, checks.

Design decisions:
- Lazy all the way: `mx.load` maps safetensors without reading them, quantization is built lazily, and
  parameters are evaluated one layer at a time, so quantizing on load peaks near the quantized size plus
  one full-precision layer, never at the full-precision model's size.
- Every safetensors header is checked against its file before anything is read (sizes, offsets, dtypes),
  so a truncated or corrupt download is named, with the file, instead of failing deep inside MLX.
- Pickle checkpoints (`*.bin`, `*.pt`) are refused: unpickling runs arbitrary code.
- One assembly routine (`assemble`) builds every model: the whole of it (`qwen_mlx.load`), or one rank's
  part on several Macs, which hooks in through a `Part` (which tensors it reads, how the model is cut).
- The result is explicit (`Loaded`: the model, its config, its folder, its generation settings); nothing is
  attached to the model.
This module finds no models: resolving a name (a folder, `demo`, a Hub repo) is `qwen_mlx.loader`'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ModelArgs
from .errors import QwenMLXError
from .files import read_generation_config, read_json
from .memory import check_fits
from .model import Model
from .quant import apply_saved_quantization, check_bits, quantize_model

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100 << 20
INDEX_FILE = "model.safetensors.index.json"

SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass
class Loaded:
    """A loaded model and what came with it.

    `config` is the config dict (with its `quantization` block when quantized), `path` the folder the
    tokenizer and chat template live in, `generation_config` its `generation_config.json` ({} if none), and
    `link` the lockstep with the other ranks when this is one rank's part of a model on several Macs.
    """

    model: Model
    config: dict[str, Any]
    path: Path
    generation_config: dict[str, Any] = field(default_factory=dict)
    link: Any = None


@dataclass
class Part:
    """How one process's part of a model differs from the whole (several Macs): which checkpoint tensors
    it reads (`keep`) under which names (`rename`), how the model is cut before the weights go in
    (`before`), and what is done once they are in (`after`: sharding, reading owned slices)."""

    keep: Callable[[str], bool] | None = None
    rename: Callable[[str], str] = str  # the names as they are
    before: Callable[[Model], None] | None = None
    after: Callable[[Model, dict], None] | None = None


def read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise QwenMLXError(f"{path} has no config.json; is this a model folder?")
    return read_json(config_file, obj=True)


def refuse_requantizing(config: dict[str, Any], quantize: int | None, where: str | Path) -> None:
    """A checkpoint already quantized cannot be quantized again on load: one line saying what to do."""
    if config.get("quantization") and quantize is not None:
        raise QwenMLXError(
            f"{where} is already quantized; load it as it is, or re-quantize it with `python -m qwen_mlx.convert`"
        )


def shard_index(path: Path) -> dict[str, str] | None:
    """The index's {tensor: shard file}, or None for a model without one (a single safetensors file)."""
    index_file = path / INDEX_FILE
    if not index_file.is_file():
        return None
    index = read_json(index_file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise QwenMLXError(f"{index_file} is not a valid shard index (expected a 'weight_map' object)")
    return weight_map


def weight_files(path: Path, keep: Callable[[str], bool] | None = None) -> list[Path]:
    """The safetensors files holding the weights, checked against the shard index when there is one.

    With `keep`, only the shards the index says hold a tensor it accepts (the others need not be there).
    """
    weight_map = shard_index(path)
    if weight_map is not None:
        index_file = path / INDEX_FILE
        if keep is not None:
            weight_map = {name: file for name, file in weight_map.items() if keep(name)}
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise QwenMLXError(f"shard {file.name} named in {index_file.name} is missing from {path}")
        return files
    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise QwenMLXError(
            f"{path} holds only pickle weights ({', '.join(pickles)}), which are refused because loading them "
            "can run arbitrary code; convert them to safetensors first (transformers: "
            "model.save_pretrained(folder, safe_serialization=True))"
        )
    raise QwenMLXError(f"{path} has no *.safetensors weights")


def check_safetensors(file: Path) -> dict[str, tuple[str, list[int]]]:
    """Validate a safetensors file's header against its size; return {tensor: (dtype, shape)}."""
    return {name: (dtype, shape) for name, (dtype, shape, _) in safetensors_layout(file).items()}


def safetensors_layout(file: Path) -> dict[str, tuple[str, list[int], int]]:
    """{tensor: (dtype, shape, byte offset of its data in the file)}, the header validated against the size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if header_len < 2 or header_len > min(MAX_HEADER_BYTES, size - 8):
            raise QwenMLXError(f"{file} is not a valid safetensors file (truncated or corrupt header)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise QwenMLXError(f"{file} is not a valid safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise QwenMLXError(f"{file} is not a valid safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    tensors, end = {}, 0
    for name, info in header.items():
        try:
            dtype, shape, (start, stop) = info["dtype"], info["shape"], info["data_offsets"]
            expected = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
        except (KeyError, TypeError, ValueError):
            raise QwenMLXError(f"{file}: tensor {name} has a malformed header entry") from None
        if stop - start != expected or start < 0:
            raise QwenMLXError(f"{file}: tensor {name} has {stop - start} bytes for shape {shape} {dtype}")
        tensors[name] = (dtype, shape, 8 + header_len + start)
        end = max(end, stop)
    if 8 + header_len + end > size:
        raise QwenMLXError(
            f"{file} is truncated: its header describes {8 + header_len + end} bytes but the file has {size}; "
            "download or convert it again"
        )
    return tensors


def read_weights(path: Path, allow_fp8: bool = False, keep: Callable[[str], bool] | None = None) -> dict[str, mx.array]:
    """All tensors of a checkpoint folder as lazy MLX arrays (nothing is read until evaluated).

    FP8 tensors come back as their raw bytes (uint8) when `allow_fp8`; the converter decodes them.
    With `keep`, only the tensors it accepts, and no shard that holds none of them is opened (a pipeline
    stage of a model too large for one host).
    """
    weights: dict[str, mx.array] = {}
    for file in weight_files(path, keep):
        names = check_safetensors(file)
        if keep is not None and not any(map(keep, names)):
            continue
        if not allow_fp8 and (dtypes := {d for d, _ in names.values() if d.startswith("F8")}):
            raise QwenMLXError(
                f"{file} holds {'/'.join(sorted(dtypes))} weights; convert the checkpoint first with "
                "`python -m qwen_mlx.convert`"
            )
        try:
            arrays = mx.load(str(file))
        except (RuntimeError, ValueError) as error:
            raise QwenMLXError(f"{file} could not be read as safetensors ({error})") from None
        if keep is not None:
            arrays = {name: array for name, array in arrays.items() if keep(name)}
        if duplicates := sorted(weights.keys() & arrays.keys()):
            raise QwenMLXError(f"tensor {duplicates[0]} appears in more than one shard ({file.name} and another)")
        weights.update(arrays)
    return weights


def check_weights(model: Model, weights: dict[str, mx.array], path: Path) -> None:
    """Every parameter present with its expected shape, and nothing the config does not explain."""
    expected = dict(tree_flatten(model.parameters()))
    if missing := sorted(expected.keys() - weights.keys()):
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise QwenMLXError(f"{path}: tensor {missing[0]} is missing{more}; the weights do not match config.json")
    if unexpected := sorted(weights.keys() - expected.keys()):
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise QwenMLXError(f"{path}: unexpected tensor {unexpected[0]}{more}; the weights do not match config.json")
    for name, value in expected.items():
        if tuple(weights[name].shape) != tuple(value.shape):
            raise QwenMLXError(
                f"{path}: tensor {name} has shape {tuple(weights[name].shape)}, expected {tuple(value.shape)} "
                "from config.json"
            )


def cast_floats(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Floating-point tensors cast (lazily) to `dtype`; packed quantized weights left as they are."""
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def assemble(
    path: Path,
    config: dict[str, Any] | None = None,
    *,
    quantize: int | None = None,
    group_size: int = 64,
    dtype: str | None = None,
    part: Part | None = None,
    lazy: bool = False,
) -> Loaded:
    """Build the model of the checkpoint folder `path`; `quantize=4|8` quantizes float weights on the way in.

    The memory check runs from the shapes, before any weight is read; `lazy` leaves the weights unread.
    """
    if quantize is not None:
        check_bits(quantize, group_size)
    if dtype is not None and dtype not in DTYPES:
        raise QwenMLXError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    config = read_config(path) if config is None else config
    args = ModelArgs.from_dict(config, source=str(path / "config.json"))
    refuse_requantizing(config, quantize, path)
    part = part or Part()
    model = Model(args)
    if part.before is not None:
        part.before(model)
    saved = config.get("quantization")
    weights = read_weights(path, keep=part.keep)
    if part.keep is not None:
        if saved:
            saved = {part.rename(k): v for k, v in saved.items() if part.keep(k)}
        weights = {part.rename(k): v for k, v in weights.items()}
    weights = model.sanitize(weights)
    if saved:
        apply_saved_quantization(model, saved, weights, str(path / "config.json"))
    check_weights(model, weights, path)
    if dtype is not None:
        weights = cast_floats(weights, DTYPES[dtype])
    model.load_weights(list(weights.items()), strict=False)
    # Drop our references so each full-precision tensor is freed once its layer is evaluated.
    weights.clear()
    if quantize is not None:
        config = dict(config, quantization=quantize_model(model, quantize, group_size))
        config["quantization_config"] = config["quantization"]
    if part.after is not None:
        part.after(model, config)
    check_fits(model)  # from the shapes, before the weights are read: warn before a model that cannot fit swaps
    if not lazy:
        evaluate(model)
    return Loaded(model, config, path, read_generation_config(path))


def evaluate(model: Model) -> None:
    """Materialise the parameters one layer at a time, bounding the peak when quantizing on load."""
    for child in model.model.children().values():
        parts = child if isinstance(child, list) else [child]
        for part in parts:
            mx.eval(part.parameters())
    mx.eval(model.parameters())
