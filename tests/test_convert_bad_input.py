"""The converter's promises on bad input: one clear line, status 1, and nothing lost, nothing half-written.

Every case runs with OUT in a fresh empty parent folder and checks that the folder holds nothing new
afterwards: no OUT, and no `.OUT.tmp-*` or `.OUT.old-*` folder beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from fixtures import hub_cache_with

from qwen_mlx import QwenMLXError
from qwen_mlx.convert import convert
from qwen_mlx.convert.recipes import available_recipes

PROG = "python -m qwen_mlx.convert"
# How long a stopped or signalled converter may take to exit, and to reach its first written shard.
EXIT_TIMEOUT_S = 60


def run_convert(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwen_mlx.convert", *args, "--quiet", "--no-eval"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def refusal(result: subprocess.CompletedProcess) -> str:
    """The one error line of a refused conversion (status 1, no traceback)."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), result.stderr
    return lines[0]


def copy_of(checkpoint, tmp_path: Path, name: str) -> Path:
    """A private copy of a real checkpoint, free to be damaged."""
    return Path(shutil.copytree(checkpoint(name), tmp_path / name))


def rewrite_weights(file: Path, change) -> None:
    weights = mx.load(str(file))
    change(weights)
    mx.save_safetensors(str(file), weights, metadata={"format": "pt"})


