"""The token engine: prompt ids in, sampled ids out, with a key/value cache that outlives one call.

Notable features:
- Prefill in chunks of `prefill_step_size` tokens with a progress callback, evaluating the cache after
  each chunk so a long prompt never builds one huge graph, and never the logits of prompt tokens.
- Decode is pipelined as in mlx-lm: step t+1 is queued with `mx.async_eval` before token t is handed to
  the caller, so the host work of the caller (detokenizing, parsing, printing) overlaps the device's.
- Logits processors get the same history as in mlx-lm's loops: every token of the sequence so far, the
  prompt (cached part included, as `history`) then the generated ones, kept on the device. So an mlx-lm
  processor works unchanged here, and the turn's guide (`qwen_mlx.guide`) counts from the prompt's end in
  this loop and in the server's batch alike. Nothing is injected from outside: a forced token is one
  the guide leaves as the only choice.
- The caches, samplers and logits processors are mlx-lm's; this module owns only the loop, because the
  chat layer needs a cache shared across turns and a lockstep hook, which mlx-lm's `generate_step` lacks.
- Several Macs: a `link` (any object with the `Lockstep` methods) keeps other processes in step; the
  engine knows nothing else about them.
- Speculative decoding (`drafter`, see `qwen_mlx.speculative`): a drafter proposes up to
  `num_draft_tokens` tokens, one target forward scores them all, and each position's token is drawn by
  the turn's own sampler from the processed logits; a draft is kept while it equals the draw, and the
  first draw that differs is the next token. Drafts are deterministic (a draft model's greedy tokens, or
  the prompt's own continuation), so this is exactly speculative sampling with a one-hot proposal
  (accept with p(d) = min(1, p/q), else draw from the residual p without d): the output distribution
  is the target's, and at temperature 0 the tokens are plain decoding's. Processors with state (the turn's
  guide) are snapshotted before each position and put back to the last kept one, and the cache is trimmed
  to the kept tokens, so rejections leave no trace. Tokens a processor will force next (a budget's
  early-stop text, a tool call's opening) are drafted first.
The engine knows nothing about text: token ids only (tokenization and templates live in the chat layer).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn

from .cache import cache_bits, cache_length, make_cache, trim_cache
from .errors import QwenMLXError
from .sampling import LogitsProcessor, Sampler

PREFILL_STEP_SIZE = 2048
# Tokens a drafter may propose per target pass (mlx-lm's default is 3; lookups often match longer runs).
DEFAULT_DRAFT_TOKENS = 4
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


class Drafter(Protocol):
    """Proposes the tokens likely to follow `sequence` (everything so far, its last token not yet fed)."""

    def propose(self, sequence: list[int], k: int) -> list[int]: ...


class Lockstep(Protocol):
    """What the loop asks of the processes that mirror it (see `qwen_mlx.distributed.link.Link`)."""

    leader: bool

    def start(self, job: dict) -> None: ...  # the leader tells the others what to generate
    def agree(self, token: mx.array) -> mx.array: ...  # the leader's token, on every process (lazily)
    def step(self) -> bool: ...  # between tokens: go on (True) or stop
    def finish(self) -> None: ...  # the generation ended (any way): the last word between them
    def waiting(self) -> contextlib.AbstractContextManager: ...  # around every wait on the device


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
    target_passes: int = 0  # forward passes of the model that produced the generated tokens
    draft_tokens: int = 0  # tokens a drafter proposed (speculative decoding)
    accepted_tokens: int = 0  # of those, the ones kept

    @property
    def acceptance(self) -> float | None:
        """The share of drafted tokens kept, None without speculation."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def passes_per_token(self) -> float:
        """Target forward passes per generated token: 1 for plain decoding, less when drafts are kept."""
        return self.target_passes / self.completion_tokens if self.completion_tokens else 0.0

    def count_speculation(self, other: Stats) -> None:
        """Take `other`'s pass and draft counts (a reader's stats from the engine's)."""
        self.target_passes, self.draft_tokens = other.target_passes, other.draft_tokens
        self.accepted_tokens = other.accepted_tokens

    def measure(self, started: float, first_token_at: float | None, now: float) -> None:
        """Times and speeds from when the work started, its first token came and now."""
        first = first_token_at if first_token_at is not None else now
        self.ttft_s = first - started
        self.prompt_tps = self.prefill_tokens / max(self.ttft_s, 1e-9)
        decode, later = now - first, self.completion_tokens - 1
        self.generation_tps = later / decode if later > 0 and decode > 0 else 0.0
        self.peak_memory = mx.get_peak_memory()


