"""One timed run of each side: raw generation from prompt ids (plain or speculative), and one turn of a
full-history conversation; and the demo model's speculative work counts, which need no clock.

Design decisions:
- One host clock for both sides: TTFT is the time from the call to the first token handed to the caller,
  decode speed is (tokens - 1) / (time from the first token to the last); the libraries' own figures are
  kept beside ours in the raw data but never compared. A speculative pass hands over several tokens at
  once, so decode counts from the last token of the first pass (mlx-lm's first pass already verifies
  drafts, ours is the prefill's), and `total_s` (call to last token) compares the whole of the work.
- Raw generation is qwen_mlx's `Generation` against mlx-lm's `stream_generate` on the same prompt ids,
  both greedy (the same `argmax` sampler) and both with a fresh cache of mlx-lm's `KVCache`s.
- End tokens are switched off on both sides, so a random-weight model runs to `max_tokens` on each (in
  the conversation our `ChatSession` keeps them, since its turn guide needs them; greedy random weights
  do not pick one).
- Peak memory counts one model: MLX's peak during the run, less the memory already in use when it
  started (both loaded models), plus the bytes of that side's own weights; both sides load eagerly.
- Speculative runs count their work the same way on both sides: target passes (forward passes of the
  target that produced generated tokens; the prompt's chunks before its last token are not counted),
  drafts proposed and drafts kept. Ours come from `Generation.stats`; mlx-lm's are read back from its
  `from_draft` flags (`mlx_lm_work`), since each pass of its `speculative_generate_step` yields its kept
  drafts (`from_draft`) and then its own draw. Every run gets a fresh drafter, so no run reuses the draft
  cache of the one before.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_flatten
from mlx_lm.generate import speculative_generate_step, stream_generate
from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache

import qwen_mlx
from qwen_mlx.cache import make_cache
from qwen_mlx.chat import ChatSession, Done
from qwen_mlx.demo import SCRIPTS, ensure_demo, script_ids
from qwen_mlx.engine import DEFAULT_DRAFT_TOKENS, Drafter, Generation
from qwen_mlx.sampling import Sampling
from qwen_mlx.speculative import DraftModel, PromptLookup
from qwen_mlx.tokenizer import Tokenizer

OURS = "qwen_mlx"
MLX_LM = "mlx-lm"
MLX_LM_CACHED = "mlx-lm + prompt cache"
OURS_DRAFT = f"{OURS} + draft"
MLX_LM_DRAFT = f"{MLX_LM} + draft"
OURS_LOOKUP = f"{OURS} + lookup"
GREEDY = Sampling(temperature=0)
# Kept from each run to check both sides generate the same tokens from the same weights.
KEPT_TOKENS = 16
# The work counts' cap: the demo and the repeater answer their scripts as trained, then their end token.
DEMO_MAX_TOKENS = 256


@dataclass
class Run:
    side: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    decode_s: float  # from the first pass's last token to the last token
    peak_memory: int  # bytes: this side's weights plus what the run added
    tokens: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    reported: dict[str, Any] = field(default_factory=dict)  # the library's own numbers
    target_passes: int = 0
    draft_tokens: int = 0  # drafts proposed
    accepted_tokens: int = 0  # drafts kept
    first_pass_tokens: int = 1  # tokens the first target pass handed over (more than 1: kept drafts)
    total_s: float = 0.0  # from the call to the last token

    @property
    def prefill_tps(self) -> float:
        return (self.prompt_tokens - self.cached_tokens) / self.ttft_s

    @property
    def decode_tps(self) -> float:
        later = self.completion_tokens - self.first_pass_tokens
        return later / self.decode_s if self.decode_s > 0 and later > 0 else float("nan")

    @property
    def acceptance(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def passes_per_token(self) -> float:
        return self.target_passes / self.completion_tokens if self.completion_tokens else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "prefill_tps": self.prefill_tps,
            "decode_tps": self.decode_tps,
            "acceptance": self.acceptance,
            "passes_per_token": self.passes_per_token,
        }


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
        self.times: list[float] = []  # when each token was handed over (`token`)
        self.t0 = time.perf_counter()

    def token(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.times.append(now)

    def run(
        self,
        side: str,
        prompt_tokens: int,
        tokens: list[int],
        keep: int | None = KEPT_TOKENS,
        first_pass_tokens: int = 1,
        **extra,
    ) -> Run:
        """`keep`: how many of the tokens the run keeps (None: all)."""
        first_pass_end = self.times[first_pass_tokens - 1] if first_pass_tokens > 1 else self.first
        return Run(
            side=side,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(tokens),
            ttft_s=self.first - self.t0,
            decode_s=self.last - first_pass_end,
            first_pass_tokens=first_pass_tokens,
            total_s=self.last - self.t0,
            peak_memory=self.weights + max(0, mx.get_peak_memory() - self.base),
            tokens=tokens[:keep],
            **extra,
        )


def no_end_tokens(mlx_lm_tokenizer) -> None:
    mlx_lm_tokenizer.eos_token_ids = set()


def generate_ours(
    model,
    prompt_ids: list[int],
    max_tokens: int,
    prefill_step_size: int,
    *,
    drafter: Drafter | None = None,
    num_draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    side: str = OURS,
    keep: int | None = KEPT_TOKENS,
) -> Run:
    clock = Clock()
    clock.start(weights_nbytes(model))
    generation = Generation(
        model,
        prompt_ids,
        make_cache(model),
        max_tokens=max_tokens,
        prefill_step_size=prefill_step_size,
        drafter=drafter,
        num_draft_tokens=num_draft_tokens,
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
    return clock.run(
        side,
        len(prompt_ids),
        tokens,
        keep,
        reported=reported,
        target_passes=stats.target_passes,
        draft_tokens=stats.draft_tokens,
        accepted_tokens=stats.accepted_tokens,
    )


def mlx_lm_work(from_draft: list[bool], num_draft_tokens: int, max_tokens: int) -> tuple[int, int, int]:
    """(target passes, drafts proposed, drafts kept) of an mlx-lm run, from each token's `from_draft`.

    Each pass of `speculative_generate_step` drafts min(max_tokens - tokens so far, k) tokens, yields the
    kept ones (`from_draft`) and then its own draw (not `from_draft`, absent when max_tokens ends the run
    on a kept draft). As `Generation` counts it, the last pass's drafts past the last token are not
    counted. Plain decoding (k = 0) is one pass per token.
    """
    passes = proposed = accepted = 0
    start = 0
    while start < len(from_draft):
        passes += 1
        drafted = min(max_tokens - start, num_draft_tokens)
        end = start
        while end < len(from_draft) and from_draft[end]:
            end += 1
        kept = end - start
        group = min(kept + 1, len(from_draft) - start)  # the kept drafts and the pass's draw, if yielded
        proposed += drafted if start + group < len(from_draft) else min(group, drafted)
        accepted += kept
        start += group
    return passes, proposed, accepted


def generate_mlx_lm(
    model,
    tokenizer,
    prompt_ids: list[int],
    max_tokens: int,
    prefill_step_size: int,
    *,
    draft_model=None,
    num_draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    side: str = MLX_LM,
    keep: int | None = KEPT_TOKENS,
) -> Run:
    """mlx-lm's `stream_generate`, speculative (its `speculative_generate_step`) when given a draft model."""
    speculative = {"draft_model": draft_model, "num_draft_tokens": num_draft_tokens} if draft_model else {}
    clock = Clock()
    clock.start(weights_nbytes(model))
    tokens, from_draft, last = [], [], None
    for last in stream_generate(
        model, tokenizer, prompt_ids, max_tokens=max_tokens, prefill_step_size=prefill_step_size, **speculative
    ):
        clock.token()
        tokens.append(last.token)
        from_draft.append(bool(last.from_draft))
    reported = {
        "prompt_tps": last.prompt_tps,
        "generation_tps": last.generation_tps,
        "peak_memory": int(last.peak_memory * 1e9),
    }
    passes, proposed, accepted = mlx_lm_work(from_draft, num_draft_tokens if draft_model else 0, max_tokens)
    first_pass = next((i + 1 for i, drafted in enumerate(from_draft) if not drafted), len(from_draft))
    return clock.run(
        side,
        len(prompt_ids),
        tokens,
        keep,
        first_pass,
        reported=reported,
        target_passes=passes,
        draft_tokens=proposed,
        accepted_tokens=accepted,
    )


