"""The turn pipeline's own rules, on the real Qwen3 tokenizer (no model): what it refuses, what it reports."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from fixtures import VOCAB_SIZE, tokenizer_dir

from qwen_mlx import format as qwen3
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.parser import ToolCall
from qwen_mlx.sampling import Sampling
from qwen_mlx.tokenizer import Tokenizer
from qwen_mlx.turn import UNLIKELY_LOGPROB, LoopGuard, TurnOptions, Turns

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.mark.parametrize("text", ["🫠", "𝔘 and 龘", " naïve"])  # split into 3, 2+2 tokens; whole ones
def test_logprob_bytes_are_exact_when_a_character_is_split_across_tokens(turns, text):
    """Each token's `bytes` are its own, so the bytes of a reply's tokens join into the reply's UTF-8."""
    reader = turns.reader(turns.plan_text("Hi", TurnOptions(top_logprobs=0)))
    entries = [reader.logprob(t, mx.zeros((VOCAB_SIZE,))) for t in turns.tokenizer.encode(text)]
    assert len(entries) > 1
    assert b"".join(bytes(e.bytes) for e in entries) == text.encode()
    for entry in entries:
        if entry.token.startswith("bytes:"):  # part of a character: named by its bytes, never U+FFFD
            assert entry.token == "bytes:" + "".join(f"\\x{b:02x}" for b in entry.bytes)
        else:
            assert entry.token.encode() == bytes(entry.bytes) and "\ufffd" not in entry.token
    special = turns.tokenizer.token_id("<think>")
    assert bytes(reader.logprob(special, mx.zeros((VOCAB_SIZE,))).bytes) == b"<think>"


@pytest.mark.parametrize("penalty", [1e-300, 0.0, 11.0, float("nan")])
def test_a_repetition_penalty_that_would_overflow_the_logits_is_refused(turns, penalty):
    with pytest.raises(QwenMLXError, match="repetition_penalty"):
        turns.plan([{"role": "user", "content": "Hi"}], TurnOptions(sampling=Sampling(repetition_penalty=penalty)))


def test_a_reply_stuck_in_a_loop_ends_with_length(turns):
    """Qwen3's endless-thinking loop: the same paragraph again and again ends the turn, as a token limit does."""
    plan = turns.plan([{"role": "user", "content": "Is 91 prime?"}])
    reader = turns.reader(plan)
    paragraph = turns.tokenizer.encode(" Wait, let me check whether 7 divides 91 once more, carefully.")
    fed = 0
    while not reader.stopped and fed < 5000:
        for token in paragraph:
            reader.feed(token)
            fed += 1
    assert reader.stopped and reader.loop.period == len(paragraph)
    assert fed <= LoopGuard.MIN_LOOP + LoopGuard.EVERY + len(paragraph)  # caught soon after the bound
    _, stats = reader.finish("stop")
    assert stats.finish_reason == "length"


