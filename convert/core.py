"""Converting a Qwen3 checkpoint into an MLX folder, tensor by tensor.

Design decisions:
- Streaming, not loading: every input tensor is a lazy `mx.load` array, every output tensor a lazy
  expression of it (decode FP8 or MLX-quantized weights, stack experts, cast, `mx.quantize`). The writer
  evaluates one output shard at a time and drops it, and nothing else holds an evaluated input, so
  peak memory is about one output shard plus the inputs its tensors come from, not the model's size.
- The module decisions come from the same `quantization_plan` the loader uses on a lazily built (never
  evaluated) model, and the tensors from the same `mx.quantize` that MLX's quantized layers call, so a
  converted folder equals what `mlx_lm.convert` writes tensor for tensor and loads in both runtimes.
- The official Qwen3 FP8 checkpoints (float8_e4m3 weights, one `weight_scale_inv` per 128x128 block, as
  `quantization_config` describes) are decoded exactly with `mx.from_fp8`; mlx-lm cannot read them.
- The folder is written beside OUT and renamed into place only when complete (`write_folder`), after a
  disk-space check, so a failed or interrupted conversion leaves neither OUT nor a temporary folder. What
  a SIGKILL left (a temporary folder, or an OUT set aside by `--force`) is undone first, before any
  reading, by `recover_output`: the aside OUT comes back, the rest goes, each with a note on stderr.
- The quality report runs in the dtype the model was converted to, unless the device cannot compute
  its experts in it (MLX's CPU backend has `gather_mm` for float32 only): then both models are scored
  in float32, which measures the same quantization error, and a note says so.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

import qwen_mlx
from qwen_mlx.checkpoint import DTYPES, cast_floats, check_weights, checkpoint_args, read_config, read_weights
from qwen_mlx.config import ModelArgs
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.loader import resolve_model_path
from qwen_mlx.memory import metal_working_set
from qwen_mlx.model import Model
from qwen_mlx.quant import check_bits, check_saved_block, quantization_plan, saved_module_quantization
from qwen_mlx.save import (
    MAX_SHARD_BYTES,
    check_out_folder,
    copy_companions,
    export_config,
    recover_output,
    write_config,
    write_folder,
    write_weights,
)

from .recipes import load_recipe
from .report import MAX_CALIBRATION_TOKENS, format_report, human_size, quality_report, write_report

DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 64
FP8_BLOCK = (128, 128)
# Room left on the disk beyond the estimated output: config, tokenizer files and filesystem slack.
DISK_MARGIN_BYTES = 64 << 20
# The quality report holds the full-precision source in memory; beyond this share of it, it is skipped.
EVAL_MEMORY_FRACTION = 0.8
# Metadata a source README's front matter may carry over into the model card.
CARD_FIELDS = ("license", "license_name", "license_link", "language")


@dataclass
class Source:
    """A checkpoint to convert: where it is, its config, and what kind of weights it holds."""

    name: str
    path: Path
    config: dict[str, Any]
    args: ModelArgs
    kind: str  # "float", "fp8" or "mlx-quantized"

    @property
    def quantization(self) -> dict[str, Any] | None:
        return self.config.get("quantization") if self.kind == "mlx-quantized" else None


@dataclass
class Conversion:
    """What a conversion wrote."""

    out: Path
    quantization: dict[str, Any] | None
    dtype: str
    parameters: int
    size_bytes: int
    bits_per_weight: float
    report: dict[str, Any] | None = None
    files: list[str] = field(default_factory=list)


def open_source(source: str | Path, revision: str | None = None) -> Source:
    path = resolve_model_path(source, revision)
    config = read_config(path)
    args = checkpoint_args(path, config)  # bounded by the weights' headers before any model is built
    kind = "float"
    if isinstance(config.get("quantization"), dict):
        kind = "mlx-quantized"
    elif isinstance(hf_quant := config.get("quantization_config"), dict):
        method = hf_quant.get("quant_method")
        if method != "fp8":
            raise QwenMLXError(
                f"{path / 'config.json'}: quant_method {method!r} is not supported; qwen-mlx converts float "
                "checkpoints, MLX folders and the official block-FP8 ones (quant_method 'fp8')"
            )
        kind = "fp8"
    return Source(name=str(source), path=path, config=config, args=args, kind=kind)


def source_dtype(source: Source) -> str | None:
    """The float dtype the source declares (transformers 4.x `torch_dtype` or 5.x `dtype`)."""
    for key in ("torch_dtype", "dtype"):
        if source.config.get(key) in DTYPES:
            return source.config[key]
    return None


def float_weights(source: Source, model: Model, dtype: mx.Dtype | None) -> dict[str, mx.array]:
    """The source's weights as lazy float arrays under our names, checked against the config's shapes."""
    weights = read_weights(source.path, allow_fp8=source.kind == "fp8")
    if source.kind == "fp8":
        block = source.config["quantization_config"].get("weight_block_size") or FP8_BLOCK
        weights = decode_fp8(weights, tuple(block), source.path)
    weights = model.sanitize(weights)
    if source.kind == "mlx-quantized":
        weights = dequantize_mlx(weights, source.quantization, model, source.path)
    check_weights(model, weights, source.path)
    if dtype is not None:
        weights = cast_floats(weights, dtype)
    return weights


def decode_fp8(weights: dict[str, mx.array], block: tuple[int, int], path: Path) -> dict[str, mx.array]:
    """Block-FP8 weights to float32: each 128x128 block of e4m3 values times its `weight_scale_inv`."""
    weights = {k: v for k, v in weights.items() if not k.endswith((".input_scale", ".activation_scale"))}
    rows, cols = block
    for scale_name in [k for k in weights if k.endswith(".weight_scale_inv")]:
        name = scale_name.removesuffix("_scale_inv")
        if name not in weights:
            raise QwenMLXError(f"{path}: {scale_name} has no tensor {name} to scale")
        raw, scale = weights[name], weights.pop(scale_name)
        out_dims, in_dims = raw.shape[-2:]
        expected = (-(-out_dims // rows), -(-in_dims // cols))
        if raw.dtype != mx.uint8 or tuple(scale.shape[-2:]) != expected:
            raise QwenMLXError(
                f"{path}: tensor {name} ({raw.dtype}, {tuple(raw.shape)}) with scales {tuple(scale.shape)} is not "
                f"block-FP8 as its config describes (float8_e4m3 weights, {rows}x{cols} blocks: scales {expected})"
            )
        scale = mx.repeat(mx.repeat(scale.astype(mx.float32), rows, axis=-2), cols, axis=-1)
        weights[name] = mx.from_fp8(raw, dtype=mx.float32) * scale[..., :out_dims, :in_dims]
    if leftover := [k for k, v in weights.items() if v.dtype == mx.uint8]:
        raise QwenMLXError(f"{path}: FP8 tensor {leftover[0]} has no {leftover[0]}_scale_inv beside it")
    return weights


def dequantize_mlx(weights: dict[str, mx.array], block: dict, model: Model, path: Path) -> dict[str, mx.array]:
    """MLX affine-quantized modules back to floats (bits and group size as the loader reads them)."""
    source = str(path / "config.json")
    check_saved_block(block, source)
    expected = dict(tree_flatten(model.parameters()))
    for scales_name in [k for k in weights if k.endswith(".scales")]:
        module = scales_name.removesuffix(".scales")
        if f"{module}.weight" not in expected or f"{module}.weight" not in weights:
            raise QwenMLXError(f"{path}: unexpected tensor {scales_name}; the weights do not match config.json")
        in_dims = expected[f"{module}.weight"].shape[-1]
        params = saved_module_quantization(block, module, in_dims, weights, source)
        packed, scales = weights[f"{module}.weight"], weights.pop(scales_name)
        biases = weights.pop(f"{module}.biases", None)
        if params is not None:
            weights[f"{module}.weight"] = mx.dequantize(packed, scales, biases, **params)
    return weights


def quantized_outputs(
    weights: dict[str, mx.array], order: list[str], plan: dict[str, dict[str, int]]
) -> dict[str, mx.array]:
    """Lazy output tensors in the model's parameter order; the planned modules packed by `mx.quantize`."""
    outputs: dict[str, mx.array] = {}
    for name in order:
        value = weights.pop(name)
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in plan:
            q = plan[module]
            packed, scales, biases = mx.quantize(value, group_size=q["group_size"], bits=q["bits"])
            outputs.update({name: packed, f"{module}.scales": scales, f"{module}.biases": biases})
        else:
            outputs[name] = value
    return outputs


