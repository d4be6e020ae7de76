"""Several Macs as one: tensor- and pipeline-parallel Qwen3 over `mx.distributed`, started by `mlx.launch`.

Design decisions:
- The transport, the launcher and the collectives are MLX's own (`mx.distributed` with its ring, MPI and
  JACCL backends; `mlx.launch` starts one process per host). Nothing here opens a socket.
- Tensor parallelism (`tp`) splits attention heads and MLP columns with MLX's `shard_linear`
  (all-to-sharded into a block, sharded-to-all out of it: one all-reduce after attention and one after the
  MLP), on float and quantized layers alike. MoE layers are expert-parallel: each rank holds
  `num_experts / N` whole experts, the router is replicated, each rank runs the chosen experts it holds and
  the all-reduce adds the ranks' parts.
- Pipeline parallelism (`pp`) gives each rank a contiguous range of layers (rank 0 the first), sized by
  `--layers` or by each host's memory; activations go rank to rank with `send`/`recv`, and the last
  stage's output reaches every rank with one all-gather. One hop per stage per token: the choice over
  slow links, where tensor parallelism's two all-reduces per layer cost too much.
- In both modes the embedding and the head are vocabulary-parallel (each rank holds 1/N of the 151,936
  rows; lookups are all-reduced, logits all-gathered), so every rank holds about 1/N of the weights.
- Each rank reads only what it owns: pipeline stages skip the safetensors shards (per the index) and the
  tensors of other stages, and download only their own shards from the Hub; every rank reads its slice of
  each tensor (heads, columns, experts, vocabulary rows) straight from the file (`read_owned`), never the
  whole tensor, so its peak memory while loading is its share. Quantizing on load, which needs whole
  float tensors, reads them lazily a layer at a time instead, and copies the slices out (`mx.array`) so
  that no view keeps a whole tensor alive.
- Rank 0 leads and the others follow (`follow`): rank 0 runs the command (the CLI's generation, the
  endpoint) and every `Generation` it starts is mirrored: its start is shared as JSON (never pickle), the
  sampled token is broadcast from rank 0 inside the step's graph (so sampling cannot diverge), and one
  small all-reduce per token says go on, take these forced tokens, or stop. The followers need no
  tokenizer, sampler or grammar: they only feed the tokens rank 0 chose.
- A rank that dies closes its sockets (MLX raises "connection to a peer was lost") or is reported by
  `mlx.launch`, which stops the others (SIGTERM); a host that goes silent is caught by a watchdog on
  rank 0 that ends the run when a step makes no progress for `--peer-timeout` seconds.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import shard_linear
from mlx.utils import tree_map

from .errors import QwenMLXError

MODES = ("tp", "pp")
PEER_TIMEOUT_S = 120.0
RANKS_GRACE_S = 5.0  # how long the other ranks get to end once rank 0 has
MIRRORED_CACHES = 8  # caches a follower keeps for rank 0 (the endpoint uses one, the CLI one per session)

# The per-token control word rank 0 sends its followers.
NEXT, INJECT, END = 1, 2, 3

LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


class PeerLost(QwenMLXError):
    """Another rank of the distributed run went away."""


# -- the plan ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How this rank takes part: the mode, the group, and (pipeline) the layers each rank runs."""

    mode: str
    group: Any  # mx.distributed.Group
    layers: tuple[int, ...] = ()  # pp: number of layers per rank, in rank order

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    def stage(self) -> tuple[int, int]:
        """The layers [start, stop) this rank runs (pipeline)."""
        start = sum(self.layers[: self.rank])
        return start, start + self.layers[self.rank]


def in_a_rank() -> bool:
    """True inside a process started by `mlx.launch` (it sets MLX_RANK)."""
    return "MLX_RANK" in os.environ


def join(mode: str) -> Any:
    """This process's group: the ranks `mlx.launch` started (backend from MLX_DISTRIBUTED_BACKEND or any)."""
    if mode not in MODES:
        raise QwenMLXError(f"--distributed {mode!r} is not a mode: use tp (tensor parallel) or pp (pipeline)")
    backend = os.environ.get("QWEN_MLX_BACKEND", "any")
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as error:
        raise QwenMLXError(f"could not join the distributed run ({error})") from None
    if group.size() < 2:
        raise QwenMLXError("--distributed needs at least 2 ranks: give --hostfile with 2 or more hosts, or --ranks N")
    return group


