"""The turn pipeline's own rules, on the real Qwen3 tokenizer (no model): what it refuses, what it reports."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import pytest
from fixtures import VOCAB_SIZE, tokenizer_dir

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.sampling import Sampling
from qwen_mlx.tokenizer import Tokenizer
from qwen_mlx.turn import UNLIKELY_LOGPROB, TurnOptions, Turns


@pytest.fixture(scope="module")
def turns() -> Turns:
    return Turns(Tokenizer.load(tokenizer_dir()), VOCAB_SIZE, 40960)


def test_logprobs_of_ruled_out_tokens_are_finite_json(turns):
    """A forced token leaves every other logit at -inf; JSON has no -Infinity, so those are -9999.0."""
    plan = turns.plan_text("Hello", TurnOptions(top_logprobs=3))
    reader = turns.reader(plan)
    token = turns.tokenizer.encode(" world")[0]
    logprobs = mx.where(mx.arange(VOCAB_SIZE) == token, 0.0, -mx.inf)  # only `token` can be drawn (log 1 = 0)
    entry = reader.logprob(token, logprobs)
    assert entry.logprob == 0.0 and entry.top[0][0] == " world"
    values = [entry.logprob, *(value for _, value, _ in entry.top)]
    assert all(math.isfinite(v) for v in values) and UNLIKELY_LOGPROB in values
    json.dumps(values, allow_nan=False)  # what a strict JSON encoder accepts


@pytest.mark.parametrize("penalty", [1e-300, 0.0, 11.0, float("nan")])
def test_a_repetition_penalty_that_would_overflow_the_logits_is_refused(turns, penalty):
    with pytest.raises(QwenMLXError, match="repetition_penalty"):
        turns.plan([{"role": "user", "content": "Hi"}], TurnOptions(sampling=Sampling(repetition_penalty=penalty)))
