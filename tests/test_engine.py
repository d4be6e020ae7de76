"""The token engine and the chat session on a tiny random-weight Qwen3 (real tokenizer, real template).

Greedy decoding with the cache is checked against greedy decoding by full forward passes (no cache), so
chunked prefill, pipelining, forced tokens and prefix reuse must all leave the logits untouched.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

import qwen_mlx
from qwen_mlx.cache import make_cache, trim_cache
from qwen_mlx.chat import ChatSession, Done
from qwen_mlx.engine import Generation
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.sampling import NON_THINKING_DEFAULTS, THINKING_DEFAULTS, Sampling
from qwen_mlx.tokenizer import Tokenizer

GREEDY = Sampling(temperature=0)


@pytest.fixture(scope="module")
def tiny(checkpoint):
    path = checkpoint("dense_wide")  # head_dim 32, so the quantized KV cache applies
    return qwen_mlx.load(path), Tokenizer.load(path)


def greedy_without_cache(model, ids: list[int], n: int, forced: dict[int, list[int]] | None = None) -> list[int]:
    """Reference: each token from a full forward pass over everything so far."""
    seq, out = list(ids), []
    while len(out) < n:
        if forced and len(out) in forced:
            out += forced.pop(len(out))
            seq += out[len(seq) - len(ids) :]
            continue
        token = int(mx.argmax(model(mx.array(seq)[None])[0, -1]))
        out.append(token)
        seq.append(token)
    return out[:n]


def test_greedy_matches_full_forward_with_chunked_prefill(tiny, prompt_ids):
    model, _ = tiny
    progress = []
    generation = Generation(
        model, prompt_ids, max_tokens=12, prefill_step_size=16, on_prefill=lambda *p: progress.append(p)
    )
    tokens = list(generation)
    assert tokens == greedy_without_cache(model, prompt_ids, 12)
    total = len(prompt_ids)
    assert progress[0] == (16, total) and progress[-1] == (total, total)
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)
    stats = generation.stats
    assert stats.finish_reason == "length" and stats.completion_tokens == 12 and stats.prefill_tokens == total
    assert stats.ttft_s > 0 and stats.prompt_tps > 0 and stats.generation_tps > 0 and stats.peak_memory > 0


def test_end_token_stops_and_is_the_last_token(tiny, prompt_ids):
    model, _ = tiny
    first_three = greedy_without_cache(model, prompt_ids, 3)
    generation = Generation(model, prompt_ids, max_tokens=50, end_ids=[first_three[2]])
    assert list(generation) == first_three
    assert generation.stats.finish_reason == "stop"


class ForceAfter:
    """A logits processor that leaves `forced` as the only choice once `after` tokens were generated, and
    records the histories it was given (the engine must pass the prompt, then the generated tokens)."""

    def __init__(self, prompt_len: int, after: int, forced: list[int]):
        self.prompt_len, self.after, self.forced = prompt_len, after, forced
        self.histories: list[list[int]] = []

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        self.histories.append(tokens.tolist())
        generated = tokens.size - self.prompt_len
        if self.after <= generated < self.after + len(self.forced):
            only = self.forced[generated - self.after]
            return mx.where(mx.arange(logits.shape[-1]) == only, logits, -mx.inf)
        return logits


def test_forced_tokens_are_fed_then_sampling_resumes(tiny, prompt_ids):
    model, _ = tiny
    forced = [9707, 11, 1879]
    force = ForceAfter(len(prompt_ids), 2, forced)
    tokens = list(Generation(model, prompt_ids, max_tokens=10, logits_processors=[force]))
    assert tokens[2:5] == forced
    assert tokens == greedy_without_cache(model, prompt_ids, 10, forced={2: list(forced)})


def test_processors_see_the_prompt_then_the_generated_tokens(tiny, prompt_ids):
    """mlx-lm's convention, with a cached prefix passed as `history`: every step sees the whole sequence."""
    model, _ = tiny
    cache = make_cache(model)
    list(Generation(model, prompt_ids[:10], cache, max_tokens=1))
    trim_cache(cache, 10)
    force = ForceAfter(len(prompt_ids), 99, [])
    tokens = list(Generation(model, prompt_ids[10:], cache, history=prompt_ids[:10], max_tokens=4,
                             logits_processors=[force]))  # fmt: skip
    # One call per step; the last is the pipelined step queued before max_tokens was known to be reached.
    assert force.histories == [prompt_ids + tokens[:i] for i in range(5)]
    assert tokens == greedy_without_cache(model, prompt_ids, 4)