def divisors_up_to(value: int, limit: int = 16) -> list[int]:
    return [n for n in range(2, limit + 1) if value % n == 0]


def check_tensor_parallel(args, n: int, group_size: int | None = None) -> None:
    """Refuse a rank count that does not split this model evenly, saying what would."""
    needs = [("key-value heads", args.num_key_value_heads), ("attention heads", args.num_attention_heads)]
    dense_layers = [i for i in range(args.num_hidden_layers) if not args.is_sparse_layer(i)]
    if dense_layers:
        needs.append(("MLP width (intermediate_size)", args.intermediate_size))
    if args.num_experts:
        needs.append(("experts", args.num_experts))
    for what, value in needs:
        if value % n:
            fits = [d for d in divisors_up_to(math.gcd(*(v for _, v in needs))) if d > 1]
            hint = f"use {' or '.join(map(str, fits))} ranks" if fits else "no rank count splits it evenly"
            raise QwenMLXError(
                f"tensor parallelism over {n} ranks needs the model's {what} ({value}) to divide by {n}: "
                f"{hint}, or choose --distributed pp, which has no such limit"
            )
    if group_size:  # a quantized row cut must fall on a quantization group boundary
        widths = [("attention output", args.num_attention_heads * args.head_dim)]
        if dense_layers:
            widths.append(("MLP width", args.intermediate_size))
        for what, width in widths:
            if (width // n) % group_size:
                raise QwenMLXError(
                    f"tensor parallelism over {n} ranks would cut the {what} ({width}) into pieces of "
                    f"{width // n}, not a multiple of the quantization group ({group_size}); use fewer ranks "
                    "or --distributed pp"
                )


def split_layers(num_layers: int, n: int, layers: str | None = None, weights: list[float] | None = None) -> tuple:
    """Layers per rank: `--layers 10,18` as given, else in proportion to `weights` (free memory), else even."""
    if layers:
        try:
            split = tuple(int(part) for part in layers.split(","))
        except ValueError:
            raise QwenMLXError(f"--layers {layers!r} must be whole numbers separated by commas, one per rank") from None
        if len(split) != n or any(s < 1 for s in split) or sum(split) != num_layers:
            raise QwenMLXError(
                f"--layers {layers} must give each of the {n} ranks at least one layer and add up to the "
                f"model's {num_layers} layers"
            )
        return split
    if num_layers < n:
        raise QwenMLXError(f"the model has {num_layers} layers, too few for {n} pipeline stages; use fewer ranks")
    weights = weights if weights and all(w > 0 for w in weights) else [1.0] * n
    total = sum(weights)
    exact = [num_layers * w / total for w in weights]
    split = [max(1, int(e)) for e in exact]
    while sum(split) < num_layers:  # largest remainder first
        i = max(range(n), key=lambda r: exact[r] - split[r])
        split[i] += 1
    while sum(split) > num_layers:
        i = max((r for r in range(n) if split[r] > 1), key=lambda r: split[r] - exact[r])
        split[i] -= 1
    return tuple(split)


def free_memory() -> float:
    """What this host can give the model, in bytes: the GPU working set on Metal, else physical memory."""
    if mx.metal.is_available():
        return float(mx.device_info().get("max_recommended_working_set_size", 0))
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (ValueError, OSError):
        return 0.0


def _quantization_group(config: dict, quantize: int | None, group_size: int = 64) -> int | None:
    """The quantization group a tensor-parallel cut must respect: the checkpoint's, or the one it is
    quantized to on load; None for float weights."""
    return (config.get("quantization") or {}).get("group_size") or (group_size if quantize else None)


def plan(mode: str, args, layers: str | None = None, group_size: int | None = None) -> Plan:
    group = join(mode)
    n = group.size()
    if mode == "tp":
        check_tensor_parallel(args, n, group_size)
        return Plan(mode, group)
    weights = None
    if not layers:
        # Every rank learns every host's memory, so all compute the same split.
        mine = mx.zeros((n,), mx.float32).at[group.rank()].add(free_memory() / (1 << 30))
        weights = mx.distributed.all_sum(mine, group=group).tolist()
    return Plan(mode, group, split_layers(args.num_hidden_layers, n, layers, weights))


# -- loading only this rank's part --------------------------------------------------------------------------


def stage_names(plan: Plan):
    """(keep(name), rename(name)) for the tensors of this pipeline stage, renumbered from 0."""
    start, stop = plan.stage()

    def keep(name: str) -> bool:
        m = LAYER_NAME.match(name)
        return m is None or start <= int(m.group(1)) < stop

    def rename(name: str) -> str:
        m = LAYER_NAME.match(name)
        return name if m is None else f"model.layers.{int(m.group(1)) - start}.{name[m.end() :]}"

    return keep, rename


def restrict_to_stage(model, plan: Plan) -> None:
    """Keep only this stage's layers in the model (its cache then covers them alone)."""
    start, stop = plan.stage()
    model.model.layers = model.model.layers[start:stop]
    model.model.pipeline = Pipeline(plan.group)


def _copy_params(module: nn.Module) -> nn.Module:
    """Own copies of a module's (sliced) parameters, so the tensors they were cut from can be freed."""
    module.update(tree_map(lambda a: mx.array(a) if isinstance(a, mx.array) else a, module.parameters()))
    return module


def shard_tensor_parallel(model, group) -> None:
    """Split every layer across the group: heads and MLP columns, or whole experts."""
    from .model import SparseMoeBlock  # the model imports nothing from here

    n, rank = group.size(), group.rank()
    for layer in model.layers:
        attn = layer.self_attn
        for name, kind in (("q_proj", "all-to-sharded"), ("k_proj", "all-to-sharded"),
                           ("v_proj", "all-to-sharded"), ("o_proj", "sharded-to-all")):  # fmt: skip
            setattr(attn, name, _copy_params(shard_linear(getattr(attn, name), kind, group=group)))
        attn.n_heads //= n
        attn.n_kv_heads //= n
        mlp = layer.mlp
        if isinstance(mlp, SparseMoeBlock):
            count = mlp.local_experts // n
            first = rank * count
            for proj in (mlp.switch_mlp.gate_proj, mlp.switch_mlp.up_proj, mlp.switch_mlp.down_proj):
                proj.update({k: mx.array(v[first : first + count]) for k, v in proj.parameters().items()})
            mlp.group, mlp.first_expert, mlp.local_experts = group, first, count
        else:
            mlp.gate_proj = _copy_params(shard_linear(mlp.gate_proj, "all-to-sharded", group=group))
            mlp.up_proj = _copy_params(shard_linear(mlp.up_proj, "all-to-sharded", group=group))
            mlp.down_proj = _copy_params(shard_linear(mlp.down_proj, "sharded-to-all", group=group))


class VocabParallel(nn.Module):
    """Rows [start, start + rows) of an embedding or a head; the group holds the whole vocabulary.

    As an embedding, each rank looks up the ids it holds (zeros for the rest) and an all-reduce adds them;
    as a head (or a tied embedding's `as_linear`), each rank scores its rows and an all-gather joins them.
    """

    def __init__(self, inner: nn.Module, vocab: int, group):
        super().__init__()
        n, rank = group.size(), group.rank()
        self.vocab, self.chunk = vocab, -(-vocab // n)
        self.start = rank * self.chunk
        self.rows = max(0, min(vocab, self.start + self.chunk) - self.start)
        stop = self.start + self.rows
        inner.update({k: mx.array(v[self.start : stop]) for k, v in inner.parameters().items()})
        self.inner = inner
        self._group = group

    def __call__(self, x: mx.array) -> mx.array:
        if isinstance(self.inner, (nn.Embedding, nn.QuantizedEmbedding)):
            local = x - self.start
            mine = (local >= 0) & (local < self.rows)
            h = self.inner(mx.where(mine, local, 0))
            return mx.distributed.all_sum(h * mine[..., None].astype(h.dtype), group=self._group)
        return self._gather(self.inner(x))

    def as_linear(self, h: mx.array) -> mx.array:
        return self._gather(self.inner.as_linear(h))

    def _gather(self, logits: mx.array) -> mx.array:
        lead = logits.shape[:-1]
        if self.rows < self.chunk:  # the last rank's share is short: pad it, then cut the padding off
            logits = mx.concatenate([logits, mx.zeros((*lead, self.chunk - self.rows), logits.dtype)], axis=-1)
        flat = logits.reshape(-1, self.chunk)
        n = self._group.size()
        every = mx.distributed.all_gather(flat, group=self._group).reshape(n, -1, self.chunk)
        return every.transpose(1, 0, 2).reshape(*lead, n * self.chunk)[..., : self.vocab]


def shard_vocabulary(model, group) -> None:
    model.model.embed_tokens = VocabParallel(model.model.embed_tokens, model.args.vocab_size, group)
    if not model.args.tie_word_embeddings:
        model.lm_head = VocabParallel(model.lm_head, model.args.vocab_size, group)


class Pipeline:
    """One stage's hand-offs: receive the previous stage's activations, pass them on, share the last's."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = group.rank(), group.size()

    def receive(self, h: mx.array) -> mx.array:
        if self.rank == 0:
            return h
        got = mx.distributed.recv_like(h, self.rank - 1, group=self.group)
        # `h` (the vocabulary-parallel embedding, an all-reduce every rank joins) must run before the receive
        # waits on the previous stage, which itself waits in that all-reduce: `depends` orders the two.
        return mx.depends(got, h)

    def pass_on(self, h: mx.array, cache: list) -> mx.array:
        if self.rank < self.size - 1:
            h = mx.distributed.send(h, self.rank + 1, group=self.group)
            # A prompt chunk evaluates only the cache; tie the send to it so the next stage is never starved.
            if cache and cache[-1] is not None:
                last = cache[-1]
                if isinstance(last.keys, tuple):  # a quantized cache keeps (packed, scales, biases)
                    last.keys = tuple(mx.depends(list(last.keys), h))
                elif last.keys is not None:
                    last.keys = mx.depends(last.keys, h)
        return mx.distributed.all_gather(h, group=self.group)[-h.shape[0] :]


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
        from . import loader

        self.where: dict[str, tuple[Path, str, list[int], int]] = {}
        for file in loader.weight_files(path, keep):
            for name, (dtype, shape, offset) in loader.safetensors_layout(file).items():
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
    from mlx.utils import tree_flatten

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
):
    """Load this rank's part of a model: join the run, plan it, read only what this rank owns, shard."""
    from . import loader
    from .config import ModelArgs
    from .memory import check_fits
    from .model import Model
    from .quant import apply_saved_quantization, check_bits, quantize_model

    if quantize is not None:
        check_bits(quantize, group_size)
    # A pipeline stage downloads a Hub repo's config and index first, then only its own layers' shards.
    by_stage = mode == "pp" and loader.is_hub_repo(path_or_repo)
    path = loader.resolve_model_path(path_or_repo, revision, weights=not by_stage)
    config = loader.read_config(path)
    args = ModelArgs.from_dict(config, source=str(path / "config.json"))
    loader.refuse_requantizing(config, quantize, path)
    saved = config.get("quantization")
    plan_ = plan(mode, args, layers, _quantization_group(config, quantize, group_size))
    model = Model(args)
    keep = None
    if plan_.mode == "pp":
        keep, rename = stage_names(plan_)
        if by_stage:
            loader.fetch_shards(str(path_or_repo), revision, path, keep)
        restrict_to_stage(model, plan_)
        if saved:
            saved = {rename(k) if keep(k) else None: v for k, v in saved.items()}
            saved.pop(None, None)
        weights = loader.read_weights(path, keep=keep)
        weights = {rename(k): v for k, v in weights.items()}
    else:
        weights = loader.read_weights(path)
    weights = model.sanitize(weights)
    if saved:
        apply_saved_quantization(model, saved, weights, str(path / "config.json"))
    loader.check_weights(model, weights, path)
    model.load_weights(list(weights.items()), strict=False)
    weights.clear()
    if quantize is not None:
        config = dict(config, quantization=quantize_model(model, quantize, group_size))
        config["quantization_config"] = config["quantization"]
    if plan_.mode == "tp":
        shard_tensor_parallel(model, plan_.group)
    shard_vocabulary(model, plan_.group)
    if quantize is None:  # (quantizing on load needs the whole float tensors: they are read lazily, per layer)
        read_owned(model, path, plan_, keep)
    model.config, model.path = config, path
    check_fits(model)  # this rank's part against this Mac's memory (and its wired limit), before it is read
    loader.evaluate(model)
    mx.clear_cache()
    model.link = Link(plan_.group)
    return model


# -- rank 0 leads, the others follow ---------------------------------------------------------------------------


class Link:
    """The lockstep between rank 0 and its followers; every call is a collective every rank makes."""

    def __init__(self, group, peer_timeout: float | None = None):
        self.group = group
        self.rank = group.rank()
        self.leader = self.rank == 0
        self.closed = False
        self.peer_timeout = (
            peer_timeout if peer_timeout is not None else float(os.environ.get("QWEN_MLX_PEER_TIMEOUT", PEER_TIMEOUT_S))
        )
        self._busy_since: float | None = None
        self._watchdog: threading.Thread | None = None

    def _sum(self, x: mx.array) -> mx.array:
        from .engine import generation_stream

        with mx.stream(generation_stream()):  # in order with the steps the thread queued before it
            return mx.distributed.all_sum(x, group=self.group)

    def agree(self, token: mx.array) -> mx.array:
        """Rank 0's sampled token, on every rank (lazily: part of the step's graph)."""
        mine = token.astype(mx.int32)
        if not self.leader:
            mine = mx.zeros_like(mine)
        return mx.distributed.all_sum(mine, group=self.group)

    def share(self, obj: Any = None) -> Any:
        """Rank 0's JSON-able `obj` on every rank (the others pass nothing)."""
        data = json.dumps(obj).encode() if self.leader else b""
        size = self._call(lambda: self._sum(mx.array([len(data)], mx.int32)).item())
        raw = mx.array(list(data), mx.uint8) if self.leader else mx.zeros((size,), mx.uint8)
        payload = self._call(lambda: bytes(self._sum(raw).tolist()))
        return obj if self.leader else json.loads(payload)

    def signal(self, code: int = 0) -> int:
        """Rank 0's control word on every rank."""
        word = mx.array([code if self.leader else 0], mx.int32)
        return self._call(lambda: self._sum(word).item())

    def _call(self, fn):
        with self.waiting():
            return fn()

    @contextlib.contextmanager
    def waiting(self):
        """Around anything that blocks on the other ranks: a lost peer becomes `PeerLost`, and on rank 0
        the watchdog ends the run if the wait outlasts the peer timeout (a host that went silent)."""
        if self.leader and self.peer_timeout > 0:
            self._busy_since = time.monotonic()
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="qwen-mlx-watchdog", daemon=True)
                self._watchdog.start()
        try:
            yield
        except RuntimeError as error:
            if not any(tag in str(error) for tag in ("[ring]", "[jaccl]", "[mpi]", "peer")):
                raise
            raise PeerLost(f"a rank of the distributed run went away ({error})") from None
        finally:
            self._busy_since = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.peer_timeout / 4))
            since = self._busy_since
            if since is not None and time.monotonic() - since > self.peer_timeout:
                stop(
                    f"no answer from the other ranks for {self.peer_timeout:.0f} s: a host dropped out or its link "
                    "is down; stopping (raise --peer-timeout if the model is that slow)"
                )

    def close(self) -> None:
        """Rank 0: tell the followers to exit (once)."""
        if self.leader and not self.closed:
            self.closed = True
            with contextlib.suppress(QwenMLXError):
                self.share({"op": "exit"})


