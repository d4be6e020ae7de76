"""Sampling settings: what the user asked for, else the checkpoint's, else Qwen3's recommendations.

Design decisions:
- The samplers and logits processors are mlx-lm's (`make_sampler`, `make_logits_processors`): compiled,
  tested, and what mlx-lm users already know. This module only decides the numbers and checks them.
- Precedence per field: an explicit value, then the checkpoint's `generation_config.json`, then Qwen3's
  model-card recommendation for the mode (thinking 0.6/0.95/20/0, non-thinking 0.7/0.8/20/0).
- Presence and frequency penalties count the generated tokens only (as OpenAI and vLLM do), so a long
  system prompt does not penalise the words of the answer.
- `temperature` 0 means greedy decoding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import mlx.core as mx

from .errors import QwenMLXError
from .mlxlm import submodule

_mlx_lm = submodule("sample_utils")
apply_min_p, apply_top_k, apply_top_p = _mlx_lm.apply_min_p, _mlx_lm.apply_top_k, _mlx_lm.apply_top_p
make_logits_processors, make_sampler = _mlx_lm.make_logits_processors, _mlx_lm.make_sampler

THINKING_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
NON_THINKING_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}
# How many recent tokens the repetition, presence and frequency penalties look at.
PENALTY_CONTEXT = 4096

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

MIN_REPETITION_PENALTY = 0.01


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; `None` means "not set": `resolve` fills it from the checkpoint or the mode."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None

    def resolve(self, generation_config: dict | None = None, thinking: bool = True) -> Sampling:
        """Fill unset fields from `generation_config.json`, then from Qwen3's recommendation for the mode."""
        generation_config = generation_config or {}
        recommended = THINKING_DEFAULTS if thinking else NON_THINKING_DEFAULTS
        filled = {}
        for name, default in recommended.items():
            value = getattr(self, name)
            if value is None:
                value = generation_config.get(name)
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    value = default
            filled[name] = value
        resolved = replace(self, **filled)
        resolved.check()
        return resolved

    def check(self) -> None:
        """Refuse out-of-range values, naming the field."""

        def bad(name: str, rule: str):
            raise QwenMLXError(f"sampling option {name}={getattr(self, name)!r} is invalid: it must be {rule}")

        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                bad(f.name, "a finite number")
        if self.temperature is not None and not 0 <= self.temperature <= 100:
            bad("temperature", "between 0 and 100")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1]")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            bad("top_k", "a whole number >= 0 (0 turns it off)")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            bad("min_p", "between 0 and 1")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, "between -2 and 2")
        # mlx-lm divides (or multiplies) logits by it: below 0.01 they overflow to inf and sampling yields NaN.
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= 10:
            bad("repetition_penalty", f"between {MIN_REPETITION_PENALTY} and 10 (1 turns it off)")
        if self.logit_bias is not None:
            for token, bias in self.logit_bias.items():
                if not isinstance(token, int) or token < 0 or not -100 <= bias <= 100:
                    bad("logit_bias", "a map of token ids to biases between -100 and 100")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad("seed", "a whole number >= 0")

    def sampler(self, vocab_size: int) -> Sampler:
        """mlx-lm's filters and draw for these settings (call on a resolved `Sampling`).

        With a `seed` the draws come from the sampler's own random key, so a seeded request repeats
        exactly even while other requests sample in the same batch.
        """
        if not self.temperature:
            return lambda logprobs: mx.argmax(logprobs, axis=-1)
        top_p = self.top_p if self.top_p is not None and self.top_p < 1 else 0.0
        top_k = self.top_k if self.top_k and self.top_k < vocab_size else 0  # the whole vocabulary: no filter
        if self.seed is None:
            return make_sampler(temp=self.temperature, top_p=top_p, min_p=self.min_p or 0.0, top_k=top_k)
        filters = []
        if top_p:
            filters.append(lambda x: apply_top_p(x, top_p))
        if self.min_p:
            filters.append(lambda x: apply_min_p(x, self.min_p))
        if top_k:
            filters.append(lambda x: apply_top_k(x, top_k))
        scale = 1.0 / self.temperature
        state = {"key": None}  # made on first use, on the thread that samples

        def seeded(logprobs: mx.array) -> mx.array:
            for keep in filters:
                logprobs = keep(logprobs)
            if state["key"] is None:
                state["key"] = mx.random.key(self.seed)
            state["key"], key = mx.random.split(state["key"])
            return mx.random.categorical(logprobs * scale, key=key)

        return seeded

    def logits_processors(self, vocab_size: int) -> list[LogitsProcessor]:
        if self.logit_bias:
            too_large = [t for t in self.logit_bias if t >= vocab_size]
            if too_large:
                raise QwenMLXError(f"logit_bias names token {too_large[0]}, outside the vocabulary of {vocab_size}")
        return make_logits_processors(
            logit_bias=self.logit_bias or None,
            repetition_penalty=self.repetition_penalty if self.repetition_penalty != 1.0 else None,
            repetition_context_size=PENALTY_CONTEXT,
            presence_penalty=self.presence_penalty or None,
            presence_context_size=PENALTY_CONTEXT,
            frequency_penalty=self.frequency_penalty or None,
            frequency_context_size=PENALTY_CONTEXT,
        )
