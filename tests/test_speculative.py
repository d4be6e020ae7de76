"""Speculative decoding is lossless: drafts from the demo model itself or from prompt lookup give the tokens
plain decoding gives, through every turn feature, and speculative sampling keeps the target's distribution.

On this CPU backend a pass over k tokens costs k single steps, so nothing here is about speed: the tests
count work instead (target passes per generated token).
"""

from __future__ import annotations

import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from fixtures import VOCAB_SIZE

import qwen_mlx
from qwen_mlx.chat import ChatSession
from qwen_mlx.engine import Generation
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.sampling import Sampling
from qwen_mlx.speculative import LOOKUP, DraftModel, PromptLookup
from qwen_mlx.tokenizer import Tokenizer
from qwen_mlx.turn import TurnOptions

GREEDY = Sampling(temperature=0)
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city name, e.g. Paris"}},
                "required": ["city"],
            },
        },
    }
]
CAPITAL_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "capital",
        "schema": {
            "type": "object",
            "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
            "required": ["country", "capital"],
            "additionalProperties": False,
        },
    },
}
# (messages, options): the turn features speculation must leave untouched.
CASES = {
    "thinking": ([{"role": "user", "content": "What is 2 + 3?"}], {}),
    "budget": ([{"role": "user", "content": "Is 91 a prime number?"}], {"thinking_budget": 16}),
    "no_think": ([{"role": "user", "content": "Hello! /no_think"}], {}),
    "tool_call": ([{"role": "user", "content": "What's the weather in Paris?"}], {"tools": WEATHER_TOOLS}),
    "forced_tool_call": (
        [{"role": "user", "content": "What's the weather in Paris?"}],
        {"tools": WEATHER_TOOLS, "tool_choice": "get_weather"},
    ),
    "json": ([{"role": "user", "content": "Give the capital of France as JSON."}], {"response_format": CAPITAL_SCHEMA}),
    "stop": ([{"role": "user", "content": "What is 2 + 3?"}], {"stop": ["Adding"]}),
}


@pytest.fixture(scope="module")
def demo(demo_model_path):
    return qwen_mlx.load(demo_model_path), Tokenizer.load(demo_model_path)


def run(session: ChatSession, messages, options) -> tuple:
    reply = session.complete(messages, sampling=GREEDY, max_tokens=160, **options)
    calls = [(c.name, c.arguments) for c in reply.tool_calls]
    return (reply.reasoning, reply.answer, calls, reply.stats.finish_reason), reply.stats


@pytest.fixture(scope="module")
def plain(demo):
    """Plain decoding's reply to every case, per KV cache kind (computed once each)."""
    made: dict = {}

    def get(kv_bits: int | None) -> dict:
        if kv_bits not in made:
            session = ChatSession(*demo, kv_bits=kv_bits)
            made[kv_bits] = {name: run(session, *case)[0] for name, case in CASES.items()}
        return made[kv_bits]

    return get


@pytest.mark.parametrize("kv_bits", [None, 8])
@pytest.mark.parametrize("draft", ["self", LOOKUP])
def test_greedy_speculation_gives_plain_decodings_tokens_in_every_turn_feature(demo, plain, draft, kv_bits):
    model, tokenizer = demo
    drafter = DraftModel(model, VOCAB_SIZE, kv_bits) if draft == "self" else draft
    session = ChatSession(model, tokenizer, draft=drafter, kv_bits=kv_bits)
    expected, kept = plain(kv_bits), {}
    for name, case in CASES.items():
        got, stats = run(session, *case)
        assert got == expected[name], name
        # Each kept draft saves one pass (the last pass's draw goes unused when a kept draft ended the turn);
        # a turn with nothing to match costs what plain decoding does.
        saved = stats.completion_tokens - stats.target_passes
        assert saved in (stats.accepted_tokens, stats.accepted_tokens - 1), (name, stats)
        assert stats.accepted_tokens <= stats.draft_tokens
        kept[name] = stats.accepted_tokens
    assert all(kept.values()) if draft == "self" else sum(kept.values()) > 0, kept


