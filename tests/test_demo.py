"""The offline demo model: its scripts, where it is cached, the CLI, greedy replay at full vocabulary, transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen_mlx import demo, load
from qwen_mlx.cache import make_cache
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.format import THINKING_BUDGET_TEXT
from qwen_mlx.loader import resolve_model_path
from qwen_mlx.tokenizer import Tokenizer

SCRIPTS = {script["name"]: script for script in demo.SCRIPTS}
# float32 logits of the same weights in two implementations; they reach ~26 here (measured max |Δ| 4e-5).
TRANSFORMERS_ATOL = 2e-4


def greedy(model, prompt: list[int], end_ids: set[int], max_tokens: int) -> list[int]:
    """Written again here rather than taken from qwen_mlx.demo, so the build's own check is not its judge."""
    cache = make_cache(model)
    out: list[int] = []
    logits = model(mx.array([prompt]), cache)
    while len(out) < max_tokens:
        out.append(int(np.argmax(np.array(logits[0, -1].astype(mx.float32)))))
        if out[-1] in end_ids:
            break
        logits = model(mx.array([out[-1:]]), cache)
    return out


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(demo.tokenizer_files())


@pytest.fixture(scope="module")
def demo_model(demo_model_path):
    """The built folder as the runtime loads it: (model, the folder's own tokenizer)."""
    return load(demo_model_path), Tokenizer.load(demo_model_path)


def test_the_scripts_cover_every_behaviour() -> None:
    assert set(SCRIPTS) == {
        "thinking",
        "thinking_long",
        "no_think_switch",
        "non_thinking",
        "tool_call",
        "tool_result",
        "chinese_emoji",
        "markdown",
        "json_answer",
        "tool_tag_in_thinking",
        "hi",
        "two_turns",
    }
    assert len(demo.SCRIPTS) == len(SCRIPTS), "script names must be unique"
    for script in demo.SCRIPTS:
        assert script["messages"][-1]["role"] == "assistant", script["name"]
        assert script.get("shows"), script["name"]


def test_the_scripts_agree_with_each_other(tokenizer) -> None:
    # Turn 2 continues turn 1 exactly as greedy decoding wrote it.
    assert SCRIPTS["two_turns"]["messages"][:2] == SCRIPTS["hi"]["messages"]
    # The tool result follows the tool call the model makes, with the reasoning it wrote.
    call_reply = SCRIPTS["tool_call"]["messages"][-1]["content"]
    user, assistant, tool, _ = SCRIPTS["tool_result"]["messages"]
    assert user == SCRIPTS["tool_call"]["messages"][0]
    assert SCRIPTS["tool_result"]["tools"] == SCRIPTS["tool_call"]["tools"]
    reasoning, call = call_reply.removeprefix("<think>\n").split("\n</think>\n\n")
    assert assistant["reasoning_content"] == reasoning
    body = json.loads(call.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
    assert assistant["tool_calls"] == [{"type": "function", "function": body}]
    assert tool["role"] == "tool" and json.loads(tool["content"]) == {"temperature_c": 18, "condition": "sunny"}

    assert SCRIPTS["no_think_switch"]["messages"][0]["content"].endswith(" /no_think")
    assert SCRIPTS["no_think_switch"]["messages"][-1]["content"].startswith("<think>\n\n</think>\n\n")
    assert SCRIPTS["non_thinking"]["enable_thinking"] is False
    assert "<think>" not in SCRIPTS["non_thinking"]["messages"][-1]["content"]
    tagged = SCRIPTS["tool_tag_in_thinking"]
    thought = tagged["messages"][-1]["content"].split("</think>")[0]
    assert "<tool_call>" in thought and "</tool_call>" in thought and not tagged.get("tools")

    _, completion = demo.script_ids(tokenizer, SCRIPTS["thinking_long"])
    thought_tokens = completion.index(tokenizer.think_end_id) - 1
    assert thought_tokens >= 48 and thought_tokens > max(SCRIPTS["thinking_long"]["thinking_budgets"]) + 1
    for script in demo.SCRIPTS:
        assert 8 <= len(demo.script_ids(tokenizer, script)[1]) <= 100, script["name"]


def test_demo_dir_follows_the_cache_variables(monkeypatch, tmp_path) -> None:
    name = f"demo-{demo.fingerprint()}"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QWEN_MLX_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert demo.demo_dir() == tmp_path / "home" / ".cache" / "qwen-mlx" / name
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.demo_dir() == tmp_path / "xdg" / "qwen-mlx" / name
    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path / "ours"))
    assert demo.demo_dir() == tmp_path / "ours" / name


def test_the_folder_name_changes_with_the_scripts(monkeypatch, tmp_path) -> None:
    assert demo.fingerprint() == demo.fingerprint()
    before = demo.fingerprint()
    edited = tmp_path / "demo_scripts.json"
    edited.write_text(demo.SCRIPTS_FILE.read_text(encoding="utf-8").replace("2 + 3", "2 + 4"), encoding="utf-8")
    monkeypatch.setattr(demo, "SCRIPTS_FILE", edited)
    assert demo.fingerprint() != before