def test_cache_holds_prompt_and_tokens(tiny, prompt_ids):
    model, _ = tiny
    cache = make_cache(model)
    tokens = list(Generation(model, prompt_ids, cache, max_tokens=4))
    # The pipelined step already fed the last token.
    assert cache[0].offset == len(prompt_ids) + len(tokens)


def test_quantized_kv_cache_runs_and_stays_close(tiny, prompt_ids):
    model, _ = tiny
    for bits in (4, 8):
        cache = make_cache(model, kv_bits=bits)
        assert cache[0].bits == bits
        list(Generation(model, prompt_ids, cache, max_tokens=3))
        assert cache[0].offset == len(prompt_ids) + 3
    # 8-bit keys and values barely move the logits (which span about ±6 here): max |Δ| < 0.1, same argmax.
    reference = model(mx.array(prompt_ids)[None])[0, -1]
    cache = make_cache(model, kv_bits=8)
    model(mx.array(prompt_ids[:-1])[None], cache=cache)
    quantized = model(mx.array(prompt_ids[-1:])[None], cache=cache)[0, -1]
    assert mx.abs(quantized - reference).max().item() < 0.1
    assert mx.argmax(quantized).item() == mx.argmax(reference).item()
    with pytest.raises(QwenMLXError, match="kv_bits=3"):
        make_cache(model, kv_bits=3)


def test_sampling_defaults_per_mode_and_checkpoint():
    assert Sampling().resolve({}, thinking=True).temperature == THINKING_DEFAULTS["temperature"]
    assert Sampling().resolve({}, thinking=False).top_p == NON_THINKING_DEFAULTS["top_p"]
    from_checkpoint = Sampling().resolve({"temperature": 0.3, "top_k": 40}, thinking=False)
    assert (from_checkpoint.temperature, from_checkpoint.top_k, from_checkpoint.top_p) == (0.3, 40, 0.8)
    assert Sampling(temperature=1.0).resolve({"temperature": 0.3}).temperature == 1.0
    # A top_k as large as the vocabulary keeps every token (mlx-lm's sampler would refuse it).
    wide = Sampling(temperature=1.0, top_k=10**6, seed=0).resolve({})
    assert wide.sampler(vocab_size=8)(mx.log(mx.ones((1, 8)) / 8)).shape == (1,)
    for bad in (Sampling(top_p=0), Sampling(temperature=-1), Sampling(presence_penalty=3), Sampling(top_k=-2)):
        with pytest.raises(QwenMLXError, match="sampling option"):
            bad.resolve({})


def test_seeded_sampling_repeats_and_logit_bias_applies(tiny):
    model, tokenizer = tiny
    messages = [{"role": "user", "content": "Tell me something."}]

    def answer(sampling: Sampling) -> list[int]:
        session = ChatSession(model, tokenizer)
        session.complete(messages, max_tokens=8, sampling=sampling)
        return session.cached_ids

    seeded = Sampling(temperature=1.0, top_p=1.0, top_k=0, seed=7)
    assert answer(seeded) == answer(seeded)
    assert answer(seeded) != answer(Sampling(temperature=1.0, top_p=1.0, top_k=0, seed=8))
    hello = tokenizer.encode("Hello")[0]
    forced = answer(Sampling(temperature=0, logit_bias={hello: 100.0}))
    prompt = ChatSession(model, tokenizer).render(messages)
    assert forced[len(prompt) : len(prompt) + 3] == [hello] * 3


