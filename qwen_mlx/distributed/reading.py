"""Each rank reads only what it owns: its pipeline stage's shards and tensors, its slice of every tensor.

The model is assembled by the one routine every load uses (`checkpoint.assemble`), through a `Part` that
says which tensors this rank reads and how the model is cut (`Model.shard`, `Model.keep_stage`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .. import checkpoint, loader
from ..checkpoint import Loaded, Part
from .link import Link
from .plan import LAYER_NAME, Plan, plan, quantization_group, stage_names

# Hand-written because `mx.load` reads a tensor whole even when only a slice is used (measured: a 512-row
# slice of a 400 MB tensor read all 400 MB and peaked at 460 MB), and `safetensors`' own numpy slicing has
# no bfloat16. A numpy memmap of the tensor's bytes touches only the pages of the slice.
NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "U8": np.uint8,
                "I8": np.int8, "U16": np.uint16, "I16": np.int16, "U32": np.uint32, "I32": np.int32,
                "U64": np.uint64, "I64": np.int64, "BOOL": np.bool_}  # fmt: skip
STACKED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp)\.switch_mlp\.(\w+)\.weight$")


class OwnedReader:
    """Reads a rank's slice of a safetensors tensor, and nothing else of it."""

    def __init__(self, path: Path, keep=None) -> None:
        self.where: dict[str, tuple[Path, str, list[int], int]] = {}
        for file in checkpoint.weight_files(path, keep):
            for name, (dtype, shape, offset) in checkpoint.safetensors_layout(file).items():
                self.where[name] = (file, dtype, shape, offset)

    def read(self, name: str, axis: int | None = None, start: int = 0, stop: int = 0) -> mx.array | None:
        file, dtype, shape, offset = self.where[name]
        if dtype not in NUMPY_DTYPES or not shape or not math.prod(shape):
            return None  # left to mx.load
        whole = np.memmap(file, NUMPY_DTYPES[dtype], mode="r", offset=offset, shape=tuple(shape))
        part = whole if axis is None else whole[(slice(None),) * axis + (slice(start, stop),)]
        array = mx.array(np.ascontiguousarray(part))
        del whole
        return array.view(mx.bfloat16) if dtype == "BF16" else array

    def owned(self, name: str, shape: tuple, n: int, rank: int) -> mx.array | None:
        """Rank `rank`'s part of tensor `name`, whose part has `shape`: the whole tensor when the shapes
        agree, else the one axis they differ on cut in ceil(size / n) pieces (heads, columns, experts and
        vocabulary rows are all split that way); None when it is not that simple."""
        full = self.where[name][2]
        if list(full) == list(shape):
            return self.read(name)
        if len(full) != len(shape):
            return None
        cut = [axis for axis, (f, s) in enumerate(zip(full, shape, strict=True)) if f != s]
        if len(cut) != 1:
            return None
        axis = cut[0]
        start = rank * -(-full[axis] // n)
        if start + shape[axis] > full[axis]:
            return None
        return self.read(name, axis, start, start + shape[axis])


def read_owned(model, path: Path, plan: Plan, keep=None) -> None:
    """Give every parameter its rank's part read straight from the files, in place of the lazy `mx.load`
    arrays (which would read each whole tensor when evaluated); anything not simply a slice keeps its
    lazy read. Hugging Face checkpoints' per-expert tensors are read for this rank's experts only."""
    reader = OwnedReader(path, keep)
    n, rank = plan.size, plan.rank
    first_layer = plan.stage()[0] if plan.mode == "pp" else 0
    experts = model.args.num_experts
    owned = []
    for name, param in tree_flatten(model.parameters()):
        source = name.replace(".inner.", ".")  # VocabParallel wraps the embedding and the head
        if first_layer and (found := LAYER_NAME.match(source)):
            source = f"model.layers.{int(found.group(1)) + first_layer}.{source[found.end() :]}"
        if source in reader.where:
            array = reader.owned(source, param.shape, n, rank)
        elif (found := STACKED_EXPERTS.match(source)) and experts:
            count = param.shape[0]
            first = 0 if count == experts else rank * count
            names = [f"{found.group(1)}.experts.{e}.{found.group(2)}.weight" for e in range(first, first + count)]
            parts = [reader.read(e) if e in reader.where else None for e in names]
            array = None if any(p is None for p in parts) else mx.stack(parts)
        else:
            array = None
        if array is not None and array.shape == param.shape:
            owned.append((name, array if array.dtype == param.dtype else array.astype(param.dtype)))
    model.load_weights(owned, strict=False)


def load_part(
    path_or_repo: str | Path,
    mode: str,
    *,
    layers: str | None = None,
    quantize: int | None = None,
    group_size: int = 64,
    revision: str | None = None,
) -> Loaded:
    """Load this rank's part of a model: join the run, plan it, read only what this rank owns, shard.

    The result's `link` is the lockstep with the other ranks.
    """
    from ..config import ModelArgs

    # A pipeline stage downloads a Hub repo's config and index first, then only its own layers' shards.
    by_stage = mode == "pp" and loader.is_hub_repo(path_or_repo)
    path = loader.resolve_model_path(path_or_repo, revision, weights=not by_stage)
    config = checkpoint.read_config(path)
    args = ModelArgs.from_dict(config, source=str(path / "config.json"))
    checkpoint.refuse_requantizing(config, quantize, path)
    plan_ = plan(mode, args, layers, quantization_group(config, quantize, group_size))
    part = Part()
    if plan_.mode == "pp":
        part.keep, part.rename = stage_names(plan_)
        if by_stage:
            loader.fetch_shards(str(path_or_repo), revision, path, part.keep)
        start, stop = plan_.stage()
        part.before = lambda model: model.keep_stage(start, stop, plan_.group)

    def cut(model, _config) -> None:
        if plan_.mode == "tp":
            model.shard(plan_.group)
        else:
            model.shard_vocabulary(plan_.group)
        if quantize is None:  # (quantizing on load needs the whole float tensors: they are read lazily, per layer)
            read_owned(model, path, plan_, part.keep)

    part.after = cut
    # The memory check in `assemble` weighs this rank's part against this Mac, before it is read.
    # Unfused (`qwen_mlx.fuse`): a rank's slices are read eagerly, so joining them would hold one layer's
    # projections twice and lift the loading peak past a rank's share; fusing is exact here all the same.
    loaded = checkpoint.assemble(path, config, quantize=quantize, group_size=group_size, part=part, fuse=False)
    mx.clear_cache()
    loaded.link = Link(plan_.group)
    return loaded
