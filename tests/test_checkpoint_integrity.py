"""Checkpoints that cannot lie: a corrupt but self-consistent safetensors header, a file that is not a file,
a config that asks for more than the weights hold. Each is one `QwenMLXError` naming the file, before any
weight is read; never wrong logits, a hang, a traceback or the OOM killer.

The corrupt files are made by rewriting a real tiny checkpoint's header (`rewrite_header`), so the data
bytes stay those transformers wrote. What could hang (a FIFO, a config of 10**12 layers) runs in a
subprocess with a timeout, so a missing refusal fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import qwen_mlx
from qwen_mlx import QwenMLXError
from qwen_mlx.tokenizer import Tokenizer

# Generous: the refusal takes a second or two; without it the command would never end.
HANG_TIMEOUT_S = 90


@pytest.fixture
def tiny(checkpoint, tmp_path) -> Path:
    """A private copy of a real one-file float32 checkpoint, free to be damaged."""
    out = tmp_path / "tiny"
    shutil.copytree(checkpoint("dense_tied"), out)
    return out


def rewrite_header(file: Path, change: Callable[[dict, bytearray], None]) -> None:
    """Rewrite a safetensors file's header (and, if `change` edits it, its data) in place."""
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8 : 8 + length]), bytearray(raw[8 + length :])
    change(header, data)
    text = json.dumps(header).encode()
    file.write_bytes(len(text).to_bytes(8, "little") + text + bytes(data))


def by_offset(header: dict) -> list[str]:
    return sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])


def load_error(path: Path) -> str:
    with pytest.raises(QwenMLXError) as caught:
        qwen_mlx.load(path)
    return str(caught.value)


def rewrite_config(folder: Path, **changes) -> None:
    file = folder / "config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | changes))


def generate_error(folder: Path) -> str:
    """`qwen-mlx generate` on `folder`: it must fail with one line on stderr, in time."""
    result = subprocess.run(
        [sys.executable, "-m", "qwen_mlx", "generate", "--model", str(folder), "--prompt", "hi", "--max-tokens", "1"],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT_S,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith("qwen-mlx: error: ")
    return lines[0]


# Item 8: the header must describe the data exactly.


def test_an_integer_dtype_on_a_float_weight_is_refused(tiny) -> None:
    """F32 -> I32 keeps every size and offset right; the weight's bits would be read as integers."""

    def to_int32(header, data):
        header["model.layers.0.mlp.down_proj.weight"]["dtype"] = "I32"

    rewrite_header(tiny / "model.safetensors", to_int32)
    message = load_error(tiny)
    assert "model.safetensors" in message and "model.layers.0.mlp.down_proj.weight is stored as I32" in message


def test_a_packed_dtype_on_a_float_weight_is_refused(tiny) -> None:
    """U32 is allowed in a checkpoint (packed quantized weights), but not for a parameter that is a float."""

    def to_uint32(header, data):
        header["model.norm.weight"]["dtype"] = "U32"

    rewrite_header(tiny / "model.safetensors", to_uint32)
    message = load_error(tiny)
    assert "tensor model.norm.weight is uint32 on disk where the model holds a float" in message


def test_a_gap_in_the_data_is_refused(tiny) -> None:
    """The last tensor moved 64 bytes on, with 64 bytes no tensor owns before it: sizes still agree."""

    def gap(header, data):
        last = header[by_offset(header)[-1]]
        start, stop = last["data_offsets"]
        data[start:start] = bytes(64)
        last["data_offsets"] = [start + 64, stop + 64]

    rewrite_header(tiny / "model.safetensors", gap)
    message = load_error(tiny)
    assert "model.safetensors is corrupt" in message and "belong to no tensor" in message


def test_overlapping_offsets_are_refused(tiny) -> None:
    """Two tensors of one size read from the same bytes (the second's own bytes then belong to none)."""

    def overlap(header, data):
        first, second = (n for n in by_offset(header) if n.endswith("input_layernorm.weight"))
        header[second]["data_offsets"] = header[first]["data_offsets"]

    rewrite_header(tiny / "model.safetensors", overlap)
    message = load_error(tiny)
    assert "model.safetensors is corrupt" in message and "overlaps" in message


def test_trailing_bytes_are_refused(tiny) -> None:
    with open(tiny / "model.safetensors", "ab") as f:
        f.write(b"\x00" * 100)
    message = load_error(tiny)
    assert "model.safetensors is corrupt: 100 bytes after its last tensor belong to no tensor" in message


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_fifo_in_place_of_a_file_is_refused_not_read(tiny, name) -> None:
    """Opening a FIFO blocks until a writer comes: the file must be refused from its `stat`."""
    (tiny / name).unlink()
    os.mkfifo(tiny / name)
    message = generate_error(tiny)
    assert f"{name} is a FIFO (named pipe), not a regular file" in message


def test_a_directory_named_model_safetensors_is_refused(tiny) -> None:
    (tiny / "model.safetensors").unlink()
    (tiny / "model.safetensors").mkdir()
    assert "model.safetensors is a directory, not a regular file" in load_error(tiny)


def test_a_symlink_loop_named_model_safetensors_is_refused(tiny) -> None:
    (tiny / "model.safetensors").unlink()
    (tiny / "model.safetensors").symlink_to("model.safetensors")
    message = load_error(tiny)
    assert "cannot read" in message and "model.safetensors" in message and "symbolic links" in message


def test_a_dangling_symlink_named_config_json_is_refused(tiny) -> None:
    (tiny / "config.json").unlink()
    (tiny / "config.json").symlink_to(tiny / "elsewhere.json")
    assert "config.json is a symbolic link to nothing" in load_error(tiny)


# Item 9: the tokenizer's files, and a config that asks for more than the weights hold.


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda f: (f / "tokenizer.json").write_text('{"model": {"vocab": '), "not a readable tokenizer"),
        (lambda f: ((f / "tokenizer.json").unlink(), (f / "tokenizer.json").mkdir()), "tokenizer.json is a directory"),
        (lambda f: (f / "chat_template.jinja").write_text("{% for m in messages %}"), "not valid Jinja"),
        (lambda f: (f / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}"), "chat_template.jinja is not UTF-8"),
    ],
    ids=["truncated tokenizer.json", "tokenizer.json a directory", "broken template", "template not UTF-8"],
)
def test_corrupt_tokenizer_files_are_named(tiny, damage, expected) -> None:
    damage(tiny)
    with pytest.raises(QwenMLXError) as caught:
        Tokenizer.load(tiny)
    assert expected in str(caught.value) and str(tiny) in str(caught.value)


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"head_dim": 0}, "head_dim must be positive, found 0"),
        ({"hidden_size": 2, "head_dim": None}, "so head_dim would be 0; set head_dim"),
        ({"vocab_size": 10**12}, "vocab_size is 1000000000000, beyond the largest tensor dimension MLX can hold"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps must be a positive number"),
        ({"rope_theta": 10**400}, "rope_theta must be a positive number"),
        ({"vocab_size": 10**7}, "vocab_size is 10000000, but no tensor in the weights has a dimension that large"),
        ({"intermediate_size": 10**6}, "intermediate_size is 1000000, but no tensor in the weights"),
    ],
)
def test_absurd_shapes_are_refused_from_the_config(tiny, changes, expected) -> None:
    rewrite_config(tiny, **changes)
    message = load_error(tiny)
    assert expected in message and "config.json" in message


