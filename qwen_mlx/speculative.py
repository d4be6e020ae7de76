"""Drafters for speculative decoding: a smaller model of the same family, or the prompt itself.

The engine (`Generation(..., drafter=...)`) verifies what a drafter proposes; a drafter only guesses, so a
bad guess costs time, never correctness.

Design decisions:
- Drafts are deterministic (a draft model's greedy tokens, the text that followed an earlier match), so the
  engine's accept-while-equal rule is exact speculative sampling with a one-hot proposal.
- `DraftModel` keeps its own KV cache across calls and turns, trimmed to the longest prefix it shares with
  the sequence it is asked about, as the chat session does for the target; it drafts on the engine's
  generation stream.
- `PromptLookup` (n-gram drafting, as llama.cpp's lookup decoding and vLLM's `ngram` method): the last
  `MAX_NGRAM` .. `MIN_NGRAM` tokens are looked up among earlier positions of the prompt and the reply, and
  the tokens that followed the most recent match are the draft. An index of every n-gram's latest
  position is kept up to date as the sequence grows, so a lookup is a dictionary read, not a scan; when
  nothing matches it proposes nothing and the step is a plain one.
Written here because mlx-lm's `speculative_generate_step` is its own loop (no shared cache across turns,
no processors with state, no prompt lookup); the verification lives in `qwen_mlx.engine`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache import common_prefix, make_cache, trim_cache
from .errors import QwenMLXError

# The n-gram sizes prompt lookup tries, longest first; a single token matches too often to be worth a pass.
MAX_NGRAM = 3
MIN_NGRAM = 2
LOOKUP = "lookup"  # the drafter option for prompt lookup
# A draft model's prompt goes through it in chunks of this many tokens, as the target's does.
DRAFT_PREFILL_STEP = 2048


class PromptLookup:
    """Drafts the continuation of the latest earlier occurrence of the sequence's last n tokens."""

    def __init__(self, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
        if not 1 <= min_ngram <= max_ngram:
            raise QwenMLXError(f"prompt lookup n-grams {min_ngram}..{max_ngram} are invalid: need 1 <= min <= max")
        self.sizes = range(max_ngram, min_ngram - 1, -1)
        self._seen: list[int] = []  # the sequence indexed so far
        self._latest: dict[tuple[int, ...], int] = {}  # n-gram -> the latest position just after it

    def propose(self, sequence: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        self._index(sequence)
        for n in self.sizes:
            if len(sequence) > n:
                after = self._latest.get(tuple(sequence[-n:]))
                if after is not None:
                    return sequence[after : after + k]
        return []

    def _index(self, sequence: list[int]) -> None:
        seen = self._seen
        if len(seen) > len(sequence) or sequence[len(seen) - 1 : len(seen)] != seen[-1:]:
            self._seen, self._latest = [], {}  # another sequence (a new turn): index it afresh
            seen = self._seen
        # Each n-gram that has a token after it in `sequence` (the last one has none yet).
        for end in range(max(len(seen), 1), len(sequence)):
            for n in self.sizes:
                if end >= n:
                    self._latest[tuple(sequence[end - n : end])] = end
        self._seen = list(sequence)


class DraftModel:
    """A smaller model with the target's tokenizer, drafting greedily from its own cache."""

    def __init__(self, model: nn.Module, target_vocab_size: int | None = None, kv_bits: int | None = None):
        vocab = model.args.vocab_size
        if target_vocab_size is not None and vocab != target_vocab_size:
            raise QwenMLXError(
                f"the draft model has a vocabulary of {vocab} tokens and the target {target_vocab_size}: "
                "draft with a model of the same family (Qwen3-0.6B for any Qwen3)"
            )
        self.model = model
        self.kv_bits = kv_bits
        self.reset()

    def reset(self) -> None:
        self.cache = make_cache(self.model, self.kv_bits)
        self.cached_ids: list[int] = []

    def propose(self, sequence: list[int], k: int) -> list[int]:
        from .engine import generation_stream  # the engine imports nothing of this module's at load

        if k <= 0 or not sequence:
            return []
        keep = min(common_prefix(self.cached_ids, sequence), len(sequence) - 1)
        trim_cache(self.cache, keep)
        new = sequence[keep:]
        drafts = []
        with mx.stream(generation_stream()):
            for start in range(0, len(new) - 1, DRAFT_PREFILL_STEP):
                chunk = new[start : min(start + DRAFT_PREFILL_STEP, len(new) - 1)]
                self.model(mx.array(chunk)[None], cache=self.cache)
                mx.eval([c.state for c in self.cache])
            x = mx.array(new[-1:])
            for _ in range(k):
                x = mx.argmax(self.model(x[None], cache=self.cache)[:, -1, :], axis=-1)  # (1,)
                drafts.append(x)
            values = mx.concatenate(drafts).tolist()
        self.cached_ids = [*sequence, *values[:-1]]  # the last draft was never fed
        return values


def load_draft(
    name: str, target_vocab_size: int, target_tokenizer=None, *, kv_bits: int | None = None, **load_options
) -> DraftModel:
    """A draft model from a folder, Hub repo id or `demo`, checked against the target's vocabulary (and,
    given the target's `Tokenizer`, that the two tokenizers map text to the same ids)."""
    from .loader import load_model
    from .tokenizer import Tokenizer

    loaded = load_model(name, **load_options)
    if target_tokenizer is not None:
        draft_vocab = Tokenizer.load(loaded.path)._tokenizer.get_vocab(with_added_tokens=True)
        if draft_vocab != target_tokenizer._tokenizer.get_vocab(with_added_tokens=True):
            raise QwenMLXError(
                f"the draft model {name} has another tokenizer than the target: its drafts would be other "
                "tokens; draft with a model of the same family (Qwen3-0.6B for any Qwen3)"
            )
    return DraftModel(loaded.model, target_vocab_size, kv_bits)


def draft_option(draft_model: str | None, prompt_lookup: bool, num_draft_tokens: int) -> str | None:
    """A command's `--draft-model M` / `--prompt-lookup` / `--num-draft-tokens K` as a `draft` option,
    checked before any model loads."""
    if num_draft_tokens < 1:
        raise QwenMLXError(f"--num-draft-tokens {num_draft_tokens} is invalid: it must be at least 1")
    if draft_model and prompt_lookup:
        raise QwenMLXError("--draft-model and --prompt-lookup are two ways to draft: choose one")
    return LOOKUP if prompt_lookup else draft_model


def drafter(draft: str | None, model: nn.Module, tokenizer, *, kv_bits: int | None = None) -> DraftModel | str | None:
    """What `ChatSession(draft=...)` takes, from a command's option: None, `"lookup"`, or a draft model's name."""
    if draft is None or draft == LOOKUP:
        return draft
    return load_draft(draft, model.args.vocab_size, tokenizer, kv_bits=kv_bits)