def check_disk_space(out: Path, needed: int) -> None:
    existing = out.resolve()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed + DISK_MARGIN_BYTES > free:
        raise QwenMLXError(
            f"not enough disk space for {out}: the converted model needs about {human_size(needed)} and "
            f"{existing} has {human_size(free)} free"
        )


def model_card(source: Source, out: Path, conversion: Conversion) -> str:
    """A README in the Hub's model-card shape: front matter, what this is, how to use it."""
    front = {"library_name": "mlx", "pipeline_tag": "text-generation", "tags": ["mlx", "qwen3", "qwen-mlx"]}
    readme = source.path / "README.md"
    if readme.is_file() and (match := re.match(r"---\n(.*?)\n---", readme.read_text(encoding="utf-8"), re.S)):
        for line in match.group(1).splitlines():
            key, _, value = line.partition(":")
            if key.strip() in CARD_FIELDS and value.strip():
                front[key.strip()] = value.strip()
    is_repo = not Path(source.name).expanduser().exists()
    if is_repo:
        front["base_model"] = source.name
    lines = ["---", *(f"{k}: {json.dumps(v) if isinstance(v, list) else v}" for k, v in front.items()), "---", ""]
    origin = f"[{source.name}](https://huggingface.co/{source.name})" if is_repo else f"`{source.path.name}`"
    if conversion.quantization:
        what = f"{conversion.quantization['bits']}-bit affine quantization, group size "
        what += f"{conversion.quantization['group_size']}"
        if overrides := sum(isinstance(v, dict) for v in conversion.quantization.values()):
            what += f", {overrides} module(s) with their own bits"
    else:
        what = f"{conversion.dtype} weights"
    lines += [
        f"# {out.name}",
        "",
        f"{origin} converted to MLX with qwen-mlx {qwen_mlx.__version__}: {what} "
        f"({conversion.bits_per_weight:.2f} bits per weight, {human_size(conversion.size_bytes)}).",
        "",
        "## Use",
        "",
        "```python",
        "import mlx.core as mx, qwen_mlx",
        f'model = qwen_mlx.load("{out.name}")',
        "```",
        "",
        f'The folder is in mlx-lm\'s format, so `mlx_lm.load("{out.name}")` reads it too.',
    ]
    if conversion.report:
        lines += ["", "## Quantization quality", "", "```", format_report(conversion.report), "```"]
    return "\n".join(lines) + "\n"


