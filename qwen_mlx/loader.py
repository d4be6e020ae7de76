"""Loading Qwen3 checkpoints: a local Hugging Face folder, a local MLX folder, or a Hub repo id.

Design decisions:
- Lazy all the way: `mx.load` maps safetensors without reading them, quantization is built lazily, and
  parameters are evaluated one layer at a time, so quantizing on load peaks near the quantized size plus
  one full-precision layer, never at the full-precision model's size.
- Every safetensors header is checked against its file before anything is read (sizes, offsets, dtypes),
  so a truncated or corrupt download is named, with the file, instead of failing deep inside MLX.
- Pickle checkpoints (`*.bin`, `*.pt`) are refused: unpickling runs arbitrary code.
- Hub downloads go through `huggingface_hub.snapshot_download` with only the files a Qwen3 runtime needs,
  its own progress bars and cache, and its offline mode (`HF_HUB_OFFLINE=1`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ModelArgs
from .errors import QwenMLXError
from .memory import check_fits
from .model import Model
from .quant import apply_saved_quantization, check_bits, quantize_model

HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "merges.txt", "vocab.json", "tokenizer.model"]
HUB_METADATA = [pattern for pattern in HUB_FILES if pattern != "*.safetensors"]  # a pipeline stage's first fetch
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
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


def is_hub_repo(path_or_repo: str | Path) -> bool:
    """True when `path_or_repo` names a Hub repo (to download) rather than a folder here or the demo."""
    text = str(path_or_repo)
    return (
        text != "demo"
        and not Path(text).expanduser().exists()
        and bool(REPO_ID.match(text))
        and not text.startswith((".", "~"))
    )


def resolve_model_path(path_or_repo: str | Path, revision: str | None = None, *, weights: bool = True) -> Path:
    """A local folder as it is; a Hub repo id downloaded (or found in the cache) with huggingface_hub.

    `demo` (when no folder of that name is here) is the offline demo model, built into the cache on first use.
    `weights=False` fetches a repo's config, index and tokenizer only (`fetch_shards` brings the weights).
    """
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if str(path_or_repo) == "demo":
        from .demo import ensure_demo  # imported here: the demo module loads models itself

        return ensure_demo()
    if path.exists():
        raise QwenMLXError(f"{path} is a file; pass the model folder that holds config.json")
    text = str(path_or_repo)
    if not REPO_ID.match(text) or text.startswith((".", "~")):
        raise QwenMLXError(f"no model folder at {path}, and {text!r} is not a Hugging Face repo id (owner/name)")
    return _download(text, revision, HUB_FILES if weights else HUB_METADATA)


def fetch_shards(repo_id: str, revision: str | None, path: Path, keep: Callable[[str], bool]) -> None:
    """Download only the safetensors shards that hold a tensor `keep` accepts, as the index in `path` (the
    repo's snapshot) maps them: a pipeline stage fetches its own layers' shards, not the whole model."""
    weight_map = _shard_index(path)
    names = sorted({file for name, file in weight_map.items() if keep(name)}) if weight_map else ["*.safetensors"]
    _download(repo_id, revision, names)


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise QwenMLXError(f"{repo_id} is gated: accept its terms on the Hub and log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise QwenMLXError(
            f"Hugging Face repo {repo_id!r} was not found (check the name; private repos need `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise QwenMLXError(f"{repo_id} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise QwenMLXError(
            f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached (no network, or "
            "HF_HUB_OFFLINE=1); download it once while online, or pass a local folder"
        ) from None
    except (HfHubHTTPError, OSError) as error:
        raise QwenMLXError(f"could not download {repo_id}: {error}") from None


def read_json(file: Path) -> Any:
    """A JSON file's contents, or one readable error naming it."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise QwenMLXError(f"{file} is not valid JSON ({error})") from None


def read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise QwenMLXError(f"{path} has no config.json; is this a model folder?")
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise QwenMLXError(f"{config_file} must hold a JSON object")
    return config


def refuse_requantizing(config: dict[str, Any], quantize: int | None, where: str | Path) -> None:
    """A checkpoint already quantized cannot be quantized again on load: one line saying what to do."""
    if config.get("quantization") and quantize is not None:
        raise QwenMLXError(
            f"{where} is already quantized; load it as it is, or re-quantize it with `python -m qwen_mlx.convert`"
        )


def _shard_index(path: Path) -> dict[str, str] | None:
    """The index's {tensor: shard file}, or None for a model without one (a single safetensors file)."""
    index_file = path / INDEX_FILE
    if not index_file.is_file():
        return None
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise QwenMLXError(f"{index_file} is not a valid shard index (expected a 'weight_map' object)")
    return weight_map


def weight_files(path: Path, keep: Callable[[str], bool] | None = None) -> list[Path]:
    """The safetensors files holding the weights, checked against the shard index when there is one.

    With `keep`, only the shards the index says hold a tensor it accepts (the others need not be there).
    """
    weight_map = _shard_index(path)
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


def load(
    path_or_repo: str | Path,
    *,
    quantize: int | None = None,
    group_size: int = 64,
    dtype: str | None = None,
    revision: str | None = None,
    lazy: bool = False,
) -> Model:
    """Load a Qwen3 model; `quantize=4|8` quantizes a full-precision checkpoint on the way in.

    The returned model carries `config` (the config dict, with its `quantization` block) and `path`
    (the folder it came from, where the tokenizer and chat template live).
    """
    if quantize is not None:
        check_bits(quantize, group_size)
    if dtype is not None and dtype not in DTYPES:
        raise QwenMLXError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    path = resolve_model_path(path_or_repo, revision)
    config = read_config(path)
    args = ModelArgs.from_dict(config, source=str(path / "config.json"))
    model = Model(args)

    weights = model.sanitize(read_weights(path))
    refuse_requantizing(config, quantize, path)
    if saved := config.get("quantization"):
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
    model.config, model.path = config, path
    check_fits(model)  # from the shapes, before the weights are read: warn before a model that cannot fit swaps
    if not lazy:
        evaluate(model)
    return model


def evaluate(model: Model) -> None:
    """Materialise the parameters one layer at a time, bounding the peak when quantizing on load."""
    for child in model.model.children().values():
        parts = child if isinstance(child, list) else [child]
        for part in parts:
            mx.eval(part.parameters())
    mx.eval(model.parameters())
