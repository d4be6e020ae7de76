"""The models a user has: short names for the family, `pull`, `list`, `rm`, all from the shapes on disk.

Design decisions:
- Short names (`qwen3:8b`, `qwen3-coder:30b`, `qwen3:4b-2507-thinking`) are data, `loader.FAMILY` (kept
  where names resolve: this module imports the loader, never the other way). Each maps to its official
  repo; `NAME:4bit` / `NAME:8bit` to mlx-community's ready quantized build (`QUANTIZED_REPO`), `NAME:bf16`
  to the official repo. A bare short name is the 4-bit build, as Ollama's default tag is: what fits a Mac.
- Downloads stay in huggingface_hub's own cache (its resume, progress bars, offline mode); only what
  `pull --quantize` converts goes to the models folder, `<cache>/models` (`MODELS_FOLDER`, beside the
  demo model), named `<repo name>-<bits>bit`.
- A name resolves in this order: a folder path, `demo` or `demo-coder`, a folder in the models folder, a short name (its
  conversion in the models folder first, else its repo), a Hub repo id.
- `list` reads config.json and the safetensors headers only, never weights, and one unreadable model is a
  row saying so, not a failed listing.
- `rm` deletes only a direct child of the models folder (resolved, symlinks refused when they point out)
  or a repo of the Hub cache, through huggingface_hub's own cache deletion; a folder is renamed aside
  before it is deleted, so an interrupted `rm` never leaves a half model that `list` would show.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import SAFETENSORS_ITEMSIZE, check_safetensors, read_config, weight_files
from .config import ModelArgs
from .errors import QwenMLXError
from .loader import (
    DEMO_NAMES,
    FAMILY,
    QUANTIZED_REPO,
    REPO_ID,
    converted_name,
    find_named,
    models_dir,
    short_name,
    split_quant,
)
from .memory import Estimate, ModelShape, estimate, memory_budget

LIST_CONTEXT = 32768  # `list` judges the fit at the model's context, capped here (the column says which)
QWEN3_TYPES = ("qwen3", "qwen3_moe")
GIB = 1 << 30


# --- shapes, from config.json and the safetensors headers -------------------------------------------------


@dataclass
class ModelInfo:
    """One model as `list` and `info --context` describe it."""

    shape: ModelShape
    model_type: str
    parameters: int
    active_parameters: int
    bits: str  # "4", "8", "4 (mixed)", "bf16", ...
    disk_bytes: int


def read_model(folder: Path) -> ModelInfo:
    """Describe the model in `folder` from config.json and its safetensors headers (no weight read)."""
    config = read_config(folder)
    args = ModelArgs.from_dict(config, source=str(folder / "config.json"))
    block = config.get("quantization") or {}
    tensors = {name: info for file in weight_files(folder) for name, info in check_safetensors(file).items()}
    weights_bytes, parameters, experts = 0, 0, 0
    float_dtypes = set()
    for name, (dtype, shape) in tensors.items():
        weights_bytes += math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
        if name.endswith((".scales", ".biases")):
            continue
        count = math.prod(shape)
        scales = tensors.get(name.removesuffix(".weight") + ".scales")
        if dtype == "U32" and scales is not None:  # packed: count the weights it unpacks to
            module = block.get(name.removesuffix(".weight"))
            group = module.get("group_size") if isinstance(module, dict) else None
            count = math.prod(shape[:-1]) * scales[1][-1] * (group or block.get("group_size", 64))
        else:
            float_dtypes.add(dtype)
        parameters += count
        if ".mlp.experts." in name or ".mlp.switch_mlp." in name:
            experts += count
    active = parameters
    if args.num_experts:
        active = parameters - experts + experts * args.num_experts_per_tok // args.num_experts
        mlp_width = args.num_experts_per_tok * args.moe_intermediate_size + args.num_experts
    else:
        mlp_width = args.intermediate_size
    activation = 4 if float_dtypes == {"F32"} else 2
    if block:
        mixed = any(isinstance(v, dict) for v in block.values())
        bits = f"{block.get('bits')}" + (" (mixed)" if mixed else "")
    else:
        bits = "/".join(sorted(d.lower() for d in float_dtypes)) or "?"
    shape = ModelShape(
        weights_bytes=weights_bytes,
        layers=args.num_hidden_layers,
        hidden_size=args.hidden_size,
        attention_heads=args.num_attention_heads,
        kv_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        vocab_size=args.vocab_size,
        mlp_width=mlp_width,
        activation_bytes=activation,
        context_length=args.context_length,
    )
    disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())  # follows the Hub cache's links
    return ModelInfo(shape, args.model_type, parameters, active, bits, disk)


# --- list -----------------------------------------------------------------------------------------------


@dataclass
class Entry:
    name: str
    where: str  # "demo", "models", "hub"
    folder: Path | None
    info: ModelInfo | None = None
    error: str | None = None
    fit: Estimate | None = None


def hub_cache_models() -> list[tuple[str, Path]]:
    """(repo id, snapshot folder) of every Qwen3 model in huggingface_hub's cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from .files import read_json

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return []
    found = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)[:1]:
            config = revision.snapshot_path / "config.json"
            try:
                model_type = read_json(config).get("model_type") if config.is_file() else None
            except QwenMLXError:
                model_type = None
            if model_type in QWEN3_TYPES:
                found.append((repo.repo_id, revision.snapshot_path))
    return found