def test_a_config_of_10_to_the_12_layers_is_refused_from_the_headers(tiny) -> None:
    """Before: a Python loop towards 10**12 layers, until the OOM killer came."""
    rewrite_config(tiny, num_hidden_layers=10**12)
    message = generate_error(tiny)
    assert "config.json: num_hidden_layers is 1000000000000, but the weights hold 2 layers" in message


def test_a_config_of_more_experts_than_the_weights_hold_is_refused(checkpoint, tmp_path) -> None:
    """Hugging Face's per-expert tensors: the experts named on disk bound `num_experts`."""
    moe = tmp_path / "moe"
    shutil.copytree(checkpoint("moe_norm_topk"), moe)
    rewrite_config(moe, num_experts=10**9)
    message = generate_error(moe)
    assert "config.json: num_experts is 1000000000, but the weights hold 4 experts" in message


def test_a_quantization_entry_mlx_cannot_use_is_named(checkpoint, tmp_path) -> None:
    saved = qwen_mlx.save(qwen_mlx.load(checkpoint("dense_tied"), quantize=4), tmp_path / "q4")
    block = json.loads((saved / "config.json").read_text())["quantization"]
    rewrite_config(saved, quantization=block | {"model.layers.0.mlp.down_proj": {"bits": 4}})
    message = load_error(saved)
    assert "config.json: its quantization block does not describe the weights" in message


def test_the_checks_accept_real_checkpoints(checkpoint, tmp_path) -> None:
    """Tiling, dtypes and the bounds hold for what transformers writes (sharded, bf16, MoE) and for a
    quantized folder as qwen-mlx saves it (U32 packed weights beside float scales)."""
    for name in ("dense_sharded", "dense_bf16", "moe_norm_topk"):
        qwen_mlx.load(checkpoint(name), lazy=True)
    saved = qwen_mlx.save(qwen_mlx.load(checkpoint("dense_tied"), quantize=4), tmp_path / "q4")
    assert qwen_mlx.load(saved).model.layers[0].mlp.down_proj.bits == 4