def stop(message: str, status: int = 1) -> None:
    """End this rank now with one line on stderr; MLX's pending collectives cannot be unwound."""
    rank = os.environ.get("MLX_RANK", "?")
    print(f"qwen-mlx: rank {rank}: {message}", file=sys.stderr, flush=True)
    report_status(status)
    os._exit(status)


def report_status(status: int) -> None:
    """Rank 0 leaves its exit status where the launching `qwen-mlx` looks (mlx.launch does not pass it on)."""
    target = os.environ.get("QWEN_MLX_STATUS_FILE")
    if target and os.environ.get("MLX_RANK") == "0":
        with contextlib.suppress(OSError):
            Path(target).write_text(str(status))


# -- launching ------------------------------------------------------------------------------------------------


def read_hostfile(path: str) -> dict:
    """An `mlx.launch` hostfile, checked: a list of hosts (or {"hosts": [...]}) with ssh names and IPs."""
    from .loader import read_json

    file = Path(path).expanduser()
    if not file.is_file():
        raise QwenMLXError(f"no hostfile at {file}")
    data = read_json(file)
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or not all(isinstance(h, dict) and isinstance(h.get("ssh"), str) for h in hosts):
        raise QwenMLXError(f'{file} must list hosts as [{{"ssh": "name", "ips": ["10.0.0.2"]}}, ...]')
    if len(hosts) < 2:
        raise QwenMLXError(f"{file} lists {len(hosts)} host; several Macs means two or more")
    backend = data.get("backend", "ring") if isinstance(data, dict) else "ring"
    if backend == "ring" and not all(h.get("ips") for h in hosts):
        missing = next(h["ssh"] for h in hosts if not h.get("ips"))
        raise QwenMLXError(f'{file}: host {missing} has no "ips"; the ring backend connects to IP addresses')
    return {"hosts": hosts, "backend": backend or "ring"}