def mlx_lm_speculative_tokens(
    model, draft_model, prompt_ids: list[int], max_tokens: int, num_draft_tokens: int, end_ids: set[int]
) -> tuple[list[int], list[bool]]:
    """mlx-lm's speculative tokens up to and including an end token, with their `from_draft` flags.

    `speculative_generate_step` itself, not `stream_generate`: the latter drops the end token, and with it
    the flag that says whether the pass that produced it was a draft's.
    """
    tokens, from_draft = [], []
    steps = speculative_generate_step(
        mx.array(prompt_ids), model, draft_model, num_draft_tokens=num_draft_tokens, max_tokens=max_tokens
    )
    for token, _, drafted in steps:
        tokens.append(int(token))
        from_draft.append(bool(drafted))
        if token in end_ids:
            break
    steps.close()  # its `finally` trims the caches it made
    return tokens, from_draft


def demo_work_counts(num_draft_tokens: int, log) -> dict[str, Any]:
    """Models that do repeat their input, drafting for themselves and by prompt lookup on their own scripts:
    passes and drafts kept (no timing: these counts are the same on any machine). The demo answers a
    question (natural); the repeater, the demo's shape taught one edit, answers with its input (repetitive)."""
    from checkpoints import EDIT_SCRIPT, ensure_repeater  # the bench's own module, beside this one

    scripts = {s["name"]: s for s in SCRIPTS}
    models = (
        (ensure_demo(log), [("natural (thinking_long)", scripts["thinking_long"])]),
        (ensure_repeater(log=log), [("repetitive (edit_code)", EDIT_SCRIPT)]),
    )
    k, prompts = num_draft_tokens, []
    for path, cases in models:
        ours, tokenizer = qwen_mlx.load(path), Tokenizer.load(path)
        mlx_model, _ = mlx_lm.load(str(path))
        end_ids = set(tokenizer.end_token_ids)
        for name, script in cases:
            prompt, _ = script_ids(tokenizer, script)
            sides = {}
            for side, drafter in ((OURS, None), (OURS_DRAFT, DraftModel(ours)), (OURS_LOOKUP, PromptLookup())):
                generation = Generation(
                    ours, prompt, max_tokens=DEMO_MAX_TOKENS, end_ids=end_ids, drafter=drafter, num_draft_tokens=k
                )
                tokens = list(generation)
                stats = generation.stats
                sides[side] = {"tokens": tokens, "target_passes": stats.target_passes}
                sides[side].update(draft_tokens=stats.draft_tokens, accepted_tokens=stats.accepted_tokens)
            tokens, from_draft = mlx_lm_speculative_tokens(mlx_model, mlx_model, prompt, DEMO_MAX_TOKENS, k, end_ids)
            passes, proposed, accepted = mlx_lm_work(from_draft, k, DEMO_MAX_TOKENS)
            sides[MLX_LM_DRAFT] = {"tokens": tokens, "target_passes": passes}
            sides[MLX_LM_DRAFT].update(draft_tokens=proposed, accepted_tokens=accepted)
            for side, s in sides.items():
                s.update(
                    completion_tokens=len(s["tokens"]),
                    acceptance=s["accepted_tokens"] / s["draft_tokens"] if s["draft_tokens"] else None,
                    passes_per_token=s["target_passes"] / len(s["tokens"]),
                    same_tokens=s["tokens"] == sides[OURS]["tokens"] if side != OURS else None,
                )
            log(
                f"  {path.name} {name}: "
                + ", ".join(f"{side} {s['passes_per_token']:.2f} p/t" for side, s in sides.items())
            )
            prompts.append({"name": name, "checkpoint": str(path), "prompt_tokens": len(prompt), "sides": sides})
        del ours, mlx_model
        gc.collect()
        mx.clear_cache()
    label = " and ".join(path.name for path, _ in models)
    return {"label": label, "max_tokens": DEMO_MAX_TOKENS, "prompts": prompts}


class OursChat:
    """qwen_mlx's `ChatSession`: one cache across turns, trimmed back to the common prefix."""

    side = OURS

    def __init__(self, model, tokenizer):
        # End ids stay: the turn's guide needs them. A random-weight model's greedy turn never picks one here
        # (the run counts what it made either way); mlx-lm's side has them off, as in the raw runs.
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
