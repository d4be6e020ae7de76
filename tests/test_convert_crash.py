"""The converter when writing fails or the process dies: one line, and nothing left but the previous output.

Disk full is real here, not mocked: the converter runs under RLIMIT_FSIZE (SIGXFSZ ignored, as Python
does), so MLX's shard writer fails with its own `RuntimeError [write]` and Python's copies with `OSError`
EFBIG, where a full disk gives ENOSPC to the same calls. SIGKILL cannot be cleaned up after, so each
kill test checks what the next run (or `recover_output`, its first step) makes of what was left.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import pytest
from test_convert_bad_input import PROG, refusal, run_convert, stop_once_writing

from qwen_mlx import QwenMLXError
from qwen_mlx.convert import convert
from qwen_mlx.save import output_lock, recover_output

KILLS = 16
# Kills are drawn over this multiple of a whole run, so some land after it finished (OUT replaced).
KILL_SPAN = 1.3
# Stops Python itself right after the first of --force's two renames (OUT -> .OUT.old-X), as a SIGKILL
# landing between them would.
KILL_AFTER_SETTING_ASIDE = """
import os, signal, sys
from pathlib import Path

rename = Path.rename

def rename_then_die(self, target):
    result = rename(self, target)
    if Path(target).name.startswith(".OUT.old-"):
        os.kill(os.getpid(), signal.SIGKILL)
    return result

Path.rename = rename_then_die
from qwen_mlx.convert.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def parent(tmp_path) -> Path:
    folder = tmp_path / "parent"
    folder.mkdir()
    return folder


def convert_command(source: Path, out: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "qwen_mlx.convert", str(source), "-o", str(out), "--q-bits", "4", *options]


def previous_output(out: Path, checkpoint) -> dict[str, str]:
    """A real earlier conversion in `out`, marked so a replacement shows; its files' digests."""
    convert(checkpoint("dense_tied"), out, bits=4, evaluate=False, progress=False, log=lambda _: None)
    (out / "previous.txt").write_text("the previous output")
    return digests(out)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def file_size_limit(limit: int):
    def limit_writes() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_writes