def rank_count(hostfile: str | None, ranks: int | None) -> int:
    """How many ranks a run will have: one per host in the hostfile, else --ranks on this Mac."""
    if hostfile:
        return len(read_hostfile(hostfile)["hosts"])
    if ranks is None or ranks < 2:
        raise QwenMLXError("--distributed needs --hostfile hosts.json (several Macs) or --ranks N (N >= 2, this Mac)")
    return ranks


def _config_here(model: str, revision: str | None, required: bool) -> dict | None:
    """The model's config.json. When the ranks run here (`required`), the model is found (a Hub repo
    downloaded once, not once per rank) or the error said; on several Macs, where the folder need only
    exist on the hosts that run the ranks, only what this host already has is read, or None."""
    from . import loader

    if Path(model).expanduser().is_dir() or model == "demo" or required:
        return loader.read_config(loader.resolve_model_path(model, revision))
    if not loader.is_hub_repo(model):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json", revision=revision)
    except Exception:  # an odd cache or repo id: the ranks will say what is wrong
        return None
    return loader.read_json(Path(found)) if isinstance(found, str) else None


def preflight(model: str, mode: str, *, hostfile: str | None, ranks: int | None, layers: str | None = None,
              quantize: int | None = None, revision: str | None = None) -> None:  # fmt: skip
    """Check before launching what every rank would otherwise find out (and say) N times: the hosts, the
    mode, and whether the model splits that many ways. `demo` is built here once, not once per rank."""
    from . import loader
    from .config import ModelArgs

    if mode not in MODES:
        raise QwenMLXError(f"--distributed {mode!r} is not a mode: use tp (tensor parallel) or pp (pipeline)")
    n = rank_count(hostfile, ranks)
    if layers and mode != "pp":
        raise QwenMLXError("--layers sets the pipeline's stages: it goes with --distributed pp")
    config = _config_here(model, revision, required=not hostfile)
    if config is None:
        return
    args = ModelArgs.from_dict(config, source=f"{model}/config.json")
    loader.refuse_requantizing(config, quantize, model)
    if mode == "tp":
        check_tensor_parallel(args, n, _quantization_group(config, quantize))
    else:
        split_layers(args.num_hidden_layers, n, layers, [1.0] * n)


