"""`TurnGuide`, the one place a turn is steered, stepped by hand on the real Qwen3 tokenizer (no model).

Each step hands the guide the sequence so far and flat logits, as the engine does; a step that forces a
token leaves exactly one finite logit, so the test reads what the guide decided without sampling.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from fixtures import VOCAB_SIZE, tokenizer_dir

from qwen_mlx.format import THINKING_BUDGET_TEXT, SpecialIds
from qwen_mlx.guide import TurnGuide
from qwen_mlx.sampling import Sampling
from qwen_mlx.tokenizer import Tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(tokenizer_dir())


@pytest.fixture(scope="module")
def special(tokenizer) -> SpecialIds:
    return SpecialIds.of(tokenizer)


def prompt(tokenizer: Tokenizer, enable_thinking: bool = True) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, enable_thinking=enable_thinking
    )
    return tokenizer.encode(text)


class Stepper:
    """Drives one guide: `step(token)` appends a token the 'model' chose and returns the next step's logits."""

    def __init__(self, guide: TurnGuide, prompt_ids: list[int]):
        self.guide = guide
        self.sequence = list(prompt_ids)

    def logits(self, bias: dict[int, float] | None = None) -> np.ndarray:
        raw = np.zeros((1, VOCAB_SIZE), np.float32)
        for token, value in (bias or {}).items():
            raw[0, token] = value
        out = self.guide(mx.array(self.sequence, mx.int32), mx.array(raw))
        return np.array(out[0])

    def forced(self) -> int | None:
        """The one token this step allows, or None when the step leaves a choice."""
        finite = np.flatnonzero(np.isfinite(self.logits()))
        return int(finite[0]) if finite.size == 1 else None

    def feed(self, *tokens: int) -> None:
        self.sequence.extend(tokens)

    def follow(self, bias: dict[int, float], limit: int = 100) -> list[int]:
        """Take the highest logit (`bias` added) step after step, up to an end token."""
        taken = []
        for _ in range(limit):
            logits = self.logits(bias)
            token = int(np.argmax(logits))
            taken.append(token)
            self.feed(token)
            if token in self.guide.tokenizer.end_token_ids:
                break
        return taken


def test_budget_forces_the_early_stop_text_after_n_thinking_tokens(tokenizer, special):
    ids = prompt(tokenizer)
    steps = Stepper(TurnGuide(tokenizer, VOCAB_SIZE, ids, budget=3), ids)
    assert steps.forced() is None  # nothing yet: the model may open <think>
    word = tokenizer.encode(" so")[0]
    steps.feed(special.think_start)
    for _ in range(3):
        assert steps.forced() is None
        steps.feed(word)
    forced = []
    while (token := steps.forced()) is not None:
        forced.append(token)
        steps.feed(token)
    assert tokenizer.decode(forced) == THINKING_BUDGET_TEXT and special.think_end in forced
    steps.feed(word)  # the answer is the model's own again, with no second cut
    assert steps.forced() is None


def test_budget_zero_cuts_right_after_think(tokenizer, special):
    ids = prompt(tokenizer)
    steps = Stepper(TurnGuide(tokenizer, VOCAB_SIZE, ids, budget=0), ids)
    steps.feed(special.think_start)
    assert steps.forced() == tokenizer.encode(THINKING_BUDGET_TEXT)[0]


def test_end_thinking_now_forces_the_same_text_at_the_next_step(tokenizer, special):
    ids = prompt(tokenizer)
    guide = TurnGuide(tokenizer, VOCAB_SIZE, ids)
    steps = Stepper(guide, ids)
    steps.feed(special.think_start, *tokenizer.encode(" Let me think"))
    assert steps.forced() is None
    guide.end_thinking()
    assert steps.forced() == tokenizer.encode(THINKING_BUDGET_TEXT)[0]


def test_end_thinking_in_the_answer_does_nothing(tokenizer, special):
    ids = prompt(tokenizer, enable_thinking=False)  # the template closed an empty think block
    guide = TurnGuide(tokenizer, VOCAB_SIZE, ids)
    steps = Stepper(guide, ids)
    guide.end_thinking()
    steps.feed(*tokenizer.encode("Hello"))
    assert steps.forced() is None