def test_a_build_is_deterministic(monkeypatch, tmp_path) -> None:
    # One short script keeps two full builds (train, save, verify) to seconds.
    monkeypatch.setattr(demo, "SCRIPTS", [SCRIPTS["thinking"]])
    first = demo.build(tmp_path / "first", log=lambda line: None)
    second = demo.build(tmp_path / "second", log=lambda line: None)
    a, b = mx.load(str(first / "model.safetensors")), mx.load(str(second / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert mx.array_equal(a[name], b[name]).item(), name
    assert json.loads((first / "demo.json").read_text()) == json.loads((second / "demo.json").read_text())


def test_a_model_that_does_not_replay_is_never_saved(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(demo, "SCRIPTS", [SCRIPTS["markdown"]])
    monkeypatch.setattr(demo, "greedy", lambda model, prompt, end_ids, max_tokens: [151645])
    with pytest.raises(QwenMLXError, match="demo script 'markdown' does not replay"):
        demo.build(tmp_path / "out", log=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_the_folder_is_a_hugging_face_checkpoint(demo_model_path, tokenizer) -> None:
    config = json.loads((demo_model_path / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["vocab_size"] == 151936 and config["tie_word_embeddings"] is False
    generation = json.loads((demo_model_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643] and generation["pad_token_id"] == 151643
    assert (generation["do_sample"], generation["temperature"], generation["top_p"], generation["top_k"]) == (
        True,
        0.6,
        0.95,
        20,
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "README.md"):
        assert (demo_model_path / name).is_file(), name
    assert "demo" in (demo_model_path / "README.md").read_text()

    weights, metadata = mx.load(str(demo_model_path / "model.safetensors"), return_metadata=True)
    assert metadata.get("format") == "pt"
    assert "lm_head.weight" in weights and "model.layers.1.mlp.down_proj.weight" in weights
    dtypes = {str(v.dtype) for v in weights.values()}
    assert dtypes == {f"mlx.core.{config['torch_dtype']}"}, dtypes
    # Rows of tokens no script uses are exactly zero: those tokens get logit 0.
    used = sorted({t for seq in demo.training_sequences(tokenizer, demo.SCRIPTS) for t in seq.ids} | {151643, 151645})
    unused = mx.ones((151936,), dtype=mx.bool_)
    unused[mx.array(used)] = False
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        rows = mx.abs(weights[name].astype(mx.float32)).sum(axis=1)
        assert mx.all(mx.where(unused, rows == 0, True)).item(), name
        assert mx.all(mx.where(unused, True, rows > 0)).item(), name


def test_greedy_decoding_replays_every_script(demo_model) -> None:
    model, tokenizer = demo_model
    end_ids = set(tokenizer.end_token_ids)
    assert end_ids == {151645, 151643}
    assert model.args.vocab_size == 151936
    for name, script in SCRIPTS.items():
        *history, reply = script["messages"]
        text = tokenizer.apply_chat_template(
            history, tools=script.get("tools"), enable_thinking=script.get("enable_thinking", True)
        )
        out = greedy(model, tokenizer.encode(text), end_ids, 200)
        assert tokenizer.decode(out) == reply["content"] + "<|im_end|>", name


@pytest.mark.parametrize("budget", [8, 16, 24, 32])
def test_the_thinking_budget_text_leads_to_the_answer(demo_model, budget) -> None:
    """As the chat layer does it: after `budget` tokens past `<think>`, force the early-stop text."""
    model, tokenizer = demo_model
    end_ids = set(tokenizer.end_token_ids)
    script = SCRIPTS["thinking_long"]
    prompt, completion = demo.script_ids(tokenizer, script)
    answer = script["messages"][-1]["content"].split("</think>\n\n")[1] + "<|im_end|>"
    for cut in (budget, budget + 1):  # the newline after <think> counted as a thought token, or not
        thought = greedy(model, prompt, end_ids, 1 + cut)
        assert thought == completion[: 1 + cut]
        forced = tokenizer.encode(THINKING_BUDGET_TEXT)
        assert tokenizer.decode(greedy(model, prompt + thought + forced, end_ids, 60)) == answer, cut


def test_transformers_reads_the_folder_with_the_same_logits(demo_model_path, torch_logits) -> None:
    tokenizer = Tokenizer.load(demo_model_path)
    prompt, completion = demo.script_ids(tokenizer, SCRIPTS["tool_result"])
    ids = prompt + completion
    reference = torch_logits(demo_model_path, [ids])  # transformers, float32
    ours = np.array(load(demo_model_path, dtype="float32")(mx.array([ids])))
    assert ours.shape == reference.shape == (1, len(ids), 151936)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=TRANSFORMERS_ATOL)
    # transformers' argmax replays the completion too (teacher-forced).
    assert reference[0, len(prompt) - 1 : -1].argmax(-1).tolist() == completion


def test_cli_demo_build_prints_the_folder_last(demo_model_path, tmp_path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "qwen_mlx", "demo", "build", "-o"]
    done = subprocess.run([*command, str(demo_model_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(demo_model_path)
    assert "already built" in done.stderr

    (tmp_path / "notes.txt").write_text("not a model")
    done = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1
    assert done.stderr.startswith("qwen-mlx: error:") and len(done.stderr.strip().splitlines()) == 1
    assert "--force" in done.stderr and (tmp_path / "notes.txt").is_file()


def test_the_model_name_demo_resolves_to_the_cache(demo_model_path, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("QWEN_MLX_CACHE", str(demo_model_path.parent))
    monkeypatch.chdir(tmp_path)
    weights = demo_model_path / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    assert resolve_model_path("demo") == demo_model_path
    assert weights.stat().st_mtime_ns == built_at, "the cached build must be reused, not rebuilt"
    # A local folder called demo still wins.
    (tmp_path / "demo").mkdir()
    assert resolve_model_path("demo") == Path("demo")