def convert(
    source: str | Path,
    out: str | Path,
    *,
    bits: int | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    dtype: str | None = None,
    recipe: str | None = None,
    dequantize: bool = False,
    force: bool = False,
    evaluate: bool = True,
    revision: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = True,
    eval_tokens: int = MAX_CALIBRATION_TOKENS,
    log: Callable[[str], None] = lambda text: print(text, file=sys.stderr),
) -> Conversion:
    """Convert `source` (folder or repo id) into the MLX folder `out`; quantize when `bits` or `recipe`."""
    recipe_file = load_recipe(recipe) if recipe else None
    if recipe_file and bits is None:
        bits = recipe_file.bits
    if bits is not None:
        check_bits(bits, group_size)
    if dequantize and bits is not None:
        raise QwenMLXError("choose either quantization (bits or a recipe) or --dequantize, not both")
    if dtype is not None and dtype not in DTYPES:
        raise QwenMLXError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    out = Path(out).expanduser()
    # Both done again by write_folder; here so a refusal (or a restored OUT) comes before any reading.
    recover_output(out, log)
    check_out_folder(out, force, hint="pass --force")

    src = open_source(source, revision)
    if out.resolve() == src.path.resolve() or src.path.resolve() in out.resolve().parents:
        raise QwenMLXError(f"{out} is inside the source folder {src.path}; write the conversion somewhere else")
    # --force replaces OUT whole, so an OUT holding the source would delete the checkpoint it converts.
    if force and out.resolve() in src.path.resolve().parents:
        raise QwenMLXError(
            f"{out} holds the source folder {src.path}; --force would delete it, so write the conversion somewhere else"
        )
    if src.kind == "mlx-quantized" and bits is None and not dequantize:
        raise QwenMLXError(
            f"{src.path} is already quantized; pass --q-bits or --recipe to re-quantize it, or --dequantize"
        )
    if dequantize and src.kind != "mlx-quantized":
        raise QwenMLXError(f"{src.path} is not an MLX-quantized folder; --dequantize has nothing to undo")

    dtype = dtype or source_dtype(src) or ("bfloat16" if src.kind == "fp8" else None)
    model = Model(src.args)  # lazy: its parameters give names and shapes and are never evaluated
    weights = float_weights(src, model, DTYPES[dtype] if dtype else None)
    dtype = dtype or str(next(iter(weights.values())).dtype).removeprefix("mlx.core.")
    order = [name for name, _ in tree_flatten(model.parameters())]
    parameters = sum(weights[name].size for name in order)
    block, plan = None, {}
    if bits is not None:
        predicate = recipe_file.predicate(src.args.num_hidden_layers, group_size) if recipe_file else None
        block, plan = quantization_plan(model, bits, group_size, predicate)
    outputs = quantized_outputs(weights, order, plan)
    size = sum(v.nbytes for v in outputs.values())
    check_disk_space(out, size)

    config = dict(src.config)
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    if block is not None:
        config["quantization"] = block
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype
    conversion = Conversion(
        out=out,
        quantization=block,
        dtype=dtype,
        parameters=parameters,
        size_bytes=size,
        bits_per_weight=size * 8 / parameters,
    )

    def write(folder: Path) -> None:
        bar = _progress_bar(len(outputs), "quantizing and writing" if plan else "writing", progress)
        try:
            write_weights(folder, outputs, parameters, max_shard_bytes, on_tensor=lambda *_: bar.update(1))
        finally:
            bar.close()
        conversion.size_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        write_config(folder, export_config(config, src.args))
        copy_companions(src.path, folder)
        if block is not None and evaluate:
            conversion.report = _evaluate(src, folder, dtype, conversion, eval_tokens, log)
        (folder / "README.md").write_text(model_card(src, out, conversion), encoding="utf-8")
        conversion.files = sorted(p.name for p in folder.iterdir())

    log(f"converting {src.path} ({src.kind}, {src.args.model_type}) -> {out}")
    write_folder(out, write, overwrite=force, log=log)
    return conversion


