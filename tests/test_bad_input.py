"""Bad checkpoints and bad arguments: the project's own error, naming the file or tensor, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from fixtures import SNAPSHOT, hub_cache_with

import qwen_mlx
from qwen_mlx import QwenMLXError


@pytest.fixture
def tiny(checkpoint, tmp_path) -> Path:
    """A private copy of a real one-file checkpoint, free to be damaged."""
    out = tmp_path / "tiny"
    shutil.copytree(checkpoint("dense_tied"), out)
    return out


def rewrite_weights(folder: Path, change) -> None:
    file = folder / "model.safetensors"
    weights = mx.load(str(file))
    change(weights)
    mx.save_safetensors(str(file), weights, metadata={"format": "pt"})


def rewrite_config(folder: Path, **changes) -> None:
    file = folder / "config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | changes))


def load_error(path: Path | str, **kwargs) -> str:
    with pytest.raises(QwenMLXError) as caught:
        qwen_mlx.load(path, **kwargs)
    return str(caught.value)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwen_mlx", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_truncated_safetensors_is_named(tiny) -> None:
    file = tiny / "model.safetensors"
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)
    message = load_error(tiny)
    assert "model.safetensors is truncated" in message and str(tiny) in message


def test_corrupt_safetensors_header_is_named(tiny) -> None:
    file = tiny / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = b"\xff" * 32
    file.write_bytes(bytes(data))
    assert "model.safetensors is not a valid safetensors file" in load_error(tiny)


def test_missing_tensor_is_named(tiny) -> None:
    rewrite_weights(tiny, lambda w: w.pop("model.layers.1.self_attn.k_proj.weight"))
    assert "tensor model.layers.1.self_attn.k_proj.weight is missing" in load_error(tiny)


def test_missing_expert_is_named(checkpoint, tmp_path) -> None:
    moe = tmp_path / "moe"
    shutil.copytree(checkpoint("moe_norm_topk"), moe)
    rewrite_weights(moe, lambda w: w.pop("model.layers.0.mlp.experts.2.up_proj.weight"))
    assert "tensor model.layers.0.mlp.experts.2.up_proj.weight is missing" in load_error(moe)


def test_wrong_shape_names_tensor_expected_and_found(tiny) -> None:
    def shrink(weights):
        weights["model.layers.0.mlp.down_proj.weight"] = weights["model.layers.0.mlp.down_proj.weight"][:, :64]

    rewrite_weights(tiny, shrink)
    message = load_error(tiny)
    assert "model.layers.0.mlp.down_proj.weight has shape (64, 64), expected (64, 128)" in message


def test_unexpected_tensor_is_named(tiny) -> None:
    rewrite_weights(tiny, lambda w: w.update({"model.layers.7.extra.weight": mx.zeros((2,))}))
    assert "unexpected tensor model.layers.7.extra.weight" in load_error(tiny)


def test_unknown_model_type_lists_the_supported_ones(tiny) -> None:
    rewrite_config(tiny, model_type="llama")
    message = load_error(tiny)
    assert "model_type 'llama' is not supported" in message and "qwen3, qwen3_moe" in message


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"hidden_size": "64"}, "hidden_size must be int, found '64'"),
        ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads (3)"),
        ({"num_attention_heads": 0}, "num_attention_heads must be positive"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e6}}, "rope type 'longrope' is not supported"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"model_type": "qwen3_moe", "num_experts": 0}, "needs num_experts > 0"),
    ],
)
def test_bad_config_values_are_named(tiny, changes, expected) -> None:
    rewrite_config(tiny, **changes)
    message = load_error(tiny)
    assert expected in message and "config.json" in message


def test_pickle_weights_are_refused(tmp_path, checkpoint) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copyfile(checkpoint("dense_tied") / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    message = load_error(folder)
    assert "pytorch_model.bin" in message and "arbitrary code" in message and "safetensors" in message


def test_missing_config_and_weights_are_named(tiny, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in load_error(empty)
    (tiny / "model.safetensors").unlink()
    assert "has no *.safetensors weights" in load_error(tiny)


def test_config_that_is_not_json_is_named(tiny) -> None:
    (tiny / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in load_error(tiny)


def test_missing_shard_is_named(checkpoint, tmp_path) -> None:
    sharded = tmp_path / "sharded"
    shutil.copytree(checkpoint("dense_sharded"), sharded)
    victim = sorted(sharded.glob("model-*-of-*.safetensors"))[-1]
    victim.unlink()
    assert f"shard {victim.name} named in model.safetensors.index.json is missing" in load_error(sharded)


def test_bad_options_are_refused_before_loading(tiny) -> None:
    assert "cannot quantize to 7 bits" in load_error(tiny, quantize=7)
    assert "group size 48 is not supported" in load_error(tiny, quantize=4, group_size=48)
    assert "dtype 'float64' is not supported" in load_error(tiny, dtype="float64")


def test_quantizing_an_already_quantized_folder_is_refused(checkpoint, tmp_path) -> None:
    saved = qwen_mlx.save(qwen_mlx.load(checkpoint("dense_tied"), quantize=4), tmp_path / "q4")
    assert "already quantized" in load_error(saved, quantize=8)


def test_save_refuses_to_overwrite_a_folder(checkpoint, tmp_path) -> None:
    model = qwen_mlx.load(checkpoint("dense_tied"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(QwenMLXError, match="already exists and is not empty"):
        qwen_mlx.save(model, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_path_that_is_neither_folder_nor_repo_id(tmp_path) -> None:
    assert "is not a Hugging Face repo id" in load_error(tmp_path / "nowhere")
    (tmp_path / "file.safetensors").write_bytes(b"")
    assert "is a file; pass the model folder" in load_error(tmp_path / "file.safetensors")


def test_cli_prints_one_line_and_exits_nonzero(tiny) -> None:
    (tiny / "model.safetensors").write_bytes(b"\x00" * 4)
    result = run_cli("info", str(tiny))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwen-mlx: error: ") and "model.safetensors" in lines[0]


@pytest.mark.parametrize(
    "args",
    [("generate", "--prompt", "x"), ("bogus",), ("serve", "--model", "m", "--port", "x"), ("convert", "--q-bits", "7")],
    ids=["missing option", "unknown command", "bad number", "convert"],
)
def test_usage_errors_are_one_line_with_a_pointer_to_help(args) -> None:
    result = run_cli(*args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.rstrip().endswith("--help)") and "usage:" not in result.stderr


def test_generate_and_the_server_agree_that_max_tokens_0_is_invalid(checkpoint) -> None:
    result = run_cli("generate", "--model", str(checkpoint("dense_tied")), "--prompt", "hi", "--max-tokens", "0")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "max_tokens=0 is invalid: it must be at least 1" in result.stderr


def test_cli_describes_a_checkpoint(checkpoint) -> None:
    result = run_cli("info", str(checkpoint("moe_hub")), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["model_type"] == "qwen3_moe" and summary["experts"].startswith("2 of 4")
    assert summary["quantization"] is None and summary["bits_per_weight"] == 32.0


def test_repo_id_loads_offline_from_the_hub_cache(checkpoint, tmp_path) -> None:
    hub_cache_with(checkpoint("dense_tied"), tmp_path / "hub", "qwen-mlx-tests/tiny-qwen3")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = run_cli("info", "qwen-mlx-tests/tiny-qwen3", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"].endswith(f"snapshots/{SNAPSHOT}")


def test_repo_id_downloads_what_a_model_needs_and_no_pickles(checkpoint, tmp_path) -> None:
    """The online path, against a stand-in for the Hub on loopback: weights, config and tokenizer come
    down; pickled weights and other files the repo holds do not (a second load fetches nothing)."""
    from hub_stand_in import serving

    repo = tmp_path / "repo"
    shutil.copytree(checkpoint("dense_tied"), repo)
    (repo / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle")
    (repo / "README.md").write_text("# tiny")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "0"}
    with serving(repo, "qwen-mlx-tests/online") as (endpoint, fetched):
        result = run_cli("generate", "--model", "qwen-mlx-tests/online", "--prompt", "hi", "--max-tokens", "2",
                         env=env | {"HF_ENDPOINT": endpoint})  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "model.safetensors" in fetched and "config.json" in fetched and "tokenizer.json" in fetched
        assert "pytorch_model.bin" not in fetched and "README.md" not in fetched
        before = len(fetched)
        assert run_cli("info", "qwen-mlx-tests/online", env=env | {"HF_ENDPOINT": endpoint}).returncode == 0
        assert len(fetched) == before


def test_repo_id_missing_offline_is_one_clear_line(tmp_path) -> None:
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = run_cli("info", "qwen-mlx-tests/not-downloaded", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "is not in the local Hugging Face cache" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_repo_id_with_no_network_is_one_clear_line(tmp_path) -> None:
    # A closed loopback port stands in for a machine without network.
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}
    result = run_cli("info", "qwen-mlx-tests/unreachable", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "qwen-mlx-tests/unreachable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_model_too_big_for_the_mac_is_warned_about_before_it_is_read(tiny, monkeypatch) -> None:
    """Metal's working set stood in for (this machine has none): the warning comes from the shapes, before
    any weight is read, and the wired limit is set to the working set."""
    from qwen_mlx import memory

    wired, active_when_warned = [], []
    limit = 1 << 20  # far below the tiny model's weights
    monkeypatch.setattr(memory, "metal_working_set", lambda: limit)
    monkeypatch.setattr(memory.mx, "set_wired_limit", wired.append)
    warn = memory.warnings.warn
    monkeypatch.setattr(memory.warnings, "warn", lambda *a, **k: (active_when_warned.append(mx.get_active_memory()),
                                                                  warn(*a, **k)))  # fmt: skip
    mx.clear_cache()
    before = mx.get_active_memory()  # what earlier tests in this process still hold
    with pytest.warns(memory.MemoryWarning, match=r"it will swap and be very slow; use a 4-bit or smaller model"):
        model = qwen_mlx.load(tiny)
    assert wired == [limit]
    assert active_when_warned[0] - before < memory.model_nbytes(model) / 10  # nothing of the weights read yet
    monkeypatch.setattr(memory, "metal_working_set", lambda: int(memory.model_nbytes(model) / 0.95))
    with pytest.warns(memory.MemoryWarning, match="little is left for the context"):
        qwen_mlx.load(tiny)