def test_named_tool_choice_forces_a_valid_call_after_thinking(tokenizer, special):
    ids = prompt(tokenizer)
    steps = Stepper(TurnGuide(tokenizer, VOCAB_SIZE, ids, tool_choice="get_weather", tools=TOOLS), ids)
    steps.feed(special.think_start, *tokenizer.encode("\nWeather.\n"), special.think_end)
    # A 'model' that prefers to close strings and objects, so the grammar's choices end.
    taken = steps.follow({tokenizer.encode(piece)[0]: 1.0 for piece in ('"', "}")})
    text = tokenizer.decode(taken)
    assert text.startswith("\n\n<tool_call>\n") and text.endswith("\n</tool_call><|im_end|>"), text
    call = json.loads(text.removeprefix("\n\n<tool_call>\n").removesuffix("\n</tool_call><|im_end|>"))
    assert call["name"] == "get_weather" and isinstance(call["arguments"]["city"], str)


def test_a_constrained_turn_cannot_end_while_it_thinks(tokenizer, special):
    """A model that would stop inside its thinking closes it instead, and the forced call still comes."""
    ids = prompt(tokenizer)
    guide = TurnGuide(tokenizer, VOCAB_SIZE, ids, tool_choice="required", tools=TOOLS)
    steps = Stepper(guide, ids)
    steps.feed(special.think_start, *tokenizer.encode("\nHmm"))
    end = tokenizer.end_token_ids[0]
    logits = steps.logits({end: 5.0})
    assert all(np.isneginf(logits[e]) for e in tokenizer.end_token_ids)
    assert int(np.argmax(logits)) == special.think_end and logits[special.think_end] >= 5.0
    free = Stepper(TurnGuide(tokenizer, VOCAB_SIZE, ids), ids)  # unconstrained: ending stays the model's choice
    free.feed(special.think_start, *tokenizer.encode("\nHmm"))
    assert int(np.argmax(free.logits({end: 5.0}))) == end


def test_tool_choice_none_bans_a_call_in_the_answer_only(tokenizer, special):
    ids = prompt(tokenizer)
    steps = Stepper(TurnGuide(tokenizer, VOCAB_SIZE, ids, tool_choice="none", tools=TOOLS), ids)
    steps.feed(special.think_start)
    assert np.isfinite(steps.logits()[special.tool_call_start])  # thinking may mention anything
    steps.feed(special.think_end, *tokenizer.encode("\n\n"))
    assert np.isneginf(steps.logits()[special.tool_call_start])


def test_json_answer_follows_the_thinking(tokenizer, special):
    ids = prompt(tokenizer)
    guide = TurnGuide(tokenizer, VOCAB_SIZE, ids, response_format={"type": "json_object"})
    steps = Stepper(guide, ids)
    steps.feed(special.think_start, *tokenizer.encode("\nOk.\n"))
    assert steps.forced() is None  # thinking is free
    steps.feed(special.think_end)
    assert [steps.forced()] == tokenizer.encode("\n\n")
    steps.feed(*tokenizer.encode("\n\n"))
    allowed = np.flatnonzero(np.isfinite(steps.logits()))
    assert tokenizer.encode("{")[0] in allowed and tokenizer.encode("Hello")[0] not in allowed


def test_penalties_see_only_the_generated_tokens(tokenizer):
    """A prompt full of one word does not penalise that word; generating it does."""
    word = tokenizer.encode(" apple")[0]
    ids = prompt(tokenizer) + [word] * 8
    penalties = Sampling(presence_penalty=1.5).resolve({}, True).logits_processors(VOCAB_SIZE)
    guide = TurnGuide(tokenizer, VOCAB_SIZE, ids, penalties=penalties)
    steps = Stepper(guide, ids)
    assert steps.logits()[word] == 0
    steps.feed(word)
    assert steps.logits()[word] == pytest.approx(-1.5)