def launch_command(argv: list[str], *, hostfile: str | None, ranks: int | None, status_file: str) -> list[str]:
    """The `mlx.launch` command that starts this same `qwen-mlx` command on every rank."""
    launcher = shutil.which("mlx.launch") or str(Path(sys.executable).with_name("mlx.launch"))
    if hostfile:
        backend = read_hostfile(hostfile)["backend"]
        where = ["--hostfile", str(Path(hostfile).expanduser())]
    else:
        backend = "ring"
        where = ["--hosts", "127.0.0.1", "-n", str(rank_count(None, ranks))]
    joins = "jaccl" if backend.startswith("jaccl") else backend  # mlx.launch's jaccl-ring is jaccl inside
    env = [f"QWEN_MLX_STATUS_FILE={status_file}", f"QWEN_MLX_BACKEND={joins}"]
    for name in ("QWEN_MLX_PEER_TIMEOUT", "QWEN_MLX_CACHE", "HF_HUB_OFFLINE", "HF_HOME"):
        if name in os.environ:
            env.append(f"{name}={os.environ[name]}")
    return [
        launcher, "--backend", backend, *where, "--cwd", os.getcwd(),
        *(arg for e in env for arg in ("--env", e)),
        "--", sys.executable, "-m", "qwen_mlx", *argv,
    ]  # fmt: skip


