"""The models a user meets: short names, `pull` (from the Hub stand-in on loopback), `list`, `rm`, and the
"will it fit" estimate checked against MLX's measured peak."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from fixtures import _dense, hub_cache_with

import qwen_mlx
from qwen_mlx.cache import make_cache
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.memory import estimate, largest_context
from qwen_mlx.models import count_text, find_named, read_model, remove, short_name
from qwen_mlx.quant import parameter_count

REPO = "qwen-mlx-tests/tiny-bf16"


def run_cli(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen_mlx", *args], capture_output=True, text=True, timeout=300,
                          input=stdin, env={**os.environ, **env})  # fmt: skip


@pytest.fixture
def homes(tmp_path, monkeypatch) -> dict[str, str]:
    """A qwen-mlx cache (so a models folder) and a Hub cache of the test's own, here and for subprocesses."""
    env = {"QWEN_MLX_CACHE": str(tmp_path / "qwen-mlx"), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_short_names_map_to_official_and_mlx_community_repos(homes) -> None:
    assert short_name("qwen3:8b") == ("Qwen/Qwen3-8B", "4bit")
    assert short_name("qwen3-coder:30b:8bit") == ("Qwen/Qwen3-Coder-30B-A3B-Instruct", "8bit")
    assert short_name("qwen3:4b-2507-thinking:bf16") == ("Qwen/Qwen3-4B-Thinking-2507", "bf16")
    assert short_name("Qwen/Qwen3-8B") is None and short_name("qwen3:9b") is None
    assert find_named("qwen3:30b-a3b") == "mlx-community/Qwen3-30B-A3B-4bit"
    assert find_named("qwen3:8b:bf16") == "Qwen/Qwen3-8B"


def test_pull_quantize_converts_into_the_models_folder_and_list_shows_it(checkpoint, homes, tmp_path) -> None:
    """A bf16 repo pulled with --quantize 4 from the Hub stand-in ends as a loadable 4-bit folder; `list`
    shows it, the Hub cache's source and the demo; the folder's name loads it. The converter's quality report
    is skipped (--no-eval): scoring bf16 on MLX's CPU backend takes a minute, and test_convert_report has it."""
    from hub_stand_in import serving

    with serving(checkpoint("dense_bf16"), REPO) as (endpoint, fetched):
        env = homes | {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0"}
        result = run_cli("pull", f"{REPO}:4bit", "--no-eval", env=env)
        assert result.returncode == 0, result.stderr
    out = Path(homes["QWEN_MLX_CACHE"]) / "models" / "tiny-bf16-4bit"
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert "model.safetensors" in fetched and "tokenizer.json" in fetched
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert (out / "README.md").is_file()  # the converter's model card
    parameters = count_text(parameter_count(qwen_mlx.load(out)))

    listing = run_cli("list", env=homes)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ARCH", "PARAMS", "BITS", "SIZE", "CONTEXT", "FITS"]
    converted = next(line for line in lines if line.startswith("tiny-bf16-4bit"))
    assert converted.split()[1:4] == ["qwen3", parameters, "4"] and "yes (" in converted
    source = next(line for line in lines if line.startswith(REPO))
    assert source.split()[3] == "bf16"
    assert any(line.startswith("demo ") for line in lines)

    info = run_cli("info", "tiny-bf16-4bit", "--json", "--context", "64", env=homes)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["path"] == str(out)
    assert json.loads(info.stdout)["memory"]["fits"] == "yes"


def test_an_interrupted_pull_resumes_and_fetches_only_what_is_missing(checkpoint, homes) -> None:
    """What a killed download leaves (a half-written `.incomplete` blob and no snapshot link for that file)
    is completed by the next pull, which fetches that file alone."""
    from hub_stand_in import serving

    with serving(checkpoint("dense_tied"), REPO) as (endpoint, fetched):
        env = homes | {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0"}
        assert run_cli("pull", REPO, env=env).returncode == 0
        snapshot = next((Path(homes["HF_HUB_CACHE"]) / f"models--{REPO.replace('/', '--')}" / "snapshots").iterdir())
        link = snapshot / "model.safetensors"
        blob = link.resolve()
        whole = blob.read_bytes()
        link.unlink()
        blob.rename(blob.with_name(blob.name + ".incomplete"))
        with open(blob.with_name(blob.name + ".incomplete"), "r+b") as partial:
            partial.truncate(len(whole) // 2)
        fetched.clear()
        result = run_cli("pull", REPO, env=env)
        assert result.returncode == 0, result.stderr
    assert fetched == ["model.safetensors"]
    assert link.read_bytes() == whole


def test_an_unknown_name_is_one_line(homes) -> None:
    result = run_cli("pull", "qwen3:9b", env=homes)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "short name" in result.stderr


def test_rm_removes_only_what_is_in_its_folders(checkpoint, homes, tmp_path, monkeypatch) -> None:
    models = Path(homes["QWEN_MLX_CACHE"]) / "models"
    models.mkdir(parents=True)
    outside = tmp_path / "precious"
    shutil.copytree(checkpoint("dense_tied"), outside)
    (models / "escape").symlink_to(outside)
    for name in ("../precious", str(outside), "escape", "nothing-here", "demo"):
        with pytest.raises(QwenMLXError):
            remove(name, lambda question: True)
    assert (outside / "model.safetensors").is_file()

    shutil.copytree(checkpoint("dense_tied"), models / "mine")
    with pytest.raises(QwenMLXError, match="nothing removed"):
        remove("mine", lambda question: False)
    assert (models / "mine").is_dir()
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda question: "y")
    from qwen_mlx.cli import main

    assert main(["rm", "mine"]) == 0
    assert not (models / "mine").exists()

    asked = run_cli("rm", "escape", env=homes, stdin="y\n")  # refused before anything is asked
    assert asked.returncode == 1 and len(asked.stderr.strip().splitlines()) == 1 and "symlink" in asked.stderr
    shutil.copytree(checkpoint("dense_tied"), models / "again")
    no_terminal = run_cli("rm", "again", env=homes, stdin="y\n")
    assert no_terminal.returncode == 1 and "--yes" in no_terminal.stderr and (models / "again").is_dir()
    shutil.copytree(checkpoint("dense_tied"), models / ".removing-killed")  # an rm killed after its rename
    assert run_cli("rm", "again", "--yes", env=homes).returncode == 0 and not (models / "again").exists()
    assert not (models / ".removing-killed").exists()  # the next rm finishes what the killed one began


def test_rm_deletes_a_hub_cache_repo_through_huggingface_hub(checkpoint, homes) -> None:
    hub_cache_with(checkpoint("dense_tied"), Path(homes["HF_HUB_CACHE"]), REPO)
    assert REPO in run_cli("list", env=homes).stdout
    result = run_cli("rm", REPO, "--yes", env=homes)
    assert result.returncode == 0, result.stderr
    assert not (Path(homes["HF_HUB_CACHE"]) / f"models--{REPO.replace('/', '--')}").exists()
    assert REPO not in run_cli("list", env=homes).stdout


@pytest.fixture(scope="module")
def kv_heavy(tmp_path_factory) -> Path:
    """A tiny Qwen3 whose KV cache outweighs its weights: a 1,024-token vocabulary, 4 layers of 4 KV heads."""
    out = tmp_path_factory.mktemp("kv-heavy") / "model"
    _dense(seed=21, vocab_size=1024, num_hidden_layers=4, num_key_value_heads=4, head_dim=32)(out)
    return out


def measured_peak(folder: Path, context: int, prefill_step: int, kv_bits: int | None) -> int:
    """MLX's peak while loading `folder` and prefilling `context` tokens the way the engine does (chunks
    evaluating only the cache, then the last token's logits), above what was live before."""
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model = qwen_mlx.load(folder)
    mx.eval(model.parameters())
    cache = make_cache(model, kv_bits)
    ids = mx.full((context,), 9707 % model.args.vocab_size, mx.int32)
    done = 0
    while context - done > 1:
        n = min(prefill_step, context - done - 1)
        model(ids[done : done + n][None], cache=cache)
        mx.eval([c.state for c in cache])
        done += n
        mx.clear_cache()
    mx.eval(model(ids[done:][None], cache=cache)[:, -1, :])
    peak = mx.get_peak_memory() - before
    del model, cache
    mx.clear_cache()
    return peak


@pytest.mark.parametrize(
    ("model", "context", "prefill_step", "kv_bits"),
    [
        ("dense_tied", 2048, 512, None),
        ("moe_hub", 2048, 512, None),
        ("kv_heavy", 2048, 128, None),
        ("kv_heavy", 2048, 128, 8),
    ],  # fmt: skip
)
def test_the_fit_estimate_is_within_10_percent_of_the_measured_peak(
    checkpoint, kv_heavy, model, context, prefill_step, kv_bits
) -> None:
    """The estimate from shapes alone against `mx.get_peak_memory` on MLX's CPU backend (attention scores
    materialized). What dominates differs by model: the 151,936-token embedding and head for the fixtures
    (weights, with the chunk's attention scores), the KV cache for `kv_heavy`; all run past the fixtures'
    64-token context (RoPE computes there; memory is what is compared), so each term is checked where it
    matters."""
    folder = kv_heavy if model == "kv_heavy" else checkpoint(model)
    shape = read_model(folder).shape
    predicted = estimate(shape, context, kv_bits, prefill_step_size=prefill_step, fused_attention=False)
    if model == "kv_heavy":
        assert predicted.kv_cache > predicted.weights
    measured = measured_peak(folder, context, prefill_step, kv_bits)
    assert abs(predicted.total - measured) <= 0.10 * measured, (predicted, measured)


def test_largest_context_is_the_longest_whose_estimate_fits(kv_heavy) -> None:
    shape = read_model(kv_heavy).shape
    budget = estimate(shape, 40).total
    longest = largest_context(shape, budget)
    assert estimate(shape, longest).total <= budget < estimate(shape, longest + 1).total
    assert largest_context(shape, shape.weights_bytes // 2) == 0
    assert estimate(shape, 1000, 4).kv_cache < estimate(shape, 1000, 8).kv_cache < estimate(shape, 1000).kv_cache