class Generation:
    """Iterate to get sampled token ids; the end token, if reached, is the last one yielded.

    `prompt_ids` are the tokens not yet in `cache` (the whole prompt for a fresh cache); `history` the
    tokens before them that the cache holds (what the logits processors see first). After the loop the
    cache holds the prompt and every yielded token except possibly the last.
    """

    def __init__(
        self,
        model: nn.Module,
        prompt_ids: Sequence[int],
        cache: list | None = None,
        *,
        history: Sequence[int] = (),
        sampler: Sampler | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
        max_tokens: int = 256,
        end_ids: Sequence[int] = (),
        prefill_step_size: int = PREFILL_STEP_SIZE,
        on_prefill: Callable[[int, int], None] | None = None,
        link: Lockstep | None = None,
        drafter: Drafter | None = None,
        num_draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    ):
        if not prompt_ids:
            raise QwenMLXError("the prompt is empty: at least one new token is needed to generate from")
        if max_tokens < 0:
            raise QwenMLXError(f"max_tokens={max_tokens} is invalid: it must be >= 0", param="max_tokens")
        self.model = model
        self.prompt_ids = list(prompt_ids)
        self.history = list(history)
        self.cache = cache if cache is not None else make_cache(model)
        self.sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
        self.logits_processors = list(logits_processors)
        self.max_tokens = max_tokens
        self.end_ids = set(end_ids)
        self.prefill_step_size = prefill_step_size
        self.on_prefill = on_prefill
        self.link = link
        if drafter is not None and link is not None:
            raise QwenMLXError("speculative decoding does not run across several Macs yet; drop the draft option")
        if drafter is not None and num_draft_tokens < 1:
            raise QwenMLXError(f"num_draft_tokens={num_draft_tokens} is invalid: it must be >= 1")
        self.drafter = drafter
        self.num_draft_tokens = num_draft_tokens
        self.tokens: list[int] = []  # everything yielded so far
        self.buffered = 0  # speculation: tokens of the last pass still to yield (0: the next one runs a pass)
        self.logprobs: mx.array | None = None  # log-probabilities the last sampled token was drawn from
        self.stats = Stats(prefill_tokens=len(self.prompt_ids))
        self._sequence: mx.array | None = None  # what the processors see: history, prompt, each sampled token

    def _step(self, input_ids: mx.array) -> tuple[mx.array, mx.array]:
        """Feed `input_ids` (prompt tokens, or the sampled token before it reached the host)."""
        with mx.stream(generation_stream()):
            logits = self.model(input_ids[None], cache=self.cache)[:, -1, :]
            if self.logits_processors:
                self._sequence = mx.concatenate([self._sequence, input_ids.reshape(-1).astype(mx.int32)])
                for processor in self.logits_processors:
                    logits = processor(self._sequence, logits)
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
        if self.logits_processors:
            self._sequence = mx.array(self.history + ids[:-1], mx.int32)
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

    def job(self) -> dict:
        """This generation as data, for the processes that mirror it (JSON, never pickle)."""
        return {
            "op": "generate",
            "cache": id(self.cache),
            "kv_bits": cache_bits(self.cache),
            "keep": cache_length(self.cache),
            "prompt": self.prompt_ids,
            "max_tokens": self.max_tokens,
            "end_ids": sorted(self.end_ids),
            "prefill_step_size": self.prefill_step_size,
        }

    def __iter__(self) -> Iterator[int]:
        link = self.link
        if link is None:
            yield from self._generate() if self.drafter is None else self._speculate()
            return
        if self.max_tokens == 0 and link.leader:  # nothing to mirror
            self.stats.finish_reason = "length"
            return
        if link.leader:
            link.start(self.job())
        try:
            if link.leader:
                yield from self._generate()
            else:  # mirror the leader's steps, yielding nothing
                for _ in self._generate():
                    pass
        finally:  # an end token, max_tokens, or a consumer that stopped listening
            link.finish()

    def _wait(self, fn):
        """Block on the device; on several Macs the link sees how long the other processes take."""
        if self.link is None:
            return fn()
        with self.link.waiting():
            return fn()

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
            self.stats.target_passes += 1
            next_token, next_logprobs = self._step(token)
            mx.async_eval(next_token, next_logprobs)
            value = self._wait(token.item)
            if first_token_at is None:
                first_token_at = time.perf_counter()
                if self.on_prefill:
                    self.on_prefill(len(self.prompt_ids), len(self.prompt_ids))
            self.tokens.append(value)
            self.logprobs = logprobs
            self.stats.completion_tokens = len(self.tokens)
            self.stats.measure(start, first_token_at, time.perf_counter())
            yield value
            if value in self.end_ids:
                self.stats.finish_reason = "stop"
                return
            if len(self.tokens) >= self.max_tokens:
                self.stats.finish_reason = "length"
                return
            if self.link is not None and not self.link.step():
                return
            token, logprobs = next_token, next_logprobs
            if len(self.tokens) % CLEAR_CACHE_EVERY == 0:
                mx.clear_cache()

    def _speculate(self) -> Iterator[int]:
        """`_generate` with drafts: each target pass scores the last token and up to `num_draft_tokens`
        proposed ones (see the module docstring). Not pipelined: what to draft next depends on the draws."""
        start = time.perf_counter()
        mx.reset_peak_memory()
        if self.max_tokens == 0:
            self.stats.finish_reason = "length"
            return
        stats = self.stats
        stateful = [p for p in self.logits_processors if hasattr(p, "snapshot")]
        base = len(self.history) + len(self.prompt_ids)  # the cache's length before the first generated token
        token, logprobs = self._prefill(self.prompt_ids)
        stats.target_passes += 1
        emitted, row_logprobs, drafts = [token.item()], [logprobs], []
        sequence = [*self.history, *self.prompt_ids]
        first_token_at = None
        try:
            while True:
                for j, (value, value_logprobs) in enumerate(zip(emitted, row_logprobs, strict=True)):
                    stats.accepted_tokens += j < len(emitted) - 1  # a kept draft (the last is the pass's draw)
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                        if self.on_prefill:
                            self.on_prefill(len(self.prompt_ids), len(self.prompt_ids))
                    self.tokens.append(value)
                    self.logprobs = value_logprobs
                    self.buffered = len(emitted) - j - 1
                    stats.completion_tokens = len(self.tokens)
                    stats.measure(start, first_token_at, time.perf_counter())
                    yield value
                    if value in self.end_ids or len(self.tokens) >= self.max_tokens:
                        stats.finish_reason = "stop" if value in self.end_ids else "length"
                        stats.draft_tokens -= max(0, len(drafts) - j - 1)  # drafts past the end were not needed
                        return
                sequence.extend(emitted)
                room = min(self.num_draft_tokens, self.max_tokens - len(self.tokens) - 1)
                drafts = self._drafts(sequence, room, stateful) if room > 0 else []
                emitted, row_logprobs = self._verify(sequence[-1], drafts, stateful)
                stats.target_passes += 1
                stats.draft_tokens += len(drafts)
                if len(self.tokens) % CLEAR_CACHE_EVERY < len(emitted):
                    mx.clear_cache()
        finally:  # a consumer that stopped early must not leave kept drafts it never saw in the cache
            trim_cache(self.cache, base + len(self.tokens))

    def _drafts(self, sequence: list[int], room: int, stateful: list) -> list[int]:
        """Up to `room` tokens to verify: those a processor will force next, then the drafter's."""
        forced = []
        for processor in stateful:
            forced = list(getattr(processor, "forced_next", lambda: [])())[:room] or forced
        if len(forced) >= room:
            return forced[:room]
        proposed = self.drafter.propose(sequence + forced, room - len(forced))[: room - len(forced)]
        if not forced:  # a guide's grammar cuts the drafts at the first token it forbids
            for processor in stateful:
                if admitted := getattr(processor, "admitted", None):
                    proposed = proposed[: admitted(sequence[-1], proposed)]
        return forced + proposed

    def _verify(self, last: int, drafts: list[int], stateful: list) -> tuple[list[int], list[mx.array]]:
        """One target pass over `last` and `drafts`: the kept drafts and the draw after them, with the
        log-probabilities each was drawn from. The cache and the processors end at the last kept token."""
        inputs = mx.array([last, *drafts], mx.int32)
        snapshots, draws, rows = [], [], []
        with mx.stream(generation_stream()):
            logits = self.model(inputs[None], cache=self.cache)[0]  # (1 + len(drafts), vocab)
            for i in range(len(drafts) + 1):
                row = logits[i : i + 1]
                if self.logits_processors:
                    snapshots.append([p.snapshot() for p in stateful])
                    self._sequence = mx.concatenate([self._sequence, inputs[i : i + 1]])
                    for processor in self.logits_processors:
                        row = processor(self._sequence, row)
                row = row - mx.logsumexp(row, axis=-1, keepdims=True)
                draws.append(self.sampler(row))
                rows.append(row.squeeze(0))
        values = self._wait(mx.concatenate([d.reshape(-1) for d in draws]).tolist)
        kept = 0
        while kept < len(drafts) and values[kept] == drafts[kept]:
            kept += 1
        rejected = len(drafts) - kept
        if rejected:
            trim_cache(self.cache, cache_length(self.cache) - rejected)
            if self.logits_processors:
                self._sequence = self._sequence[: self._sequence.size - rejected]
                for processor, state in zip(stateful, snapshots[kept + 1], strict=True):
                    processor.restore(state)
        return [*drafts[:kept], values[kept]], rows[: kept + 1]
