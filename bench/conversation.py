"""An 8-turn thinking conversation sent the way an OpenAI client sends it: the full message list each turn.

Design decisions:
- The history is scripted, not generated: a random-weight model never stops by itself and its text means
  nothing, so each turn runs to a fixed `max_tokens` and the assistant message a client would send back
  is a fixed answer of about `answer_tokens` tokens (the answer only: clients drop the thinking, and the
  Qwen3 template strips it from earlier turns anyway). Every side gets exactly the same messages.
- Both tokenizers render each turn's messages; that they agree token for token is recorded.
- The sides take turns in a rotating order, so drift on a shared machine spreads over all of them.
"""

from __future__ import annotations

import random
from typing import Any

SENTENCES = (
    "Mixture-of-experts layers route every token to a few experts chosen by a small router.",
    "The key and value cache grows by one entry per layer for every token the model reads.",
    "Unified memory lets the processor and the graphics cores share the same weights without copies.",
    "Quantized weights trade a little accuracy for a large cut in the bytes read per token.",
    "A chat template turns a list of messages into the exact token sequence the model was trained on.",
    "Decoding speed is bound by memory bandwidth, prompt processing by arithmetic throughput.",
    "Grouped-query attention shares each key and value head between several query heads.",
    "Rotary position embeddings rotate queries and keys by an angle that depends on the position.",
    "Long conversations repeat their history on every request, so reusing the cache pays off.",
    "The thinking block holds the reasoning; the answer after it is what the user reads.",
    "A streaming detokenizer holds back the bytes of a character that spans two tokens.",
    "Benchmarks on shared machines should report ratios measured side by side, not absolute numbers.",
)
QUESTIONS = (
    "Can you explain how this works in more detail, with an example?",
    "What would change if the model were twice as large?",
    "Summarise the trade-offs in a short list.",
    "How does this interact with long prompts?",
    "Which of these matters most on a laptop?",
    "Give me a concrete number to expect, and why.",
    "What is the most common mistake people make here?",
    "How would you measure it yourself?",
)


def text_of(tokenizer, n_tokens: int, rng: random.Random, lead: str = "") -> str:
    """About `n_tokens` tokens of English prose (whole sentences, then cut at a token boundary)."""
    text = lead
    while len(tokenizer.encode(text)) < n_tokens:
        text += (" " if text else "") + rng.choice(SENTENCES)
    ids = tokenizer.encode(text)[:n_tokens]
    return tokenizer.decode(ids).strip()


def make_script(
    tokenizer, turns: int, system_tokens: int, user_tokens: int, answer_tokens: int, seed: int = 0
) -> dict[str, Any]:
    rng = random.Random(seed)
    return {
        "system": text_of(tokenizer, system_tokens, rng, "You are a careful assistant. Background notes:"),
        "users": [
            text_of(tokenizer, user_tokens, rng, QUESTIONS[i % len(QUESTIONS)] + " Context:") for i in range(turns)
        ],
        "answers": [text_of(tokenizer, answer_tokens, rng) for _ in range(turns)],
    }


def messages_for(script: dict[str, Any], turn: int) -> list[dict]:
    """The full message list a client sends for `turn` (0-based): earlier answers without their thinking."""
    messages = [{"role": "system", "content": script["system"]}]
    for i in range(turn):
        messages.append({"role": "user", "content": script["users"][i]})
        messages.append({"role": "assistant", "content": script["answers"][i]})
    messages.append({"role": "user", "content": script["users"][turn]})
    return messages


def run_conversation(sides: list, script: dict[str, Any], max_tokens: int, log=print) -> list[dict[str, Any]]:
    """Each turn on every side, in rotating order; returns one record per turn with every side's run."""
    turns = []
    for turn in range(len(script["users"])):
        messages = messages_for(script, turn)
        renders = {side.side: side.render(messages) for side in sides}
        same_prompt = len({tuple(ids) for ids in renders.values()}) == 1
        order = sides[turn % len(sides) :] + sides[: turn % len(sides)]
        runs = {side.side: side.turn(messages, max_tokens) for side in order}
        turns.append(
            {
                "turn": turn + 1,
                "prompt_tokens": len(next(iter(renders.values()))),
                "same_prompt": same_prompt,
                "order": [side.side for side in order],
                "runs": {name: run.as_dict() for name, run in runs.items()},
            }
        )
        log(
            "  turn {}: prompt {} tokens; TTFT {}".format(
                turn + 1,
                turns[-1]["prompt_tokens"],
                ", ".join(
                    f"{name} {run.ttft_s * 1e3:.0f} ms (cached {run.cached_tokens})" for name, run in runs.items()
                ),
            )
        )
    return turns