@pytest.fixture
def parent(tmp_path) -> Path:
    """An empty folder to hold OUT: whatever is in it after a refused conversion was left behind."""
    folder = tmp_path / "parent"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def quantized(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quantized") / "tiny-4bit"
    convert(checkpoint("dense_tied"), out, bits=4, evaluate=False, progress=False)
    return out


def test_truncated_shard_is_named(checkpoint, tmp_path, parent) -> None:
    source = copy_of(checkpoint, tmp_path, "dense_sharded")
    victim = sorted(source.glob("model-*-of-*.safetensors"))[0]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    line = refusal(run_convert(str(source), "-o", str(parent / "OUT"), "--q-bits", "4"))
    assert f"{victim} is truncated" in line
    assert os.listdir(parent) == []


def test_corrupt_header_is_named(checkpoint, tmp_path, parent) -> None:
    source = copy_of(checkpoint, tmp_path, "dense_sharded")
    victim = sorted(source.glob("model-*-of-*.safetensors"))[1]
    data = bytearray(victim.read_bytes())
    data[8:40] = b"\xff" * 32
    victim.write_bytes(bytes(data))
    line = refusal(run_convert(str(source), "-o", str(parent / "OUT")))
    assert f"{victim} is not a valid safetensors file" in line
    assert os.listdir(parent) == []


def test_corrupt_tokenizer_is_named_and_nothing_is_written(checkpoint, tmp_path, parent) -> None:
    """The quality report reads the tokenizer (before OUT is moved into place), so it names a broken one."""
    source = copy_of(checkpoint, tmp_path, "dense_tied")
    (source / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')  # cut off mid-download
    command = [sys.executable, "-m", "qwen_mlx.convert", str(source), "-o", str(parent / "OUT"), "--q-bits", "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{PROG}: error: {source / 'tokenizer.json'} is not a readable tokenizer"), line
    assert os.listdir(parent) == []


def test_missing_shard_is_named(checkpoint, tmp_path, parent) -> None:
    source = copy_of(checkpoint, tmp_path, "dense_sharded")
    victim = sorted(source.glob("model-*-of-*.safetensors"))[-1]
    victim.unlink()
    line = refusal(run_convert(str(source), "-o", str(parent / "OUT"), "--q-bits", "8"))
    assert f"shard {victim.name} named in model.safetensors.index.json is missing" in line
    assert os.listdir(parent) == []


def test_wrong_shape_names_tensor_expected_and_found(checkpoint, tmp_path, parent) -> None:
    source = copy_of(checkpoint, tmp_path, "dense_tied")

    def shrink(weights):
        weights["model.layers.0.mlp.down_proj.weight"] = weights["model.layers.0.mlp.down_proj.weight"][:, :64]

    rewrite_weights(source / "model.safetensors", shrink)
    line = refusal(run_convert(str(source), "-o", str(parent / "OUT"), "--q-bits", "4"))
    assert "tensor model.layers.0.mlp.down_proj.weight has shape (64, 64), expected (64, 128)" in line
    assert os.listdir(parent) == []


def test_missing_tensor_is_named(checkpoint, tmp_path, parent) -> None:
    source = copy_of(checkpoint, tmp_path, "moe_norm_topk")
    rewrite_weights(source / "model.safetensors", lambda w: w.pop("model.layers.1.mlp.experts.3.down_proj.weight"))
    line = refusal(run_convert(str(source), "-o", str(parent / "OUT")))
    assert "tensor model.layers.1.mlp.experts.3.down_proj.weight is missing" in line
    assert os.listdir(parent) == []


def test_pickle_only_checkpoint_is_refused(checkpoint, tmp_path, parent) -> None:
    source = tmp_path / "pickled"
    source.mkdir()
    shutil.copyfile(checkpoint("dense_tied") / "config.json", source / "config.json")
    (source / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    line = refusal(run_convert(str(source), "-o", str(parent / "OUT"), "--q-bits", "4"))
    assert "pytorch_model.bin" in line and "pickle" in line and "arbitrary code" in line and "safetensors" in line
    assert os.listdir(parent) == []


def test_unsupported_model_type_lists_the_supported_ones(checkpoint, tmp_path, parent) -> None:
    source = copy_of(checkpoint, tmp_path, "dense_tied")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    line = refusal(run_convert(str(source), "-o", str(parent / "OUT")))
    assert "model_type 'llama' is not supported" in line and "qwen3, qwen3_moe" in line
    assert os.listdir(parent) == []


def test_not_enough_disk_space_is_found_before_writing(checkpoint, parent, monkeypatch) -> None:
    real = shutil.disk_usage(parent)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real._replace(free=1 << 20))
    with pytest.raises(QwenMLXError, match="not enough disk space") as caught:
        convert(checkpoint("dense_tied"), parent / "OUT", bits=4, evaluate=False, progress=False)
    assert f"{parent} has 1.00 MiB free" in str(caught.value)
    assert os.listdir(parent) == []


def test_existing_output_is_kept_without_force_and_replaced_whole_with_it(checkpoint, parent) -> None:
    out = parent / "OUT"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = refusal(run_convert(str(checkpoint("dense_tied")), "-o", str(out), "--q-bits", "4"))
    assert f"{out} already exists and is not empty" in line and "--force" in line
    assert os.listdir(parent) == ["OUT"] and os.listdir(out) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"

    result = run_convert(str(checkpoint("dense_tied")), "-o", str(out), "--q-bits", "4", "--force")
    assert result.returncode == 0, result.stderr
    assert os.listdir(parent) == ["OUT"]
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4


def test_output_inside_the_source_is_refused(checkpoint, tmp_path) -> None:
    source = copy_of(checkpoint, tmp_path, "dense_tied")
    before = sorted(os.listdir(source))
    line = refusal(run_convert(str(source), "-o", str(source / "OUT"), "--q-bits", "4"))
    assert f"{source / 'OUT'} is inside the source folder {source}" in line
    # The source itself as OUT would be replaced by --force: refused just the same.
    line = refusal(run_convert(str(source), "-o", str(source), "--q-bits", "4", "--force"))
    assert "is inside the source folder" in line
    assert sorted(os.listdir(source)) == before


def test_output_holding_the_source_is_refused_with_force(checkpoint, tmp_path) -> None:
    # --force replaces OUT whole: with the source inside it, the checkpoint itself would be deleted.
    models = tmp_path / "models"
    source = Path(shutil.copytree(checkpoint("dense_tied"), models / "tiny"))
    before = sorted(os.listdir(source))
    line = refusal(run_convert(str(source), "-o", str(models), "--q-bits", "4", "--force"))
    assert f"{models} holds the source folder {source}" in line
    assert os.listdir(tmp_path) == ["models"] and os.listdir(models) == ["tiny"]
    assert sorted(os.listdir(source)) == before


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--dequantize"], "is not an MLX-quantized folder; --dequantize has nothing to undo"),
        (["--dequantize", "--q-bits", "4"], "choose either quantization (bits or a recipe) or --dequantize"),
        (["--dequantize", "--recipe", "mixed_4_6"], "choose either quantization (bits or a recipe) or --dequantize"),
        (["--recipe", "nope"], f"unknown recipe 'nope'; choose one of {', '.join(available_recipes())}"),
        (["--recipe", "nope.json"], "unknown recipe 'nope.json'"),
    ],
)
def test_bad_option_combinations_are_refused(options, expected, checkpoint, parent) -> None:
    line = refusal(run_convert(str(checkpoint("dense_tied")), "-o", str(parent / "OUT"), *options))
    assert expected in line
    assert os.listdir(parent) == []


def test_unsupported_bits_are_an_argparse_error(checkpoint, parent) -> None:
    result = run_convert(str(checkpoint("dense_tied")), "-o", str(parent / "OUT"), "--q-bits", "7")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{PROG}: error: argument --q-bits: invalid choice: 7" in result.stderr
    assert os.listdir(parent) == []