def _evaluate(
    src: Source, folder: Path, dtype: str, conversion: Conversion, eval_tokens: int, log: Callable[[str], None]
) -> dict[str, Any] | None:
    """Score the source and the written result on the calibration text, one model in memory at a time."""
    # The source's own file when it has one (the copy in `folder` is the same, in a folder about to move).
    tokenizer = next((f for f in (src.path / "tokenizer.json", folder / "tokenizer.json") if f.is_file()), None)
    if tokenizer is None:
        log("no tokenizer.json beside the weights: skipping the quality report")
        return None

    if src.args.num_experts and not gather_mm_computes(DTYPES[dtype]):
        log(f"this device has no {dtype} gather_mm for the experts: measuring quality in float32")
        dtype = "float32"

    def source_model() -> Model:
        model = Model(src.args)
        model.load_weights(list(float_weights(src, model, DTYPES[dtype]).items()), strict=True)
        mx.eval(model.parameters())
        return model

    # The source is scored at full precision, in memory: past what the machine holds it would swap for hours.
    source_bytes = conversion.parameters * DTYPES[dtype].size
    if (room := memory_for_models()) is not None and source_bytes > EVAL_MEMORY_FRACTION * room:
        log(
            f"skipping the quality report: the source model needs {human_size(source_bytes)} in memory and this "
            f"machine has {human_size(room)} (pass --no-eval to skip it quietly)"
        )
        return None
    log("measuring quality on the calibration text (skip with --no-eval)")
    try:
        report = quality_report(
            source_model,
            lambda: qwen_mlx.load(folder, dtype=dtype),
            tokenizer,
            bits_per_weight=conversion.bits_per_weight,
            size_bytes=conversion.size_bytes,
            max_tokens=eval_tokens,
        )
    except RuntimeError as error:
        # The weights are written and sound; a kernel this device lacks must not cost the conversion.
        log(f"skipping the quality report: MLX could not evaluate the model on this device ({error})")
        return None
    write_report(report, folder)
    return report


@functools.cache
def gather_mm_computes(dtype: mx.Dtype) -> bool:
    """Whether the default device evaluates `mx.gather_mm` (unquantized experts) in `dtype`.

    Asked of MLX with a one-element product rather than assumed from the device, so a backend that
    gains the kernel is used as it is.
    """
    try:
        mx.eval(mx.gather_mm(mx.ones((1, 1), dtype), mx.ones((1, 1, 1), dtype), rhs_indices=mx.array([0])))
    except (RuntimeError, ValueError):
        return False
    return True


def memory_for_models() -> int | None:
    """Bytes a model can occupy: the GPU's working set on Metal, else physical memory; None if unknown."""
    if (working_set := metal_working_set()) is not None:
        return working_set
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def _progress_bar(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="tensor", disable=not enabled, leave=False)