@pytest.mark.parametrize(
    "limit, failing_file",
    # The 4-bit shard is ~6 MB (MLX writes it), tokenizer.json ~11 MB (shutil copies it).
    [(1 << 20, "model.safetensors"), (8 << 20, "tokenizer.json")],
    ids=["mlx-shard", "python-copy"],
)
def test_disk_full_while_writing_is_one_line_and_keeps_the_previous_output(
    limit, failing_file, checkpoint, parent
) -> None:
    out = parent / "OUT"
    before = previous_output(out, checkpoint)
    result = subprocess.run(
        [*convert_command(checkpoint("dense_tied"), out, "--force"), "--no-eval", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=file_size_limit(limit),
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("converting ") and len(lines) == 2, result.stderr
    assert lines[1].startswith(f"{PROG}: error: could not write {out / failing_file}: "), lines[1]
    assert "free some disk space" in lines[1] and f"{out} was left as it was" in lines[1]
    assert os.listdir(parent) == ["OUT"] and digests(out) == before


def test_no_space_left_from_python_is_a_user_error(checkpoint, parent, monkeypatch) -> None:
    real_copy = shutil.copy2

    def full_disk(source, target, **options):
        if Path(target).name == "tokenizer.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        return real_copy(source, target, **options)

    monkeypatch.setattr(shutil, "copy2", full_disk)
    with pytest.raises(QwenMLXError) as caught:
        convert(checkpoint("dense_tied"), parent / "OUT", bits=4, evaluate=False, progress=False)
    message = str(caught.value)
    assert message.startswith(f"could not write {parent / 'OUT' / 'tokenizer.json'}: No space left on device; ")
    assert "nothing was written" in message
    assert os.listdir(parent) == []


@pytest.mark.parametrize("below", ["OUT", "sub/OUT"])
def test_output_under_a_file_is_one_line(below, checkpoint, parent) -> None:
    (parent / "a-file").write_text("not a folder")
    out = parent / "a-file" / below
    line = refusal(run_convert(str(checkpoint("dense_tied")), "-o", str(out), "--q-bits", "4"))
    assert f"cannot write {out}: {parent / 'a-file'} is a file, not a folder" in line
    assert os.listdir(parent) == ["a-file"] and (parent / "a-file").read_text() == "not a folder"


@pytest.fixture
def unwritable_folder(tmp_path) -> Path:
    """A folder this process cannot create anything in (root ignores modes; sysfs refuses even root)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        return folder
    folder = Path("/sys")
    try:
        (folder / ".qwen-mlx-probe").write_text("")
    except OSError:
        return folder
    (folder / ".qwen-mlx-probe").unlink()
    pytest.skip("no folder here refuses writes to root")


def test_unwritable_output_folder_is_one_line(unwritable_folder, checkpoint) -> None:
    out = unwritable_folder / "qwen-mlx-OUT"
    line = refusal(run_convert(str(checkpoint("dense_tied")), "-o", str(out), "--q-bits", "4"))
    assert f"{PROG}: error: could not write {unwritable_folder / '.qwen-mlx-OUT.lock'}: " in line
    assert "choose an output folder you can write to" in line
    assert not any(p.name.startswith((".qwen-mlx-OUT", "qwen-mlx-OUT")) for p in unwritable_folder.iterdir())


def test_sigkill_mid_write_leaves_a_folder_the_next_run_removes(checkpoint, parent) -> None:
    source, out = checkpoint("dense_sharded"), parent / "OUT"
    command = [*convert_command(source, out), "--no-eval", "--quiet", "--max-shard-size", "2MB"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tmp = stop_once_writing(process, parent)
    finally:
        process.kill()
        process.wait()
    assert sorted(os.listdir(parent)) == [".OUT.lock", tmp.name], os.listdir(parent)

    result = run_convert(str(source), "-o", str(out), "--q-bits", "4")
    assert result.returncode == 0, result.stderr
    assert f"removed what interrupted runs left beside {out}: {tmp.name}\n" in result.stderr
    assert os.listdir(parent) == ["OUT"]
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4


def test_sigkill_between_the_two_renames_of_force_restores_the_previous_output(checkpoint, parent) -> None:
    out = parent / "OUT"
    before = previous_output(out, checkpoint)
    command = [sys.executable, "-c", KILL_AFTER_SETTING_ASIDE, str(checkpoint("dense_tied")), "-o", str(out)]
    killed = subprocess.run([*command, "--q-bits", "4", "--no-eval", "--quiet", "--force"], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = sorted(os.listdir(parent))
    assert "OUT" not in left and [name.split("-")[0] for name in left] == [".OUT.lock", ".OUT.old", ".OUT.tmp"]

    # The next run, without --force: the previous output is back, so it is refused as existing.
    result = run_convert(str(checkpoint("dense_tied")), "-o", str(out), "--q-bits", "4")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 3, result.stderr
    aside = next(name for name in left if name.startswith(".OUT.old-"))
    assert lines[0] == f"restored {out} from {aside}, where an interrupted run that was replacing it had set it aside"
    assert lines[1].startswith(f"removed what interrupted runs left beside {out}: .OUT.tmp-")
    assert lines[2].startswith(f"{PROG}: error: {out} already exists and is not empty")
    assert os.listdir(parent) == ["OUT"] and digests(out) == before


def test_a_running_conversion_is_never_cleaned_up_by_another(checkpoint, parent) -> None:
    source, out = checkpoint("dense_sharded"), parent / "OUT"
    command = [*convert_command(source, out), "--no-eval", "--quiet", "--max-shard-size", "2MB"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        tmp = stop_once_writing(process, parent)
        shards = sorted(os.listdir(tmp))
        with pytest.raises(QwenMLXError, match=rf"another process \(pid {process.pid}\) is writing {out}"):
            recover_output(out, wait=False)
        assert tmp.is_dir() and sorted(os.listdir(tmp)) == shards
        process.send_signal(signal.SIGCONT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert os.listdir(parent) == ["OUT"]


def test_a_second_run_waits_for_the_first_and_no_lock_file_stays(parent) -> None:
    # flock conflicts between two open()s of one file even in one process, so a thread stands in for a run.
    out = parent / "OUT"
    holding, release = threading.Event(), threading.Event()

    def first_run() -> None:
        with output_lock(out, log=lambda _: None):
            holding.set()
            release.wait(60)

    first = threading.Thread(target=first_run)
    first.start()
    assert holding.wait(60)
    notes: list[str] = []
    second = threading.Thread(target=recover_output, args=(out,), kwargs={"log": notes.append})
    second.start()
    deadline = time.monotonic() + 60
    while not notes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert notes == [f"waiting for another process (pid {os.getpid()}) that is writing {out}"]
    assert second.is_alive()
    release.set()
    first.join(60)
    second.join(60)
    # The second locked the file the first unlinked, so it made its own, and removed that too.
    assert not second.is_alive() and os.listdir(parent) == []


def test_kill_9_loop_over_force_leaves_only_the_previous_output(checkpoint, parent) -> None:
    """SIGKILL at seeded random points of `--force` runs; after each, recovery leaves one whole OUT."""
    out = parent / "OUT"
    previous = previous_output(out, checkpoint)
    replaced = {name: digest for name, digest in previous.items() if name != "previous.txt"}
    command = [*convert_command(checkpoint("dense_tied"), out, "--force"), "--no-eval", "--quiet"]
    started = time.monotonic()
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    duration = time.monotonic() - started
    assert digests(out) == replaced
    (out / "previous.txt").write_text("the previous output")

    rng = random.Random(18)
    outcomes: dict[str, int] = {"previous": 0, "replaced": 0, "cleaned": 0}
    for _ in range(KILLS):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, KILL_SPAN * duration))
        process.kill()
        process.wait()
        notes: list[str] = []
        recover_output(out, log=notes.append, wait=False)
        outcomes["cleaned"] += bool(notes)
        assert os.listdir(parent) == ["OUT"], (notes, os.listdir(parent))
        now = digests(out)
        assert now in (previous, replaced), sorted(now)
        if now == replaced:  # the kill came after the swap: start the next round from a marked OUT again
            outcomes["replaced"] += 1
            (out / "previous.txt").write_text("the previous output")
        else:
            outcomes["previous"] += 1
    print(f"{KILLS} kills over a {duration:.2f} s run: {outcomes}")

    # And the next real run after all that converts as usual.
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert os.listdir(parent) == ["OUT"] and digests(out) == replaced


def test_bf16_moe_converts_with_the_quality_report(checkpoint, tmp_path) -> None:
    # A bf16 MoE checkpoint, as most Hub repos ship; MLX's CPU backend has gather_mm for float32 only.
    source = tmp_path / "moe-bf16"
    convert(checkpoint("moe_norm_topk"), source, dtype="bfloat16", progress=False, log=lambda _: None)
    assert json.loads((source / "config.json").read_text())["dtype"] == "bfloat16"
    notes: list[str] = []
    result = convert(source, tmp_path / "moe-4bit", bits=4, eval_tokens=32, progress=False, log=notes.append)
    assert result.report is not None, notes
    assert 0 < result.report["kl_mean"] < 10 and result.report["tokens"] == 31
    assert (tmp_path / "moe-4bit" / "quantization_report.json").is_file()
    assert result.dtype == "bfloat16"
    if mx.default_device() == mx.cpu:
        assert "this device has no bfloat16 gather_mm for the experts: measuring quality in float32" in notes