def list_models(budget: int | None = None) -> list[Entry]:
    """Every model this machine can run: the demo, the models folder, the Hub cache's Qwen3 repos."""
    from .demo import built_dir

    budget = memory_budget() if budget is None else budget
    entries = [Entry(name, "demo", built_dir(name)) for name in DEMO_NAMES]
    root = models_dir()
    if root.is_dir():
        entries += [
            Entry(p.name, "models", p)
            for p in sorted(root.iterdir())
            if not p.name.startswith(".") and (p / "config.json").is_file()
        ]
    entries += [Entry(repo, "hub", path) for repo, path in hub_cache_models()]
    for entry in entries:
        if entry.folder is None:
            continue
        try:
            entry.info = read_model(entry.folder)
        except QwenMLXError as error:
            entry.error = str(error)
            continue
        entry.fit = list_fit(entry.info.shape, budget)
    return entries


def list_fit(shape: ModelShape, budget: int | None = None) -> Estimate:
    """The fit `list` shows (and the picker and a server's budget count): the estimate at the model's own
    context, capped at `LIST_CONTEXT`, against `budget`."""
    return estimate(shape, min(shape.context_length, LIST_CONTEXT), budget=budget)


def count_text(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def context_text(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else f"{n:,}"


def size_text(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.1f} MiB"


def fit_text(fit: Estimate | None) -> str:
    if fit is None or fit.fits is None:
        return "?"
    verdict = "yes" if fit.fits else "no"
    return f"{verdict} ({size_text(fit.total)} of {size_text(fit.budget)} at {context_text(fit.context)})"


COLUMNS = ("NAME", "ARCH", "PARAMS", "BITS", "SIZE", "CONTEXT", "FITS")


def entry_row(e: Entry, note: str | None = None) -> tuple[str, ...]:
    """`list`'s cells for one entry (`COLUMNS`); a model it cannot describe gets `note` (else why) in ARCH."""
    if e.info is None:
        build = "qwen-mlx demo build" + (" --coder" if e.name == "demo-coder" else "")
        why = f"built on first use ({build})" if e.where == "demo" else f"unreadable: {e.error}"
        return (e.name, note or why, "", "", "", "", "")
    i = e.info
    params = count_text(i.parameters)
    if i.active_parameters != i.parameters:
        params += f" ({count_text(i.active_parameters)} active)"
    return (e.name, i.model_type, params, i.bits, size_text(i.disk_bytes),
            context_text(i.shape.context_length), fit_text(e.fit))  # fmt: skip


def format_table(entries: list[Entry]) -> str:
    # A note (not built, unreadable) runs on past the ARCH column instead of widening it; its name still counts.
    return table_text([COLUMNS, *(entry_row(e) for e in entries)], spills=1)


def table_text(rows: list[tuple[str, ...]], spills: int | None = None) -> str:
    """`rows` in left-aligned columns two spaces apart; a cell of 40 or more characters in column `spills`
    runs on past it instead of widening it."""
    widths = [max(len(row[c]) for row in rows if c != spills or len(row[c]) < 40) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


# --- pull -----------------------------------------------------------------------------------------------


def pull(name: str, quantize: int | None = None, *, evaluate: bool = True, log: Callable[[str], None] = print) -> Path:
    """Download `name` (a short name, `REPO` or `REPO:4bit`) into the Hub cache; with a quantization asked of
    a float repo, convert it into the models folder (with the converter's quality report unless not
    `evaluate`). Returns the folder the model loads from."""
    from .loader import resolve_model_path

    family = short_name(name)
    if family is not None:
        repo, quant = family
        bits = quantize
        if bits is None and quant != "bf16":
            repo = QUANTIZED_REPO.format(name=repo.rsplit("/", 1)[-1], bits=quant.removesuffix("bit"))
    else:
        repo, bits = split_quant(name)
        if quantize is not None and bits is not None and quantize != bits:
            raise QwenMLXError(f"{name} asks for {bits}-bit and --quantize for {quantize}-bit: keep one")
        bits = quantize or bits
        if not REPO_ID.match(repo) or repo.startswith((".", "~")):
            raise QwenMLXError(
                f"{name!r} is neither a Hugging Face repo id (owner/name) nor a short name "
                f"({', '.join(list(FAMILY)[:4])}, ...; `qwen-mlx pull --help` lists them)"
            )
    snapshot = resolve_model_path(repo)
    if bits is None:
        log(f"pulled {repo} into the Hugging Face cache: {snapshot}")
        return snapshot
    if read_config(snapshot).get("quantization"):
        raise QwenMLXError(f"{repo} is already quantized; pull it without --quantize")
    from .convert.core import convert
    from .convert.report import format_report

    out = models_dir() / converted_name(repo, bits)
    if (out / "config.json").is_file():
        log(f"{out} is already there (qwen-mlx rm {out.name} to convert again)")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    conversion = convert(snapshot, out, bits=bits, evaluate=evaluate, log=log)
    if conversion.report:
        log(format_report(conversion.report))
    log(f"pulled {repo} as {bits}-bit into {out} (its float source stays in the Hub cache: qwen-mlx rm {repo})")
    return out


# --- rm -------------------------------------------------------------------------------------------------


def removal_target(name: str) -> tuple[str, Path]:
    """What `rm NAME` would delete: ("hub", the repo's cache folder) or ("models", a models-folder child)."""
    if name in DEMO_NAMES:
        raise QwenMLXError(f"{name} is not in the models folder; it lives in qwen-mlx's cache and rebuilds itself")
    for repo, snapshot in hub_cache_models():
        if repo == name:
            return "hub", snapshot.parent.parent
    family = short_name(name)
    if family is not None:
        target = find_named(name)
        if isinstance(target, Path):
            name = str(target)
        else:
            return removal_target(target)
    root = models_dir().resolve()
    candidate = models_dir() / name  # an absolute NAME replaces the root: checked below like any other
    resolved = candidate.resolve()
    if resolved.parent != root or not resolved.is_relative_to(root):
        where = "a symlink out of" if candidate.is_symlink() else "not in"
        raise QwenMLXError(
            f"{name} is {where} the models folder ({root}) nor a Qwen3 repo in the Hugging Face cache; "
            "`qwen-mlx list` shows what can be removed"
        )
    if not resolved.is_dir():
        raise QwenMLXError(f"no model {name!r} in {root} or the Hugging Face cache; `qwen-mlx list` shows them")
    return "models", candidate


REMOVING = ".removing-"  # the prefix a model folder is renamed to while `rm` deletes it


def remove(name: str, confirm: Callable[[str], bool]) -> Path:
    """Delete model `name` once `confirm(question)` agrees; returns what was removed."""
    where, target = removal_target(name)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file() and not p.is_symlink())
    if not confirm(f"remove {target} ({size_text(size)})?"):
        raise QwenMLXError(f"kept {name}: nothing removed")
    if where == "hub":
        from huggingface_hub import scan_cache_dir

        cache = scan_cache_dir()
        repo = next(r for r in cache.repos if r.repo_path == target)
        cache.delete_revisions(*(rev.commit_hash for rev in repo.revisions)).execute()
        if target.exists():  # refs and blobs of no revision that the strategy leaves behind
            shutil.rmtree(target)
        return target
    if target.is_symlink():  # a link inside the folder: remove the link, never what it points to
        target.unlink()
        return target
    aside = target.with_name(f"{REMOVING}{target.name}")
    target.rename(aside)  # one step out of sight: `list` skips dot-folders, so a half-deleted model never shows
    shutil.rmtree(aside)
    for stale in target.parent.glob(f"{REMOVING}*"):  # what an interrupted `rm` left (the rename had happened)
        shutil.rmtree(stale, ignore_errors=True)
    return target