def test_presence_penalty_changes_a_repetitive_greedy_run(tiny, prompt_ids):
    model, _ = tiny
    plain = list(Generation(model, prompt_ids, max_tokens=24))
    penalized = Sampling(temperature=0, presence_penalty=2.0).resolve({})
    processors = penalized.logits_processors(model.args.vocab_size)
    with_penalty = list(Generation(model, prompt_ids, max_tokens=24, logits_processors=processors))
    assert len(set(with_penalty)) >= len(set(plain))
    assert with_penalty != plain or len(set(plain)) == len(plain)


def test_second_turn_reuses_the_common_prefix_and_matches_a_fresh_session(tiny):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer)
    first = [{"role": "user", "content": "Hi there"}]
    reply = session.complete(first, max_tokens=6, sampling=GREEDY)
    assert reply.stats.cached_tokens == 0
    second = first + [{"role": "assistant", "content": reply.answer}, {"role": "user", "content": "And then?"}]
    prompt = session.render(second)
    pairs = list(zip(session.cached_ids, prompt, strict=False))
    expected_reuse = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
    again = session.complete(second, max_tokens=6, sampling=GREEDY)
    assert again.stats.cached_tokens == expected_reuse > 0
    assert again.stats.prompt_tokens == len(prompt)
    fresh = ChatSession(model, tokenizer).complete(second, max_tokens=6, sampling=GREEDY)
    assert (again.reasoning, again.answer) == (fresh.reasoning, fresh.answer)
    # The same prompt again: everything but the last prompt token comes from the cache.
    third = session.complete(second, max_tokens=6, sampling=GREEDY)
    assert third.stats.cached_tokens == len(prompt) - 1
    assert (third.reasoning, third.answer) == (fresh.reasoning, fresh.answer)


def test_abandoned_stream_leaves_a_usable_cache(tiny):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, kv_bits=8)
    messages = [{"role": "user", "content": "Hi there"}]
    stream = session.stream(messages, max_tokens=20, sampling=GREEDY)
    next(stream)
    stream.close()
    assert session.cached_ids and session.cache[0].offset == len(session.cached_ids)
    reply = session.complete(messages, max_tokens=4, sampling=GREEDY)
    assert reply.stats.cached_tokens == len(session.render(messages)) - 1


def test_one_turn_at_a_time(tiny):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer)
    messages = [{"role": "user", "content": "Hi there"}]
    first = session.stream(messages, max_tokens=5, sampling=GREEDY)
    next(first)
    with pytest.raises(QwenMLXError, match="still streaming a turn"):
        next(session.stream(messages, max_tokens=5, sampling=GREEDY))
    rest = list(first)
    assert isinstance(rest[-1], Done)
    assert session.complete(messages, max_tokens=2, sampling=GREEDY).stats.completion_tokens == 2


def test_prompt_longer_than_the_context_is_an_error(tiny):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer)
    session.turns.context_length = 32
    with pytest.raises(QwenMLXError, match=r"the prompt is \d+ tokens but the model's context is 32"):
        session.complete([{"role": "user", "content": "word " * 40}])
    # What fits generates, capped to the room left in the context.
    prompt = session.render([{"role": "user", "content": "Hi"}])
    reply = session.complete([{"role": "user", "content": "Hi"}], max_tokens=100, sampling=GREEDY)
    assert reply.stats.completion_tokens <= 32 - len(prompt)


def test_context_length_follows_yarn():
    args = qwen_mlx.ModelArgs.from_dict(
        {
            "model_type": "qwen3",
            "hidden_size": 64,
            "num_hidden_layers": 1,
            "intermediate_size": 128,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "vocab_size": 151936,
            "max_position_embeddings": 40960,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        }
    )
    assert args.context_length == 131072


def test_done_is_last_and_counts_tokens(tiny):
    model, tokenizer = tiny
    events = list(ChatSession(model, tokenizer).stream([{"role": "user", "content": "Hi"}], max_tokens=5))
    assert isinstance(events[-1], Done) and not any(isinstance(e, Done) for e in events[:-1])
    stats = events[-1].stats
    assert stats.completion_tokens == 5 and stats.finish_reason == "length" and stats.thinking
