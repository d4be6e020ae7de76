"""bench_generate.py's speculative modes: mlx-lm's work is counted as its loop does it, and `--speculative`
runs end to end on the tiniest shape. Nothing here is timed; the bench measures speed, the tests its counts.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest

BENCH = Path(__file__).parents[1] / "bench"
SHAPE, BITS, DTYPE = "tiny-draft", 4, "float32"  # the smallest bench shape: 2 layers, hidden 128


def _bench_module(name: str):
    """A bench script's module under a name of its own (the bench's modules import each other by bare name)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


runs = _bench_module("runs")
checkpoints = _bench_module("checkpoints")
FOLDER = checkpoints.checkpoint_name(SHAPE, BITS, None, DTYPE)


@pytest.fixture(scope="module")
def bench_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench-checkpoints")
    checkpoints.ensure_checkpoint(root, SHAPE, BITS, None, DTYPE)
    return root


@pytest.mark.parametrize(
    ("from_draft", "k", "max_tokens", "expected"),
    [
        ([False] * 5, 0, 5, (5, 0, 0)),  # plain decoding: one pass per token
        ([True, True, False, True, True, False], 2, 6, (2, 4, 4)),  # every draft kept, then the pass's draw
        ([False, True, False, True, True], 2, 5, (3, 6, 3)),  # a rejection, then max_tokens ends on kept drafts
        ([False, True], 3, 100, (2, 4, 1)),  # an end token that was a kept draft: later drafts not counted
    ],
)
def test_mlx_lm_work_reads_passes_and_drafts_from_the_flags(from_draft, k, max_tokens, expected):
    assert runs.mlx_lm_work(from_draft, k, max_tokens) == expected


def _counting(model, calls: list[int], spoil_every: int = 0):
    """Record each forward's length; with `spoil_every`, every such call's logits are negated (a bad draft)."""

    class Counting(type(model)):
        def __call__(self, inputs, *args, **kwargs):
            calls.append(inputs.shape[1])
            logits = super().__call__(inputs, *args, **kwargs)
            return -logits if spoil_every and len(calls) % spoil_every == 0 else logits

    model.__class__ = Counting
    return model


def test_mlx_lm_passes_match_its_forward_calls(bench_checkpoints):
    """The counts read from `from_draft` equal the target forwards mlx-lm really makes, with kept and
    rejected drafts (a draft that is the target, spoiled on every third call)."""
    path = bench_checkpoints / FOLDER
    target_calls, draft_calls = [], []
    target, tokenizer = mlx_lm.load(str(path))
    target = _counting(target, target_calls)
    draft = _counting(mlx_lm.load(str(path))[0], draft_calls, spoil_every=3)
    runs.no_end_tokens(tokenizer)
    prompt, k = list(range(1000, 1020)), 3
    run = runs.generate_mlx_lm(target, tokenizer, prompt, 17, 2048, draft_model=draft, num_draft_tokens=k, keep=None)
    assert run.completion_tokens == 17
    assert target_calls[0] == len(prompt) - 1  # the prompt's chunk before its last token is not a pass
    assert run.target_passes == len(target_calls) - 1
    assert 0 < run.accepted_tokens < run.draft_tokens  # both kept and rejected drafts happened
    drafted = len(draft_calls) - 1  # one draft token per call after the draft's own prompt chunk
    assert drafted - (k - 1) <= run.draft_tokens <= drafted
    mx.clear_cache()


@pytest.mark.slow  # a fresh process that imports and loads both libraries twice: about 20-25 s here
def test_speculative_mode_runs_on_the_tiniest_shape(bench_checkpoints, tmp_path):
    """`--speculative` on one tiny target drafting for itself: every side runs, plain decoding costs one pass
    a token, a draft that is the target is kept and gives plain decoding's tokens, and the tables are written."""
    out = tmp_path / "results"
    command = [sys.executable, str(BENCH / "bench_generate.py"), "--speculative", "--quick", "--no-demo"]
    command += ["--shape", SHAPE, "--draft-shape", SHAPE, "--rounds", "1", "--max-tokens", "5"]
    command += ["--prompt-tokens", "80", "--checkpoints", str(bench_checkpoints), "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    results = json.loads((out / "bench-speculative-cpu-quick.json").read_text())
    (target,) = results["speculative"]
    assert [p["name"] for p in target["prompts"]] == ["repetitive (edit a file)", "natural (a question)"]
    for prompt in target["prompts"]:
        assert prompt["prompt_tokens"] <= 80
        summary = prompt["summary"]
        assert set(summary) == set(results["sides"])
        assert summary[runs.OURS]["passes_per_token"] == summary[runs.MLX_LM]["passes_per_token"] == 1
        for side in (runs.OURS_DRAFT, runs.MLX_LM_DRAFT):
            assert summary[side]["same_tokens"] is True
            assert summary[side]["acceptance"] > 0.5
            assert summary[side]["passes_per_token"] < 1
        assert summary[runs.OURS_LOOKUP]["passes_per_token"] <= 1
        assert summary[runs.OURS_LOOKUP]["same_tokens"] is True
    table = (out / "bench-speculative-cpu-quick.md").read_text()
    assert "| repetitive (edit a file) (" in table and "passes/token" in table and "CPU backend" in table


def test_prompt_lookup_on_an_answer_that_repeats_its_input_needs_under_half_a_pass_per_token(tmp_path_factory):
    """The issue's bar on the repeater (the demo's shape taught one edit that answers with its input, a
    word fixed): greedy prompt lookup gives plain decoding's tokens in at most 0.5 target passes per token,
    and a prompt with nothing to match drafts nothing and costs plain decoding's one pass a token."""
    from qwen_mlx import load
    from qwen_mlx.demo import script_ids
    from qwen_mlx.engine import Generation
    from qwen_mlx.speculative import PromptLookup
    from qwen_mlx.tokenizer import Tokenizer

    folder = checkpoints.ensure_repeater(tmp_path_factory.mktemp("repeater"), log=lambda line: None)
    model, tokenizer = load(folder), Tokenizer.load(folder)
    end_ids = set(tokenizer.end_token_ids)
    prompt, completion = script_ids(tokenizer, checkpoints.EDIT_SCRIPT)

    def run(prompt_ids, drafter=None, max_tokens=100):
        generation = Generation(model, prompt_ids, max_tokens=max_tokens, end_ids=end_ids, drafter=drafter)
        return list(generation), generation.stats

    plain, plain_stats = run(prompt)
    assert plain == completion[: len(plain)] and len(plain) > 40 and plain_stats.target_passes == len(plain)
    looked_up, stats = run(prompt, PromptLookup())
    assert looked_up == plain
    assert stats.target_passes / len(looked_up) <= 0.5, (stats.target_passes, len(looked_up))
    # Distinct ids, each once: no n-gram of the prompt recurs, and 3 tokens generated give none to look up.
    _, stats = run(list(range(1000, 1064)), PromptLookup(), max_tokens=3)
    assert stats.draft_tokens == 0 and stats.target_passes == stats.completion_tokens == 3