def test_long_real_text_and_short_repeats_are_no_loop():
    """Prose, and a short run of one token (a Markdown rule, a small zero array), never trip the guard."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    tokenizer = Tokenizer.load(tokenizer_dir())
    ids = tokenizer.encode(text)[:6000]
    rule = tokenizer.encode(" 0,") * 300  # a 300-element zero array
    guard = LoopGuard()
    assert not any(guard.feed(t) for t in ids + rule + ids[:2000]) and guard.period is None


def test_turns_without_max_tokens_get_the_planners_default(turns):
    capped = Turns(turns.tokenizer, VOCAB_SIZE, 40960, default_max_tokens=64)
    messages = [{"role": "user", "content": "Hi"}]
    assert capped.plan(messages).max_tokens == 64
    assert capped.plan(messages, TurnOptions(max_tokens=500)).max_tokens == 500  # the request's own wins
    assert turns.plan(messages).max_tokens == 40960 - len(turns.plan(messages).prompt_ids)


# A Qwen3-Coder-style template, of our own: tools as JSON, calls in the XML format Coder renders.
CODER_TEMPLATE = """{%- if tools %}<|im_start|>system
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools><|im_end|>
{% endif %}{%- for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}{% for tool_call in message.tool_calls or [] %}<tool_call>
<function={{ tool_call.function.name }}>
{% for name, value in tool_call.function.arguments | items %}<parameter={{ name }}>
{{ value | tojson if value is mapping else value }}
</parameter>
{% endfor %}</function>
</tool_call>{% endfor %}<|im_end|>
{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_a_coder_template_gets_object_arguments_and_its_calls_are_read_as_xml(tmp_path):
    folder = tmp_path / "coder"
    shutil.copytree(tokenizer_dir(), folder)
    (folder / "chat_template.jinja").write_text(CODER_TEMPLATE)
    coder = Turns(Tokenizer.load(folder), VOCAB_SIZE, 40960)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]  # fmt: skip
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},  # as OpenAI clients send it
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]  # fmt: skip
    plan = coder.plan(history, TurnOptions(tools=tools))
    prompt = coder.tokenizer.decode(plan.prompt_ids)
    assert "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n" in prompt
    reader = coder.reader(plan)
    reply = "<tool_call>\n<function=get_weather>\n<parameter=city>\nLyon\n</parameter>\n<parameter=days>\n5\n"
    reply += "</parameter>\n</function>\n</tool_call>"
    events = [e for token in coder.tokenizer.encode(reply) for e in reader.feed(token)]
    events += reader.finish("stop")[0]
    assert [(e.name, e.arguments) for e in events if isinstance(e, ToolCall)] == [
        ("get_weather", {"city": "Lyon", "days": 5})
    ]
    assert reader.stats.finish_reason == "tool_calls"


QWEN3_PROMPT_END = "{%- if enable_thinking is defined and enable_thinking is false %}"


def turns_with_template(tmp_path: Path, name: str, change) -> Turns:
    """The real tokenizer with the real Qwen3 template as `change` rewrites it (as chat_template.jinja)."""
    folder = tmp_path / name
    shutil.copytree(tokenizer_dir(), folder)
    template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    changed = change(template)
    assert changed != template
    (folder / "chat_template.jinja").write_text(changed)
    return Turns(Tokenizer.load(folder), VOCAB_SIZE, 262144)


def test_2507_models_are_recognised_from_their_template_and_say_what_does_not_apply(turns, tmp_path):
    assert turns.thinking_control == qwen3.SWITCHED
    hello, no_think = [{"role": "user", "content": "Hello"}], [{"role": "user", "content": "Hello /no_think"}]

    # Thinking-2507: the generation prompt opens <think> itself, whatever enable_thinking says.
    thinking = turns_with_template(
        tmp_path,
        "thinking-2507",
        lambda t: t.replace(QWEN3_PROMPT_END, "{%- if false %}").replace(
            "{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>\\n' }}"
        ),
    )
    assert thinking.thinking_control == qwen3.ALWAYS_THINKS
    for messages, options in ((hello, TurnOptions(enable_thinking=False)), (no_think, TurnOptions())):
        plan = thinking.plan(messages, options)
        assert plan.thinking and "always thinks" in plan.notes[0]
        assert plan.sampler is not None and plan.prompt_ids[-2] == thinking.special.think_start
    assert thinking.plan(hello).notes == []

    # Instruct-2507: no switch at all; a budget or /think does not apply, and the turn is a non-thinking one.
    instruct = turns_with_template(tmp_path, "instruct-2507", lambda t: t.replace(QWEN3_PROMPT_END, "{%- if false %}"))
    assert instruct.thinking_control == qwen3.NEVER_THINKS
    plan = instruct.plan([{"role": "user", "content": "Hello /think"}], TurnOptions())
    assert not plan.thinking and "does not think" in plan.notes[0]
    assert "does not think" in instruct.plan(hello, TurnOptions(thinking_budget=64)).notes[0]
    assert instruct.plan(hello).notes == [] and instruct.context_length == 262144
    # The notes reach the turn's stats, which every front end reads.
    reader = instruct.reader(plan)
    assert reader.finish("stop")[1].notes == plan.notes
