"""The token engine: prompt ids in, sampled ids out, with a key/value cache that outlives one call.

Notable features:
- Prefill in chunks of `prefill_step_size` tokens with a progress callback, evaluating the cache after
  each chunk so a long prompt never builds one huge graph, and never the logits of prompt tokens.
- Decode is pipelined as in mlx-lm: step t+1 is queued with `mx.async_eval` before token t is handed to
  the caller, so the host work of the caller (detokenizing, parsing, printing) overlaps the device's.
- `inject(ids)` forces tokens into the sequence (the thinking budget's early-stop text); the one step
  already queued is dropped, the cache stays consistent because the queued step only consumed tokens that
  are part of the sequence.
- On several Macs (`qwen_mlx.distributed`) the model carries a `link`: rank 0 shares each generation's
  start and a control word per token, the sampled token is rank 0's on every rank, and the other ranks run
  this same loop to mirror it.
- The caches, samplers and logits processors are mlx-lm's; this module owns only the loop, because the
  chat layer needs injection and a cache shared across turns, which mlx-lm's `generate_step` lacks.
The engine knows nothing about text: token ids only (tokenization and templates live in the chat layer).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from .distributed import END, INJECT, NEXT
from .errors import QwenMLXError
from .sampling import LogitsProcessor, Sampler

PREFILL_STEP_SIZE = 2048
KV_GROUP_SIZE = 64
# Release MLX's buffer cache this often while decoding (as mlx-lm does), so freed buffers return to the OS.
CLEAR_CACHE_EVERY = 256

# One stream for all generation work, as mlx-lm does, so other MLX work on the default stream doesn't
# interleave with a decode step. MLX streams belong to the thread that made them, so each thread that
# generates (the CLI's main thread, the chat app's engine thread) gets its own.
_thread_streams = threading.local()


def generation_stream() -> mx.Stream:
    stream = getattr(_thread_streams, "stream", None)
    if stream is None:
        stream = _thread_streams.stream = mx.new_stream(mx.default_device())
    return stream


def make_cache(model: nn.Module, kv_bits: int | None = None, kv_group_size: int = KV_GROUP_SIZE) -> list:
    """A fresh per-layer cache; `kv_bits` 4 or 8 stores keys and values quantized (less memory, long chats)."""
    if kv_bits is None:
        return [KVCache() for _ in model.layers]
    if kv_bits not in (4, 8):
        raise QwenMLXError(f"kv_bits={kv_bits} is not supported: use 4 or 8, or leave it unset for a float cache")
    head_dim = model.args.head_dim
    group_size = min(kv_group_size, head_dim)  # a group cannot span heads
    if group_size not in (32, 64, 128) or head_dim % group_size:
        raise QwenMLXError(f"kv_bits needs a head_dim divisible by 32; this model's is {head_dim}")
    return [QuantizedKVCache(group_size=group_size, bits=kv_bits) for _ in model.layers]


def cache_length(cache: list) -> int:
    return cache[0].offset if cache else 0


def trim_cache(cache: list, keep: int) -> None:
    """Forget everything after the first `keep` positions."""
    extra = cache_length(cache) - keep
    if extra > 0:
        for layer_cache in cache:
            layer_cache.trim(extra)


@dataclass
class Stats:
    """What one generation cost. Times in seconds, speeds in tokens per second, memory in bytes."""

    prefill_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory: int = 0
    finish_reason: str | None = None  # "stop" (an end token) or "length" (max_tokens); None while running


class Generation:
    """Iterate to get sampled token ids; the end token, if reached, is the last one yielded.

    `prompt_ids` are the tokens not yet in `cache` (the whole prompt for a fresh cache). After the loop the
    cache holds the prompt and every yielded token except possibly the last.
    """

    def __init__(
        self,
        model: nn.Module,
        prompt_ids: Sequence[int],
        cache: list | None = None,
        *,
        sampler: Sampler | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
        max_tokens: int = 256,
        end_ids: Sequence[int] = (),
        prefill_step_size: int = PREFILL_STEP_SIZE,
        on_prefill: Callable[[int, int], None] | None = None,
    ):
        if not prompt_ids:
            raise QwenMLXError("the prompt is empty: at least one new token is needed to generate from")
        if max_tokens < 0:
            raise QwenMLXError(f"max_tokens={max_tokens} is invalid: it must be >= 0")
        self.model = model
        self.prompt_ids = list(prompt_ids)
        self.cache = cache if cache is not None else make_cache(model)
        self.sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
        self.logits_processors = list(logits_processors)
        self.max_tokens = max_tokens
        self.end_ids = set(end_ids)
        self.prefill_step_size = prefill_step_size
        self.on_prefill = on_prefill
        self.tokens: list[int] = []  # everything yielded so far
        self.logprobs: mx.array | None = None  # log-probabilities the last sampled token was drawn from
        self.stats = Stats(prefill_tokens=len(self.prompt_ids))
        self._injected: list[int] = []
        self.link = getattr(model, "link", None)  # several Macs: the lockstep with the other ranks
        self._stopped_by_leader = False

    def inject(self, ids: Sequence[int]) -> None:
        """Force `ids` next: they are yielded in order, then sampling resumes after them."""
        self._injected.extend(ids)

    def _step(self, input_ids: mx.array, pending: bool = False) -> tuple[mx.array, mx.array]:
        """Feed `input_ids`; `pending` means they are a sampled token not yet in `self.tokens`."""
        with mx.stream(generation_stream()):
            logits = self.model(input_ids[None], cache=self.cache)[:, -1, :]
            if self.logits_processors:
                # The penalties see generated tokens only, up to and including the one just fed.
                history = mx.array(self.tokens, mx.int32)
                if pending:
                    history = mx.concatenate([history, input_ids.reshape(-1).astype(mx.int32)])
                for processor in self.logits_processors:
                    logits = processor(history, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            token = self.sampler(logprobs)
            if self.link is not None:
                token = self.link.agree(token)
            return token, logprobs.squeeze(0)

    def _prefill(self, ids: list[int]) -> tuple[mx.array, mx.array]:
        """Feed all of `ids`, in chunks, and queue the sampling of the token that follows.

        All but the last token go through the model with only the cache evaluated, so MLX never computes
        their logits (the head over 151,936 tokens, and the last layer's MLP); the last token is one step.
        """
        total, done = len(ids), 0
        while total - done > 1:
            n = min(self.prefill_step_size, total - done - 1)
            with mx.stream(generation_stream()):
                self.model(mx.array(ids[done : done + n])[None], cache=self.cache)
                self._wait(lambda: mx.eval([c.state for c in self.cache]))
            done += n
            if self.on_prefill:
                self.on_prefill(done, total)
            mx.clear_cache()
        return self._step(mx.array(ids[done:]))

    def __iter__(self) -> Iterator[int]:
        if self.link is None:
            yield from self._generate()
        elif self.link.leader:
            yield from self._lead()
        else:
            self._follow()

    def _lead(self) -> Iterator[int]:
        """Rank 0: tell the followers what to generate, then whether to go on after each token."""
        link = self.link
        if self.max_tokens == 0:
            self.stats.finish_reason = "length"
            return
        link.share({
            "op": "generate",
            "cache": id(self.cache),
            "kv_bits": getattr(self.cache[0], "bits", None) if self.cache else None,
            "keep": cache_length(self.cache),
            "prompt": self.prompt_ids,
            "max_tokens": self.max_tokens,
            "end_ids": sorted(self.end_ids),
            "prefill_step_size": self.prefill_step_size,
        })  # fmt: skip
        try:
            yield from self._generate()
        finally:  # an end token, max_tokens, or a consumer that stopped listening
            link.signal(END)

    def _follow(self) -> None:
        """Another rank: run the same steps on rank 0's tokens until rank 0 says stop."""
        for _ in self._generate():
            pass
        if not self._stopped_by_leader:  # an end token or max_tokens: rank 0's generator ended there too
            self.link.signal()

    def _wait(self, fn):
        """Block on the device; on several Macs the watchdog sees how long the other ranks take."""
        if self.link is None:
            return fn()
        with self.link.waiting():
            return fn()

    def _control(self, forced: list[int]) -> list[int] | None:
        """Between tokens on several Macs: rank 0 says go on (with any forced tokens) or stop (None)."""
        link = self.link
        if link is None:
            return forced
        if link.leader:
            if forced:
                link.signal(INJECT)
                link.share(forced)
            else:
                link.signal(NEXT)
            return forced
        code = link.signal()
        if code == NEXT:
            return []
        if code == INJECT:
            forced = list(link.share())
            self.tokens.extend(forced)
            return forced
        self._stopped_by_leader = True
        return None

    def _generate(self) -> Iterator[int]:
        start = time.perf_counter()
        mx.reset_peak_memory()
        if self.max_tokens == 0:
            self.stats.finish_reason = "length"
            return
        token, logprobs = self._prefill(self.prompt_ids)
        mx.async_eval(token, logprobs)
        first_token_at = None
        while True:
            next_token, next_logprobs = self._step(token, pending=True)
            mx.async_eval(next_token, next_logprobs)
            value = self._wait(token.item)
            if first_token_at is None:
                first_token_at = time.perf_counter()
                self.stats.ttft_s = first_token_at - start
                self.stats.prompt_tps = len(self.prompt_ids) / max(self.stats.ttft_s, 1e-9)
                if self.on_prefill:
                    self.on_prefill(len(self.prompt_ids), len(self.prompt_ids))
            self.tokens.append(value)
            self.logprobs = logprobs
            self._account(first_token_at)
            yield value
            if value in self.end_ids:
                self.stats.finish_reason = "stop"
                return
            if len(self.tokens) >= self.max_tokens:
                self.stats.finish_reason = "length"
                return
            # Forced tokens (`inject`): `token` is already in the cache (the queued step consumed it); its
            # prediction is dropped. Rank 0 yields them before telling the other ranks, who only feed them.
            forced, self._injected = self._injected, []
            for value in forced:
                self.tokens.append(value)
                self._account(first_token_at)
                yield value
                if len(self.tokens) >= self.max_tokens:
                    self.stats.finish_reason = "length"
                    return
            forced = self._control(forced)
            if forced is None:
                return
            if forced:
                next_token, next_logprobs = self._prefill(forced)
                mx.async_eval(next_token, next_logprobs)
            token, logprobs = next_token, next_logprobs
            if len(self.tokens) % CLEAR_CACHE_EVERY == 0:
                mx.clear_cache()

    def _account(self, first_token_at: float) -> None:
        self.stats.completion_tokens = len(self.tokens)
        elapsed = time.perf_counter() - first_token_at
        if len(self.tokens) > 1 and elapsed > 0:
            self.stats.generation_tps = (len(self.tokens) - 1) / elapsed
        self.stats.peak_memory = mx.get_peak_memory()