def test_an_mlx_quantized_source_needs_an_explicit_choice(quantized, parent) -> None:
    line = refusal(run_convert(str(quantized), "-o", str(parent / "OUT")))
    assert f"{quantized} is already quantized" in line
    assert "--q-bits" in line and "--recipe" in line and "--dequantize" in line
    assert os.listdir(parent) == []


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=repr)
@pytest.mark.parametrize("existing", [False, True], ids=["new", "force"])
def test_failure_in_the_middle_of_writing_leaves_nothing(error, existing, checkpoint, parent, monkeypatch) -> None:
    out = parent / "OUT"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    save_safetensors = mx.save_safetensors
    written: list[list[str]] = []

    def fail_on_second_shard(file, arrays, metadata=None):
        if written:
            # Half-written: the first shard is on disk in the temporary folder, OUT is not yet touched.
            written.append(sorted(os.listdir(Path(file).parent)))
            raise error
        save_safetensors(file, arrays, metadata=metadata)
        written.append([Path(file).name])

    monkeypatch.setattr(mx, "save_safetensors", fail_on_second_shard)
    # No room is the user's to fix, so it is a QwenMLXError (one line); Ctrl-C stays what it is.
    with pytest.raises(QwenMLXError if isinstance(error, OSError) else type(error)):
        convert(
            checkpoint("dense_sharded"),
            out,
            bits=4,
            force=existing,
            max_shard_bytes=4 << 20,
            evaluate=False,
            progress=False,
        )
    assert len(written) == 2 and written[1] == written[0] == ["model-00001-of-00004.safetensors"]
    if existing:
        assert os.listdir(parent) == ["OUT"] and os.listdir(out) == ["keep.txt"]
        assert (out / "keep.txt").read_text() == "mine"
    else:
        assert os.listdir(parent) == []


def stop_once_writing(process: subprocess.Popen, parent: Path) -> Path:
    """Freeze the converter (SIGSTOP) once a shard is in its temporary folder; return that folder.

    Waiting for a shard, not just the folder, lands the signal inside `write_folder`'s try block (a
    signal in the microseconds between its mkdtemp and that try would leak the folder), and the freeze
    makes the check below exact: the conversion is caught mid-write or the test says it was not.
    """
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        for tmp in parent.glob(".OUT.tmp-*"):
            if any(tmp.glob("*.safetensors")):
                process.send_signal(signal.SIGSTOP)
                _, status = os.waitpid(process.pid, os.WUNTRACED)
                assert os.WIFSTOPPED(status), status
                return tmp
        time.sleep(0.001)
    process.kill()
    pytest.fail(f"the converter never had a shard in a temporary folder; it ended with {os.listdir(parent)}")


@pytest.mark.parametrize(
    "signum, status, last_line",
    [
        (signal.SIGTERM, 143, None),
        (signal.SIGINT, 130, f"{PROG}: interrupted; nothing was written"),
    ],
    ids=["SIGTERM", "SIGINT"],
)
def test_signal_mid_conversion_leaves_nothing(signum, status, last_line, checkpoint, parent) -> None:
    out = parent / "OUT"
    command = [sys.executable, "-m", "qwen_mlx.convert", str(checkpoint("dense_sharded")), "-o", str(out)]
    command += ["--q-bits", "4", "--no-eval", "--max-shard-size", "2MB", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        tmp = stop_once_writing(process, parent)
        assert not out.exists() and tmp.is_dir(), os.listdir(parent)
        process.send_signal(signum)
        process.send_signal(signal.SIGCONT)
        _, stderr = process.communicate(timeout=EXIT_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == status, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert lines[0].startswith("converting ")
    assert lines[1:] == ([last_line] if last_line else []), stderr
    assert os.listdir(parent) == []


def test_repo_id_missing_offline_is_one_line(tmp_path, parent) -> None:
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    # No -o: the default OUT (not-downloaded-4bit) would go in the working folder.
    line = refusal(run_convert("qwen-mlx-tests/not-downloaded", "--q-bits", "4", env=env, cwd=parent))
    assert "qwen-mlx-tests/not-downloaded is not in the local Hugging Face cache" in line
    assert os.listdir(parent) == []


def test_repo_id_converts_offline_from_the_hub_cache(checkpoint, tmp_path, parent) -> None:
    hub_cache_with(checkpoint("dense_tied"), tmp_path / "hub", "qwen-mlx-tests/tiny")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = run_convert("qwen-mlx-tests/tiny", "-o", str(parent / "OUT"), "--q-bits", "4", env=env)
    assert result.returncode == 0, result.stderr
    assert os.listdir(parent) == ["OUT"]
    config = json.loads((parent / "OUT" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization_config"] == config["quantization"]
    assert "base_model: qwen-mlx-tests/tiny" in (parent / "OUT" / "README.md").read_text()
