"""One timed run of each side: raw generation from prompt ids, and one turn of a full-history conversation.

Design decisions:
- One host clock for both sides: TTFT is the time from the call to the first token handed to the caller,
  decode speed is (tokens - 1) / (time from the first token to the last); the libraries' own figures are
  kept beside ours in the raw data but never compared.
- Raw generation is qwen_mlx's `Generation` against mlx-lm's `stream_generate` on the same prompt ids,
  both greedy (the same `argmax` sampler) and both with a fresh cache of mlx-lm's `KVCache`s.
- End tokens are switched off on both sides, so a random-weight model runs to `max_tokens` on each.
- Peak memory counts one model: MLX's peak during the run, less the memory already in use when it
  started (both loaded models), plus the bytes of that side's own weights; both sides load eagerly.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache

from qwen_mlx.cache import make_cache
from qwen_mlx.chat import ChatSession, Done
from qwen_mlx.engine import Generation
from qwen_mlx.sampling import Sampling

OURS = "qwen_mlx"
MLX_LM = "mlx-lm"
MLX_LM_CACHED = "mlx-lm + prompt cache"
GREEDY = Sampling(temperature=0)
# Kept from each run to check both sides generate the same tokens from the same weights.
KEPT_TOKENS = 16


@dataclass
class Run:
    side: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    decode_s: float  # from the first token to the last
    peak_memory: int  # bytes: this side's weights plus what the run added
    tokens: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    reported: dict[str, Any] = field(default_factory=dict)  # the library's own numbers

    @property
    def prefill_tps(self) -> float:
        return (self.prompt_tokens - self.cached_tokens) / self.ttft_s

    @property
    def decode_tps(self) -> float:
        return (self.completion_tokens - 1) / self.decode_s if self.decode_s > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prefill_tps": self.prefill_tps, "decode_tps": self.decode_tps}


def weights_nbytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


class Clock:
    """Times one run: `start`, `token` for each token handed over, `stop`; memory from `start` on."""

    def start(self, weights: int, kept: int = 0) -> None:
        """`kept`: bytes this side already holds besides its weights (a cache kept from earlier turns)."""
        gc.collect()  # the previous run's cache must not count in this run's baseline
        mx.synchronize()
        mx.reset_peak_memory()
        self.weights = weights + kept
        self.base = mx.get_active_memory()
        self.first = self.last = None
        self.t0 = time.perf_counter()

    def token(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now

    def run(self, side: str, prompt_tokens: int, tokens: list[int], **extra) -> Run:
        return Run(
            side=side,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(tokens),
            ttft_s=self.first - self.t0,
            decode_s=self.last - self.first,
            peak_memory=self.weights + max(0, mx.get_peak_memory() - self.base),
            tokens=tokens[:KEPT_TOKENS],
            **extra,
        )


def no_end_tokens(mlx_lm_tokenizer) -> None:
    mlx_lm_tokenizer.eos_token_ids = set()


def generate_ours(model, prompt_ids: list[int], max_tokens: int, prefill_step_size: int) -> Run:
    clock = Clock()
    clock.start(weights_nbytes(model))
    generation = Generation(
        model, prompt_ids, make_cache(model), max_tokens=max_tokens, prefill_step_size=prefill_step_size
    )
    tokens = []
    for token in generation:
        clock.token()
        tokens.append(token)
    stats = generation.stats
    reported = {
        "ttft_s": stats.ttft_s,
        "prompt_tps": stats.prompt_tps,
        "generation_tps": stats.generation_tps,
        "peak_memory": stats.peak_memory,
    }
    return clock.run(OURS, len(prompt_ids), tokens, reported=reported)


def generate_mlx_lm(model, tokenizer, prompt_ids: list[int], max_tokens: int, prefill_step_size: int) -> Run:
    clock = Clock()
    clock.start(weights_nbytes(model))
    tokens, last = [], None
    for last in stream_generate(
        model, tokenizer, prompt_ids, max_tokens=max_tokens, prefill_step_size=prefill_step_size
    ):
        clock.token()
        tokens.append(last.token)
    reported = {
        "prompt_tps": last.prompt_tps,
        "generation_tps": last.generation_tps,
        "peak_memory": int(last.peak_memory * 1e9),
    }
    return clock.run(MLX_LM, len(prompt_ids), tokens, reported=reported)


class OursChat:
    """qwen_mlx's `ChatSession`: one cache across turns, trimmed back to the common prefix."""

    side = OURS

    def __init__(self, model, tokenizer):
        tokenizer.end_token_ids = []
        self.session = ChatSession(model, tokenizer)
        self.weights = weights_nbytes(model)

    def render(self, messages: list[dict]) -> list[int]:
        return self.session.render(messages, enable_thinking=True)

    def turn(self, messages: list[dict], max_tokens: int) -> Run:
        clock = Clock()
        tokens = []

        def first_token(done: int, total: int) -> None:
            if done == total and clock.first is None:
                clock.token()

        clock.start(self.weights, kept=sum(c.nbytes for c in self.session.cache))
        done = None
        for event in self.session.stream(
            messages, enable_thinking=True, max_tokens=max_tokens, sampling=GREEDY, on_prefill=first_token
        ):
            if isinstance(event, Done):
                done = event.stats
            else:
                clock.last = time.perf_counter()
        tokens = self.session.cached_ids[done.prompt_tokens :]
        run = clock.run(
            self.side,
            done.prompt_tokens,
            tokens,
            cached_tokens=done.cached_tokens,
            reported={"ttft_s": done.ttft_s, "generation_tps": done.generation_tps, "peak_memory": done.peak_memory},
        )
        run.completion_tokens = done.completion_tokens
        return run


class MlxLmChat:
    """mlx-lm on the rendered full history: no reuse (as `mlx_lm.generate`), or the server's prompt cache."""

    def __init__(self, model, tokenizer, reuse: bool):
        no_end_tokens(tokenizer)
        self.model, self.tokenizer, self.reuse = model, tokenizer, reuse
        self.side = MLX_LM_CACHED if reuse else MLX_LM
        self.prompt_cache = LRUPromptCache() if reuse else None
        self.weights = weights_nbytes(model)

    def render(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=True))

    def turn(self, messages: list[dict], max_tokens: int) -> Run:
        clock = Clock()
        clock.start(self.weights, kept=self.prompt_cache.nbytes if self.reuse else 0)
        prompt = self.render(messages)
        cache, rest = None, prompt
        if self.reuse:  # as mlx_lm.server's sequential path does it
            cache, rest = self.prompt_cache.fetch_nearest_cache("model", prompt)
        if cache is None:
            cache = make_prompt_cache(self.model)
        tokens = []
        for response in stream_generate(self.model, self.tokenizer, rest, max_tokens=max_tokens, prompt_cache=cache):
            clock.token()
            tokens.append(response.token)
        if self.reuse:
            self.prompt_cache.insert_cache("model", prompt + tokens, cache)
        return clock.run(self.side, len(prompt), tokens, cached_tokens=len(prompt) - len(rest))
