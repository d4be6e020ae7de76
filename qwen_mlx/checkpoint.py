"""Reading one checkpoint folder into a Qwen3 `Model`: config, safetensors, saved quantization, checks.

Design decisions:
- Lazy all the way: `mx.load` maps safetensors without reading them, quantization is built lazily, and
  parameters are evaluated one layer at a time, so quantizing on load peaks near the quantized size plus
  one full-precision layer, never at the full-precision model's size.
- Every safetensors header is checked against its file before anything is read, so a truncated or corrupt
  download is named, with the file, instead of failing deep inside MLX or giving wrong logits: the tensors
  must tile the data exactly (the format's own rule: no holes, no overlaps, nothing after the last), and
  each dtype must be one a Qwen3 checkpoint holds (F16/BF16/F32 floats, U32 packed quantized weights, FP8
  for the converter), then the one the model's parameter has (a float where it wants a float).
- The config is bounded by the weights before the model is built (`bound_by_weights`): the layers and
  experts it names must be on disk, and no dimension may exceed every dimension the headers declare, so an
  absurd `config.json` is refused from the config and the headers alone, not by the OOM killer.
- Nothing that is not a regular file is opened (`files.file_exists`): a FIFO would hang the reader.
- Pickle checkpoints (`*.bin`, `*.pt`) are refused: unpickling runs arbitrary code.
- One assembly routine (`assemble`) builds every model: the whole of it (`qwen_mlx.load`), or one rank's
  part on several Macs, which hooks in through a `Part` (which tensors it reads, how the model is cut).
- The finished model's q/k/v and gate/up are fused (`qwen_mlx.fuse`), after any quantizing and sharding:
  each works on the checkpoint's own module names. `fuse=False` keeps them apart (for comparisons).
- The result is explicit (`Loaded`: the model, its config, its folder, its generation settings); nothing is
  attached to the model.
This module finds no models: resolving a name (a folder, `demo`, a Hub repo) is `qwen_mlx.loader`'s.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ModelArgs
from .errors import QwenMLXError
from .files import file_exists, read_generation_config, read_json
from .fuse import fuse as fuse_projections
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
# What a Qwen3 checkpoint may hold: float weights, U32 for packed quantized ones, and (for the converter)
# the official FP8 checkpoints' float8_e4m3, which `convert.core.decode_fp8` decodes as e4m3.
FLOAT_DTYPES = ("F16", "BF16", "F32")
PACKED_DTYPES = ("U32",)
FP8_DTYPES = ("F8_E4M3",)
LOADED_FLOATS = (mx.float16, mx.bfloat16, mx.float32)
LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")
EXPERT_NAME = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.")


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
    if not file_exists(config_file):
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
    if not file_exists(index_file):
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
            if not file_exists(file):
                raise QwenMLXError(f"shard {file.name} named in {index_file.name} is missing from {path}")
        return files
    try:
        files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("*.safetensors"))
        pickles = [] if files else sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    except OSError as e:
        raise QwenMLXError(f"cannot list the files of {path} ({e.strerror or e})") from None
    if files:
        return files
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
    """{tensor: (dtype, shape, byte offset of its data in the file)}, the header validated against the file.

    The tensors must tile the data region exactly, as the format requires ("the byte buffer needs to be
    entirely indexed, and cannot contain holes"): a hole or an overlap means the header lies about the data.
    """
    if not file_exists(file):
        raise QwenMLXError(f"{file} is missing")
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if header_len < 2 or header_len > min(MAX_HEADER_BYTES, size - 8):
                raise QwenMLXError(f"{file} is not a valid safetensors file (truncated or corrupt header)")
            raw_header = f.read(header_len)
    except OSError as e:
        raise QwenMLXError(f"cannot read {file} ({e.strerror or e})") from None
    try:
        header = json.loads(raw_header)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise QwenMLXError(f"{file} is not a valid safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise QwenMLXError(f"{file} is not a valid safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    tensors, spans = {}, []
    for name, info in header.items():
        try:
            dtype, shape, (start, stop) = info["dtype"], info["shape"], info["data_offsets"]
            if not all(type(n) is int and n >= 0 for n in (*shape, start, stop)):
                raise ValueError(name)
            expected = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
        except (KeyError, TypeError, ValueError):
            raise QwenMLXError(f"{file}: tensor {name} has a malformed header entry") from None
        if stop - start != expected:
            raise QwenMLXError(f"{file}: tensor {name} has {stop - start} bytes for shape {shape} {dtype}")
        tensors[name] = (dtype, shape, 8 + header_len + start)
        spans.append((start, stop, name))
    data_size = size - 8 - header_len
    end = max((stop for _, stop, _ in spans), default=0)
    if end > data_size:
        raise QwenMLXError(
            f"{file} is truncated: its header describes {8 + header_len + end} bytes but the file has {size}; "
            "download or convert it again"
        )
    position, previous = 0, None
    for start, stop, name in sorted(spans):
        if start != position:
            if start > position:
                what = f"bytes {position}-{start} of its data belong to no tensor"
            else:
                what = f"tensor {name} overlaps {previous} (bytes {start}-{position})"
            raise QwenMLXError(f"{file} is corrupt: {what}; download or convert it again")
        position, previous = stop, name
    if position != data_size:
        raise QwenMLXError(
            f"{file} is corrupt: {data_size - position} bytes after its last tensor belong to no tensor; "
            "download or convert it again"
        )
    return tensors


def check_dtypes(file: Path, names: dict[str, tuple[str, list[int]]], allow_fp8: bool) -> None:
    """Only dtypes a Qwen3 checkpoint holds: an integer on a float weight reads its bits as numbers."""
    for name, (dtype, _) in names.items():
        if dtype in FLOAT_DTYPES or dtype in PACKED_DTYPES or (allow_fp8 and dtype in FP8_DTYPES):
            continue
        if dtype.startswith("F8") and not allow_fp8:
            raise QwenMLXError(
                f"{file} holds {dtype} weights ({name}); convert the checkpoint first with `python -m qwen_mlx.convert`"
            )
        raise QwenMLXError(
            f"{file}: tensor {name} is stored as {dtype}, which a Qwen3 checkpoint does not hold (float weights "
            f"are {'/'.join(FLOAT_DTYPES)}, packed quantized weights U32{', FP8 weights F8_E4M3' * allow_fp8}); "
            "the file is corrupt: download or convert it again"
        )


def checkpoint_args(path: Path, config: dict[str, Any], keep: Callable[[str], bool] | None = None) -> ModelArgs:
    """The config's settings, checked on their own and bounded by what the weights declare (no data read)."""
    args = ModelArgs.from_dict(config, source=str(path / "config.json"))
    weight_map = shard_index(path)
    layouts = {} if keep is not None and weight_map else {f: check_safetensors(f) for f in weight_files(path)}
    names = set(weight_map) if weight_map else {n for layout in layouts.values() for n in layout}
    # With `keep` and an index (a pipeline stage), other stages' shards may not be here: their names are.
    shapes = [shape for layout in layouts.values() for _, shape in layout.values()]
    bound_by_weights(args, names, shapes if layouts else None, path / "config.json")
    return args


def bound_by_weights(args: ModelArgs, names: set[str], shapes: list[list[int]] | None, source: Path) -> None:
    """Refuse a config that asks for more than the weights hold, before a model is built from it.

    `names` are every tensor's (from the index or the headers), `shapes` every declared shape (None when
    not all shards are here). Each of the config's dimensions appears unpacked in some tensor (a row count
    or a norm's length), so none can exceed the largest dimension on disk.
    """
    layers = [int(m[1]) for name in names if (m := LAYER_NAME.match(name))]
    on_disk = max(layers, default=-1) + 1
    if args.num_hidden_layers > on_disk:
        raise QwenMLXError(
            f"{source}: num_hidden_layers is {args.num_hidden_layers}, but the weights hold {on_disk} layers; "
            "config.json does not match the weights"
        )
    experts = [int(m[1]) for name in names if (m := EXPERT_NAME.match(name))]
    if experts and args.num_experts > max(experts) + 1:
        raise QwenMLXError(
            f"{source}: num_experts is {args.num_experts}, but the weights hold {max(experts) + 1} experts; "
            "config.json does not match the weights"
        )
    if shapes is None:
        return
    largest = max((n for shape in shapes for n in shape), default=0)
    for field_name, value in args.dimensions().items():
        if value > largest:
            raise QwenMLXError(
                f"{source}: {field_name} is {value}, but no tensor in the weights has a dimension that large "
                f"(the largest is {largest}); config.json does not match the weights"
            )


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
        check_dtypes(file, names, allow_fp8)
        try:
            arrays = mx.load(str(file))
        except (RuntimeError, ValueError, OSError) as error:
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
        found, floating = weights[name].dtype, mx.issubdtype(value.dtype, mx.floating)
        if found not in LOADED_FLOATS if floating else found != value.dtype:
            wanted = "a float (float16, bfloat16 or float32)" if floating else f"{dtype_name(value.dtype)} (packed)"
            raise QwenMLXError(
                f"{path}: tensor {name} is {dtype_name(found)} on disk where the model holds {wanted}; the "
                "checkpoint is corrupt or does not match config.json"
            )


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


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
    fuse: bool = True,
) -> Loaded:
    """Build the model of the checkpoint folder `path`; `quantize=4|8` quantizes float weights on the way in.

    The memory check runs from the shapes, before any weight is read; `lazy` leaves the weights unread;
    `fuse=False` keeps q/k/v and gate/up as separate matmuls.
    """
    if quantize is not None:
        check_bits(quantize, group_size)
    if dtype is not None and dtype not in DTYPES:
        raise QwenMLXError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    config = read_config(path) if config is None else config
    part = part or Part()
    args = checkpoint_args(path, config, part.keep)
    refuse_requantizing(config, quantize, path)
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
        try:
            apply_saved_quantization(model, saved, weights, str(path / "config.json"))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:  # an entry or a shape MLX cannot use
            raise QwenMLXError(
                f"{path / 'config.json'}: its quantization block does not describe the weights "
                f"({type(e).__name__}: {e}); download or convert the model again"
            ) from None
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
    if fuse:
        fuse_projections(model, evaluate=not lazy)
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