def start_ranks(command: list[str], **popen: Any):
    """Start `mlx.launch` in a session of its own, so that stopping it reaches every local rank."""
    import subprocess

    try:
        return subprocess.Popen(command, start_new_session=True, **popen)
    except FileNotFoundError:
        raise QwenMLXError(f"{command[0]} was not found; it comes with MLX (pip install mlx)") from None


def stop_ranks(process) -> None:
    """End `mlx.launch` and every local process it started: SIGTERM, then SIGKILL for what is left after
    5 s (a rank that is stopped or stuck ignores SIGTERM, and `mlx.launch` would wait on it forever)."""
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


ANSI = re.compile(r"\x1b\[[0-9;]*m")
NODE_EXIT = re.compile(r"\[WARN\] Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")
RANK_LINE = re.compile(r"^qwen-mlx: (?:error \(rank (\d+)\)|error|rank (\d+)): (.*)$")


class Relay:
    """The ranks' stderr as `mlx.launch` passes it on, made readable. A failure that every rank finds is
    said once: rank 0's lines show as they come, the other ranks' error lines are held to the end of the
    run and shown only when rank 0 did not say the same (a follower's failure ends the run, so it is not
    held long). The launcher's coloured exit notes are dropped, except for a rank that died of a signal
    other than the SIGTERM that ends a run."""

    def __init__(self) -> None:
        self.leader_said: set[str] = set()
        self.held: dict[str, str] = {}  # a follower's message -> its first line
        self.leader_exit: int | None = None  # rank 0's exit code, when `mlx.launch` reported a failure

    def clean(self, line: str) -> str | None:
        plain = ANSI.sub("", line).rstrip("\n")
        if found := NODE_EXIT.search(plain):
            code = int(found[2]) if found[2] else -signal.SIGTERM  # "was killed": mlx.launch stopped it
            if found[1] == "0":
                self.leader_exit = code
            if code >= 0 or code == -signal.SIGTERM:
                return None
            try:
                how = signal.Signals(-code).name
            except ValueError:
                how = f"signal {-code}"
            return f"qwen-mlx: rank {found[1]} was ended by {how}\n"
        if found := RANK_LINE.match(plain):
            rank, message = found[1] or found[2] or "0", found[3]
            if rank != "0":
                self.held.setdefault(message, line if line.endswith("\n") else line + "\n")
                return None
            self.leader_said.add(message)
        return line

    def rest(self) -> list[str]:
        """The followers' own failures, at the end of the run."""
        return [line for message, line in self.held.items() if message not in self.leader_said]

    def lines(self, lines) -> list[str]:
        kept = [kept for line in lines if (kept := self.clean(line)) is not None]
        return kept + self.rest()