def test_a_model_drafting_for_itself_has_every_draft_kept(demo):
    """Unconstrained greedy: the draft's argmax is the target's, so nothing is rejected, and each pass
    yields `num_draft_tokens` + 1 tokens."""
    model, tokenizer = demo
    session = ChatSession(model, tokenizer, draft=DraftModel(model, VOCAB_SIZE), num_draft_tokens=3)
    reply = session.complete(*CASES["thinking"][:1], sampling=GREEDY)
    stats = reply.stats
    assert stats.accepted_tokens == stats.draft_tokens > 0 and stats.acceptance == 1.0
    decode_passes = stats.target_passes - 1  # the first token comes from the prompt's pass
    assert decode_passes == -(-(stats.completion_tokens - 1) // 4)


def test_multi_turn_chat_with_speculation_reuses_both_caches(demo):
    model, tokenizer = demo
    first = [{"role": "user", "content": "Hi!"}]
    plain = ChatSession(model, tokenizer)
    draft = DraftModel(model, VOCAB_SIZE)
    fast = ChatSession(model, tokenizer, draft=draft)
    replies = [session.complete(first, sampling=GREEDY) for session in (plain, fast)]
    assert replies[0].answer == replies[1].answer
    answer = {"role": "assistant", "content": replies[0].answer, "reasoning_content": replies[0].reasoning}
    second = [*first, answer, {"role": "user", "content": "What can you do?"}]
    a, b = plain.complete(second, sampling=GREEDY), fast.complete(second, sampling=GREEDY)
    assert (a.reasoning, a.answer) == (b.reasoning, b.answer)
    assert b.stats.cached_tokens == a.stats.cached_tokens > 0
    assert len(draft.cached_ids) > b.stats.prompt_tokens  # the draft's cache holds turn 2 too, reused from turn 1


def test_a_reader_that_stops_early_leaves_only_what_it_saw_in_the_cache(demo):
    model, tokenizer = demo
    prompt = tokenizer.encode("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    generation = Generation(model, prompt, drafter=DraftModel(model, VOCAB_SIZE), max_tokens=40)
    for i, _ in enumerate(generation):
        if i == 5:
            break
    assert generation.cache[0].offset <= len(prompt) + len(generation.tokens)


def test_prompt_lookup_drafts_the_continuation_of_the_latest_match():
    lookup = PromptLookup()
    sequence = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 2, 3]
    assert lookup.propose(sequence, 3) == [7, 8, 6]  # "2 3" last seen before 7 8 6 (not before 4 5 9)
    assert lookup.propose([*sequence, 7], 2) == [8, 6]  # "2 3 7": the longer n-gram, incrementally indexed
    assert lookup.propose([10, 11, 12], 4) == []  # nothing repeats: no draft, no extra pass
    assert lookup.propose([5, 6, 5, 6], 4) == [5, 6]  # drafts never run past the sequence


def test_bad_draft_options_are_refused(demo):
    model, tokenizer = demo
    with pytest.raises(QwenMLXError, match="vocabulary"):
        DraftModel(model, VOCAB_SIZE + 1)
    with pytest.raises(QwenMLXError, match="draft must be"):
        ChatSession(model, tokenizer, draft="ngram")
    with pytest.raises(QwenMLXError, match="num_draft_tokens"):
        Generation(model, [1, 2], drafter=PromptLookup(), num_draft_tokens=0)


class OneDraft:
    """A test double of a drafter: always proposes the same token."""

    def __init__(self, token: int):
        self.token = token

    def propose(self, sequence: list[int], k: int) -> list[int]:
        return [self.token]


IM_START = 151644  # <|im_start|>: a special token, which no JSON text can hold


def test_the_json_grammar_admits_drafts_up_to_the_first_it_forbids(demo):
    from qwen_mlx.constrain import JsonConstraint, response_format_grammar

    _, tokenizer = demo
    constraint = JsonConstraint(tokenizer, response_format_grammar(CAPITAL_SCHEMA), VOCAB_SIZE)
    constraint(mx.array([1]), mx.zeros((1, VOCAB_SIZE)))  # the first mask; its draw is not fed yet
    last, *good = tokenizer.encode('{"country": "France", "capital": "Paris"}')
    assert constraint.admitted(last, good) == len(good)
    bad = tokenizer.encode('{"country": 5}')[1:]
    assert 0 < constraint.admitted(last, bad) < len(bad)  # up to the 5, where a string must be
    assert tokenizer.decode(bad[: constraint.admitted(last, bad)]).rstrip().endswith(":")
    assert constraint.admitted(last, [IM_START, *good]) == 0
    assert constraint.admitted(last, good) == len(good)  # checking fed nothing


def test_a_draft_the_guide_forbids_is_cut_before_the_pass(demo):
    """A drafter that always proposes a token no JSON can hold: inside the JSON answer the guide cuts each
    draft, so those passes verify nothing; before it (thinking) the drafts are proposed and rejected. The
    tokens are plain decoding's."""
    model, tokenizer = demo
    session = ChatSession(model, tokenizer)
    messages, options = CASES["json"]

    def generate(drafter):
        plan = session.turns.plan(messages, TurnOptions(sampling=GREEDY, max_tokens=160, **options))
        generation = Generation(
            model, plan.prompt_ids, sampler=plan.sampler, logits_processors=plan.processors,
            max_tokens=plan.max_tokens, end_ids=tokenizer.end_token_ids, drafter=drafter,
        )  # fmt: skip
        return list(generation), generation.stats

    plain, _ = generate(None)
    cut, stats = generate(OneDraft(IM_START))
    assert cut == plain
    answer = len(plain) - plain.index(tokenizer.encode("</think>")[0]) - 2  # the JSON after the blank line
    assert answer > 5
    assert stats.draft_tokens <= stats.target_passes - 1 - (answer - 1), stats  # none inside the JSON


def test_speculative_sampling_keeps_the_targets_next_token_distribution(checkpoint):
    """At temperature 1 a drafted position's token follows the target's distribution, kept draft or not.

    A tiny random model whose logits, plus a logit bias on 8 tokens, are the target distribution; the first
    generated token is forced, so the second is drawn in a verification pass (the draft, kept with its
    probability, else a draw from the rest). Chi-square over the 8 tokens, 400 seeds.
    """
    model = qwen_mlx.load(checkpoint("dense_tied"))
    prompt, first = [11, 12, 13, 14], 15
    bias = dict(zip(range(100, 108), [30.0, 29.5, 29.0, 28.5, 28.0, 27.5, 27.0, 29.2], strict=True))
    sampling = Sampling(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, logit_bias=bias)

    def force_first(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size != len(prompt):  # only the prompt's own step: the first generated token
            return logits
        return mx.where(mx.arange(logits.shape[-1]) == first, 0.0, -mx.inf)[None]

    processors = [force_first, *sampling.logits_processors(VOCAB_SIZE)]
    logits = model(mx.array([*prompt, first])[None])[0, -1].astype(mx.float32)
    for token, value in bias.items():
        logits[token] += value
    probs = np.array(mx.softmax(logits).tolist())
    tokens = list(bias)
    expected = np.append(probs[tokens], 1 - probs[tokens].sum())
    assert expected[:-1].sum() > 0.99  # the bias makes the 8 tokens the likely ones (the pooled rest is ~0)
    counts, kept = np.zeros(len(tokens) + 1), 0
    samples = 400
    for seed in range(samples):
        seeded = Sampling(**{**sampling.__dict__, "seed": seed})
        generation = Generation(
            model, prompt, sampler=seeded.sampler(VOCAB_SIZE), logits_processors=processors,
            drafter=OneDraft(100), max_tokens=3,
        )  # fmt: skip
        out = list(generation)
        assert out[0] == first
        counts[tokens.index(out[1]) if out[1] in tokens else -1] += 1
        kept += generation.stats.accepted_tokens
    assert counts[-1] == 0
    chi2 = float(((counts[:-1] - expected[:-1] * samples) ** 2 / (expected[:-1] * samples)).sum())
    assert chi2 < 20.3, (chi2, counts, expected * samples)  # 7 degrees of freedom, p = 0.005
    assert 0 < kept < samples  # drafts were both kept and rejected


def test_generate_with_a_draft_model_or_prompt_lookup_prints_what_plain_decoding_prints(demo_model_path):
    base = [sys.executable, "-m", "qwen_mlx", "generate", "--model", str(demo_model_path), "--temperature", "0"]
    base += ["--prompt", "Is 91 a prime number?", "--thinking-budget", "16"]

    def run_generate(*options: str) -> subprocess.CompletedProcess:
        result = subprocess.run([*base, *options], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result

    plain = run_generate()
    for options in (("--draft-model", str(demo_model_path)), ("--prompt-lookup", "--num-draft-tokens", "6")):
        result = run_generate(*options)
        assert result.stdout == plain.stdout, options
        assert re.search(r"drafts \d+/\d+ kept \(\d+%\), 0\.\d\d passes/token", result.stderr), result.stderr
    assert "drafts" not in plain.stderr
    refused = subprocess.run([*base, "--prompt-lookup", "--num-draft-tokens", "0"], capture_output=True, text=True)
    assert refused.returncode == 1 and refused.stderr.strip().endswith(
        "--num-draft-tokens 0 is invalid: it must be at least 1"
    )


def test_the_server_speculates_per_request_beside_the_batch(demo_model_path):
    """`serve --draft-model` (the demo drafting for itself): each request's answer is plain decoding's,
    whether it drafts with the model (the server's default), with prompt lookup, or not at all, alone or
    three at once (the others keep batching); `usage.speculative` counts the work."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import running_server
    from openai import OpenAI

    cases = {
        "thinking": [{"role": "user", "content": "What is 2 + 3?"}],
        "hi": [{"role": "user", "content": "Hi!"}],
    }
    options = ("--model-name", "demo", "--draft-model", str(demo_model_path), "--num-draft-tokens", "3")
    with running_server(demo_model_path, *options) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(name: str, draft: str | None, stream: bool = False):
            extra = {"speculative": {"draft": draft}} if draft else {}
            options = {"model": "demo", "messages": cases[name], "temperature": 0, "extra_body": extra}
            if stream:
                chunks = list(client.chat.completions.create(**options, stream=True))
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), None
            reply = client.chat.completions.create(**options)
            return reply.choices[0].message.content, reply.usage

        plain = {name: ask(name, "none")[0] for name in cases}
        for name in cases:
            for draft in (None, "lookup"):
                content, usage = ask(name, draft)
                assert content == plain[name], (name, draft)
                extension = (usage.model_extra or {}).get("speculative")
                if draft is None:  # the model drafting for itself (caches made by other paths: near ties may differ)
                    assert extension and extension["accepted_tokens"] > extension["draft_tokens"] / 2, usage
                    assert extension["target_passes"] < usage.completion_tokens
        with ThreadPoolExecutor(6) as pool:
            jobs = [(n, d, pool.submit(ask, n, d, True)) for n in cases for d in (None, "none")]
            for name, draft, job in jobs:
                assert job.result()[0] == plain[name], (name, draft)
