"""Saving a model in mlx-lm's on-disk format, atomically.

The folder matches what `mlx_lm.convert` writes, so it loads in `mlx_lm.load` as well as ours: shards of
at most 5 GiB (`model.safetensors`, or `model-0000K-of-0000N.safetensors`) with metadata
`format: mlx`, `model.safetensors.index.json` with `total_size`, `total_parameters` and a sorted weight
map, and `config.json` with keys sorted and the `quantization` block duplicated as
`quantization_config`. Everything is written into a temporary folder beside the target and renamed into
place only when complete, so a failure never leaves a half-written model behind. A model loaded with fused
projections (`qwen_mlx.fuse`) is written unfused: the tensors mlx-lm names, byte for byte as they were read.

Design decisions for writing OUT (`write_folder`):
- Beside OUT live only names of our own kind: `.OUT.tmp-XXXXXXXX` (the folder being written),
  `.OUT.old-XXXXXXXX` (a replaced OUT, set aside between the two renames of an overwrite) and
  `.OUT.lock`. An error, Ctrl-C or SIGTERM removes them; SIGKILL or a power cut cannot, so every run
  first recovers: a leftover temporary folder is removed, and an aside folder is renamed back to OUT
  when OUT is missing (killed between `OUT -> .OUT.old-X` and `.OUT.tmp-X -> OUT`), else removed (killed
  after the swap). Each says so in one line. `recover_output` is that step alone.
- A run holds `fcntl.flock` on `.OUT.lock` from its recovery to its last rename, so anything of our
  kind that a lock holder finds belongs to a dead run and is safe to remove, and a live run's temporary
  folder is never touched. A lock rather than a pid written down: the kernel drops it when its holder
  dies however it dies, and a pid can be reused or belong to another machine or container sharing the
  disk. A second run for the same OUT waits its turn (said in one line). Swapping in one step would need
  `renameat2(RENAME_EXCHANGE)`, Linux-only and not in the standard library; recovery works on macOS too.
- The lock file is unlinked while still locked, and a run that locks a file checks that it is still the
  one at that path, so a waiting run never holds a lock on an unlinked file.
- Writing failures (a full disk: MLX's `RuntimeError [write]` or `OSError` ENOSPC/EFBIG; a folder that
  cannot be written; a file where a folder should be) become one `QwenMLXError` naming OUT and saying
  what to do, after the temporary folder is gone and a replaced OUT is back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .checkpoint import Loaded
from .config import ModelArgs
from .errors import QwenMLXError
from .fuse import unfused_parameters
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
# What `write_folder` leaves beside OUT while it runs: `.OUT.tmp-XXXXXXXX` and `.OUT.old-XXXXXXXX`. The
# 8 characters cover tempfile.mkdtemp's names too, which earlier versions used.
SIDE_FOLDER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-[a-z0-9_]{8}")
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
NOT_WRITABLE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


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
    """Refuse an `out` that exists and holds something, unless it may be overwritten, or that sits under a file."""
    ancestor = out.parent
    while not (ancestor.exists() or ancestor.is_symlink()) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise QwenMLXError(f"cannot write {out}: {ancestor} is a file, not a folder; choose another output path")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise QwenMLXError(f"{out} already exists and is not empty; choose another folder or {hint}")


def write_folder(
    out: Path, write: Callable[[Path], None], overwrite: bool = False, log: Callable[[str], None] = _note
) -> Path:
    """Run `write(tmp_folder)` and move the result to `out` only when it completes.

    Whatever stops it (an error, Ctrl-C, SIGTERM turned into SystemExit), the temporary folder goes and
    an `out` being replaced is put back as it was; what a SIGKILL left is cleaned up by the next run.
    """
    out = Path(out).expanduser()
    check_out_folder(out, overwrite)
    tmp: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with output_lock(out, log):
            _recover(out, log)
            check_out_folder(out, overwrite)  # recovery may have put an earlier OUT back
            tmp = _new_side_folder(out)
            _fill_and_swap(out, tmp, write)
    except OSError as error:
        raise _write_error(out, error, tmp) from None
    return out


def recover_output(out: str | Path, log: Callable[[str], None] = _note, wait: bool = True) -> None:
    """Undo what an interrupted `write_folder` left beside `out` (see the module docstring).

    A run writing `out` at the same time is waited for, or with `wait=False` refused.
    """
    out = Path(out).expanduser()
    if not out.parent.is_dir():
        return  # nothing can be beside it; check_out_folder names a file in the way
    try:
        with output_lock(out, log, wait=wait):
            _recover(out, log)
    except OSError as error:
        raise _write_error(out, error) from None


@contextlib.contextmanager
def output_lock(out: Path, log: Callable[[str], None] = _note, wait: bool = True) -> Iterator[None]:
    """Hold the exclusive lock on `.OUT.lock` for the block; the file is gone afterwards."""
    path = out.with_name(f".{out.name}.lock")
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                if not wait:
                    raise QwenMLXError(
                        f"another process{holder} is writing {out}; wait for it to finish or choose another folder"
                    ) from None
                if not waited:
                    log(f"waiting for another process{holder} that is writing {out}")
                    waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            # The holder we waited for unlinks the file before letting go: then lock the new one.
            mine = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _lock_holder(fd: int) -> str:
    """' (pid N)' from the lock file, for the message only; the lock, not the pid, decides."""
    try:
        pid = int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})"


def _side_folders(out: Path) -> dict[str, list[Path]]:
    """The `.OUT.tmp-*` and `.OUT.old-*` entries beside `out`, by kind."""
    found: dict[str, list[Path]] = {"tmp": [], "old": []}
    for entry in out.parent.iterdir():
        match = SIDE_FOLDER.fullmatch(entry.name)
        if match and match["name"] == out.name:
            found[match["kind"]].append(entry)
    return found


def _recover(out: Path, log: Callable[[str], None]) -> None:
    """With the lock held: put back an OUT set aside by a killed overwrite, remove the rest of our kind."""
    found = _side_folders(out)
    if found["old"] and not (out.exists() or out.is_symlink()):
        # One run at a time swaps, and each recovers first, so there is at most one; the newest if not.
        aside = max(found["old"], key=lambda path: path.lstat().st_mtime)
        aside.rename(out)
        found["old"].remove(aside)
        log(f"restored {out} from {aside.name}, where an interrupted run that was replacing it had set it aside")
    stale = sorted(found["tmp"] + found["old"])
    for path in stale:
        _remove(path)
    if stale:
        log(f"removed what interrupted runs left beside {out}: {', '.join(path.name for path in stale)}")


def _new_side_folder(out: Path) -> Path:
    # mkdir, not mkdtemp: the folder gets the usual umask permissions, and the name is ours to match.
    while True:
        tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _fill_and_swap(out: Path, tmp: Path, write: Callable[[Path], None]) -> None:
    old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
    try:
        write(tmp)
        if out.exists() or out.is_symlink():
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        if (old.exists() or old.is_symlink()) and not (out.exists() or out.is_symlink()):
            old.rename(out)
        _remove(tmp)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _write_error(out: Path, error: OSError, tmp: Path | None = None) -> QwenMLXError:
    """A writing failure as one line: which file, why, and what to do."""
    # A failed copy names its source first (shutil's sendfile path); no room is about the file written.
    written = error.filename2 if error.filename2 and error.errno in DISK_FULL_ERRNOS else error.filename
    where = str(written) if written else str(out)
    if tmp is not None and where.startswith(str(tmp)):
        where = str(out) + where[len(str(tmp)) :]  # the temporary folder is gone; name the file as OUT's
    reason = error.strerror or str(error)
    if error.errno in DISK_FULL_ERRNOS:
        advice = "free some disk space (or raise the file-size limit) or choose an output folder on another disk"
    elif error.errno in NOT_WRITABLE_ERRNOS:
        advice = "choose an output folder you can write to"
    elif error.errno in (errno.ENOTDIR, errno.EEXIST):
        advice = "a file is in the way; choose another output path"
    else:
        advice = "check the output folder and its disk"
    state = f"{out} was left as it was" if out.exists() else "nothing was written"
    return QwenMLXError(f"could not write {where}: {reason}; {advice} ({state})")


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
        _save_shard(folder / name, shard)
        weight_map.update(dict.fromkeys(shard, name))
        del shard
        mx.clear_cache()
    index = {
        "metadata": {"total_size": total_size, "total_parameters": total_parameters},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4), encoding="utf-8")


def _save_shard(file: Path, shard: dict[str, mx.array]) -> None:
    try:
        mx.save_safetensors(str(file), shard, metadata={"format": "mlx"})
    except RuntimeError as error:
        # MLX drops errno. A write that fails once the file is open ("[write] Unable to write N bytes") is
        # a full disk or a file-size limit; the free space tells which.
        if shutil.disk_usage(file.parent).free < sum(value.nbytes for value in shard.values()):
            code = errno.ENOSPC
        else:
            code = errno.EFBIG if str(error).startswith("[write]") else errno.EIO
        raise OSError(code, str(error), str(file)) from None


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
        weights = unfused_parameters(model)
        write_weights(folder, weights, parameter_count(model), max_shard_bytes)
        write_config(folder, config)
        copy_companions(source, folder)

    return write_folder(Path(out), write, overwrite=overwrite)