def _relay(relay: Relay, stream, out) -> None:
    for line in stream:
        if (kept := relay.clean(line)) is not None:
            out.write(kept)
            out.flush()
    out.writelines(relay.rest())
    out.flush()


def launch(argv: list[str], *, hostfile: str | None, ranks: int | None) -> int:
    """Run `qwen-mlx <argv>` on every rank through `mlx.launch` and return rank 0's exit status."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qwen-mlx-") as scratch:
        status_file = os.path.join(scratch, "status")
        command = launch_command(argv, hostfile=hostfile, ranks=ranks, status_file=status_file)
        process = start_ranks(command, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
        relay = Relay()
        relaying = threading.Thread(target=_relay, args=(relay, process.stderr, sys.stderr), daemon=True)
        relaying.start()
        previous = signal.signal(signal.SIGTERM, lambda *_: stop_ranks(process))
        try:
            finished_at = None
            while process.poll() is None:
                # Once rank 0 is done, a rank that does not end (a silent host) is not waited for long.
                if finished_at is None and (os.path.exists(status_file) or relay.leader_exit is not None):
                    finished_at = time.monotonic()
                if finished_at is not None and time.monotonic() - finished_at > RANKS_GRACE_S:
                    stop_ranks(process)
                time.sleep(0.2)
        except KeyboardInterrupt:
            stop_ranks(process)
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
            stop_ranks(process)  # a rank mlx.launch left behind
            relaying.join(timeout=2)  # the last lines
        return leader_status(status_file, relay.leader_exit, process.returncode)


def leader_status(status_file: str, leader_exit: int | None, launcher_exit: int | None) -> int:
    """Rank 0's exit status: from the file it leaves when it runs on this Mac; else (rank 0 on another
    Mac) from `mlx.launch`, which reports a rank's failure and says nothing of a rank that ended well."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path(status_file).read_text())
    if leader_exit is not None:
        return leader_exit if leader_exit > 0 else 1
    if launcher_exit == 0:
        return 0
    print("qwen-mlx: error: the distributed run ended before rank 0 finished (see above)", file=sys.stderr)
    return 1


def on_terminate(signum, frame) -> None:  # noqa: ARG001
    stop("stopped: another rank of the distributed run ended, or the run was interrupted", 1)


def watch_signals() -> None:
    """`mlx.launch` ends every rank with SIGTERM when one of them dies: say so instead of vanishing."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_terminate)


def follow(model, on_generation=None) -> None:
    """A follower's life: mirror each generation rank 0 starts, until rank 0 says exit or goes away.

    `on_generation(generation)` sees each mirrored generation once it ends (the tests compare tokens).
    """
    from .engine import Generation, cache_length, make_cache, trim_cache

    link = model.link
    caches: OrderedDict[str, list] = OrderedDict()
    while True:
        job = link.share()
        if job.get("op") == "exit":
            return
        key = f"{job['cache']}:{job['kv_bits']}"
        cache = caches.pop(key, None)
        if cache is None:
            cache = make_cache(model, job["kv_bits"])
        caches[key] = cache
        while len(caches) > MIRRORED_CACHES:
            caches.popitem(last=False)
        if cache_length(cache) < job["keep"]:
            raise QwenMLXError(f"rank 0 continues a cache of {job['keep']} tokens this rank no longer holds")
        trim_cache(cache, job["keep"])
        generation = Generation(
            model,
            job["prompt"],
            cache,
            sampler=lambda logprobs: mx.zeros(logprobs.shape[:-1], mx.int32),
            max_tokens=job["max_tokens"],
            end_ids=job["end_ids"],
            prefill_step_size=job["prefill_step_size"],
        )
        for _ in generation:
            pass
        if on_generation is not None:
            on_generation(generation)


def run_follower(model) -> int:
    """The whole program of a rank other than 0."""
    try:
        follow(model)
    except PeerLost as error:
        stop(f"rank 0 went away ({error}); stopping")
    return 0


@contextlib.contextmanager
def serve_in_background(args):
    """`qwen-mlx chat --distributed`: the ranks serve the model on a private loopback port, and the chat
    app (which needs this terminal, which `mlx.launch` does not give its ranks) talks to rank 0 there."""
    import secrets
    import socket
    import subprocess
    import tempfile
    import urllib.request

    if not args.model:
        raise QwenMLXError("--distributed needs --model (the model to split across the Macs)")
    preflight(args.model, args.distributed, hostfile=args.hostfile, ranks=args.ranks, layers=args.layers,
              quantize=args.quantize, revision=getattr(args, "revision", None))  # fmt: skip
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api_key = secrets.token_urlsafe(24)
    argv = ["serve", "--model", args.model, "--port", str(port), "--api-key", api_key,
            "--distributed", args.distributed]  # fmt: skip
    for flag, value in (
        ("--quantize", args.quantize),
        ("--layers", args.layers),
        ("--peer-timeout", args.peer_timeout),
    ):
        if value is not None:
            argv += [flag, str(value)]
    with tempfile.TemporaryDirectory(prefix="qwen-mlx-") as scratch:
        status_file = os.path.join(scratch, "status")
        log_file = os.path.join(scratch, "ranks.log")
        command = launch_command(argv, hostfile=args.hostfile, ranks=args.ranks, status_file=status_file)
        with open(log_file, "wb") as log:
            print(f"qwen-mlx: starting the ranks ({args.distributed}); their log: {log_file}", file=sys.stderr)
            ranks = start_ranks(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        endpoint = f"http://127.0.0.1:{port}/v1"
        try:
            while True:  # until rank 0 answers, or the ranks give up
                if ranks.poll() is not None:
                    log_lines = Path(log_file).read_text(errors="replace").strip().splitlines(keepends=True)
                    tail = [line.rstrip("\n") for line in Relay().lines(log_lines)][-5:]
                    raise QwenMLXError("the distributed run ended while loading:\n" + "\n".join(tail))
                request = urllib.request.Request(f"{endpoint}/models", headers={"Authorization": f"Bearer {api_key}"})
                try:
                    with urllib.request.urlopen(request, timeout=2):
                        break
                except OSError:
                    time.sleep(0.5)
            yield endpoint, api_key
        finally:
            stop_ranks(ranks)
