"""End to end on the demo model: real weights, real tokenizer, real template, the real engine.

Each script in `qwen_mlx/demo_scripts.json` is a conversation whose last assistant message is the raw
output the demo model was trained to produce; greedy decoding must reproduce it, split by the chat layer
into reasoning, answer and tool calls.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import qwen_mlx
from qwen_mlx.chat import ChatSession, Done
from qwen_mlx.demo import SCRIPTS
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.format import THINKING_BUDGET_TEXT
from qwen_mlx.parser import Answer, Reasoning, ToolCall, ToolCallError
from qwen_mlx.sampling import Sampling
from qwen_mlx.tokenizer import Tokenizer

GREEDY = Sampling(temperature=0)
TOOL_BLOCK = re.compile(r"<tool_call>\n?(.*?)\n?</tool_call>", re.S)
BY_NAME = {script["name"]: script for script in SCRIPTS}


@pytest.fixture(scope="module")
def demo(demo_model_path):
    return qwen_mlx.load(demo_model_path), Tokenizer.load(demo_model_path)


@pytest.fixture
def session(demo) -> ChatSession:
    model, tokenizer = demo
    return ChatSession(model, tokenizer)


def expected_parts(raw: str) -> tuple[str, str, list[dict]]:
    """Split a script's raw output the way the template does: reasoning, answer, tool calls."""
    reasoning, answer = "", raw
    if "</think>" in raw:
        reasoning = raw.split("</think>")[0].split("<think>")[-1].strip("\n")
        answer = raw.split("</think>")[-1].lstrip("\n")
    calls = [json.loads(body) for body in TOOL_BLOCK.findall(answer)]
    return reasoning, TOOL_BLOCK.sub("", answer).strip(), calls


def run_script(session: ChatSession, script: dict, **options):
    messages = script["messages"][:-1]
    return session.complete(
        messages,
        tools=script.get("tools"),
        enable_thinking=script.get("enable_thinking", True),
        sampling=GREEDY,
        **options,
    )


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_greedy_reproduces_every_script(session, name):
    script = BY_NAME[name]
    reasoning, answer, calls = expected_parts(script["messages"][-1]["content"])
    reply = run_script(session, script)
    assert reply.reasoning == reasoning
    assert reply.answer.strip() == answer
    assert [{"name": c.name, "arguments": c.arguments} for c in reply.tool_calls] == calls
    assert not reply.errors
    assert reply.stats.finish_reason == ("tool_calls" if calls else "stop")
    last_user = [m["content"] for m in script["messages"] if m["role"] == "user"][-1]
    assert reply.stats.thinking == (script.get("enable_thinking", True) and "/no_think" not in last_user)


def test_thinking_and_non_thinking_split(session):
    thinking = run_script(session, BY_NAME["thinking"])
    assert thinking.reasoning and thinking.answer and thinking.stats.thinking
    assert thinking.stats.reasoning_tokens > 0
    no_think = run_script(session, BY_NAME["no_think_switch"])
    assert no_think.reasoning == "" and no_think.answer and not no_think.stats.thinking
    non_thinking = run_script(session, BY_NAME["non_thinking"])
    assert non_thinking.reasoning == "" and non_thinking.stats.reasoning_tokens == 0


@pytest.mark.parametrize("budget", [8, 16])
def test_thinking_budget_stops_thinking_and_an_answer_follows(session, demo, budget):
    _, tokenizer = demo
    script = BY_NAME["thinking_long"]
    raw = script["messages"][-1]["content"]
    full_reasoning, answer, _ = expected_parts(raw)
    reply = run_script(session, script, thinking_budget=budget)
    # Exactly `budget` tokens of the model's own thinking, then Qwen's early-stop sentence.
    thought = tokenizer.encode(raw.split("<think>", 1)[1])[:budget]
    sentence = THINKING_BUDGET_TEXT.split("</think>")[0].strip("\n")
    assert reply.reasoning == tokenizer.decode(thought).lstrip("\n") + "\n\n" + sentence
    assert len(tokenizer.encode(full_reasoning)) > budget + 8  # the unbudgeted reasoning is much longer
    assert reply.answer == answer
    assert reply.stats.finish_reason == "stop"


def test_template_that_opens_thinking_itself(demo_model_path, tmp_path):
    """Thinking-2507 checkpoints: the generation prompt already holds `<think>\n`; only `</think>` is generated."""
    folder = shutil.copytree(demo_model_path, tmp_path / "demo-2507")
    template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    opened = template.replace("{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>\\n' }}")
    assert opened != template
    (folder / "chat_template.jinja").write_text(opened)
    session = ChatSession.load(str(folder))
    script = BY_NAME["thinking"]
    assert session.render(script["messages"][:-1])[-2:] == [session.tokenizer.think_start_id, 198]  # "<think>\n"
    reply = run_script(session, script)
    reasoning, answer, _ = expected_parts(script["messages"][-1]["content"])
    assert (reply.reasoning, reply.answer) == (reasoning, answer)
    budgeted = run_script(session, BY_NAME["thinking_long"], thinking_budget=8)
    assert "Considering the limited time" in budgeted.reasoning
    assert budgeted.answer == expected_parts(BY_NAME["thinking_long"]["messages"][-1]["content"])[1]


def test_generation_stopping_inside_thinking_keeps_reasoning(session):
    reply = run_script(session, BY_NAME["thinking_long"], max_tokens=6)
    assert reply.reasoning and reply.answer == ""
    assert reply.stats.finish_reason == "length" and reply.stats.completion_tokens == 6


def test_tool_call_comes_out_structured_and_tool_result_answers(session):
    reply = run_script(session, BY_NAME["tool_call"])
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert reply.tool_calls[0].id.startswith("call_")
    assert reply.stats.finish_reason == "tool_calls"
    after = run_script(session, BY_NAME["tool_result"])
    assert "18" in after.answer and not after.tool_calls


def test_tool_call_tag_inside_thinking_stays_reasoning(session):
    events = list(session.stream(BY_NAME["tool_tag_in_thinking"]["messages"][:-1], sampling=GREEDY, max_tokens=200))
    assert not [e for e in events if isinstance(e, (ToolCall, ToolCallError))]
    reasoning = "".join(e.text for e in events if isinstance(e, Reasoning))
    assert "<tool_call>" in reasoning
    assert events[-1].stats.finish_reason == "stop"


def test_streamed_text_equals_the_non_streamed_text(session, demo):
    _, tokenizer = demo
    script = BY_NAME["chinese_emoji"]
    events = list(session.stream(script["messages"][:-1], sampling=GREEDY))
    pieces = [e.text for e in events if isinstance(e, Answer)]
    assert all("\ufffd" not in piece for piece in pieces)
    prompt = session.render(script["messages"][:-1])
    generated = session.cached_ids[len(prompt) :]  # everything the model produced, decoded at once
    whole = tokenizer.decode(generated).removesuffix("<|im_end|>")
    assert "".join(pieces) == whole.split("</think>")[-1].lstrip("\n")
    assert "".join(pieces) == expected_parts(script["messages"][-1]["content"])[1]
    assert re.search(r"[\u4e00-\u9fff]", "".join(pieces)) and re.search(r"[\U0001F300-\U0001FAFF]", "".join(pieces))


def test_second_turn_reuses_the_common_prefix(session):
    script = BY_NAME["two_turns"]
    first_user, _, second_user, _ = script["messages"]
    turn1 = session.complete([first_user], sampling=GREEDY)
    after_turn1 = list(session.cached_ids)
    history = [first_user, {"role": "assistant", "content": turn1.answer}, second_user]
    prompt = session.render(history)
    common = next((i for i, (a, b) in enumerate(zip(after_turn1, prompt, strict=False)) if a != b), 0)
    turn2 = session.complete(history, sampling=GREEDY)
    assert turn2.stats.cached_tokens == common > 0
    # The template dropped turn 1's thinking, so the cache was trimmed back, not reused whole or discarded.
    assert common < len(after_turn1)
    expected_reasoning, expected_answer, _ = expected_parts(script["messages"][-1]["content"])
    assert (turn2.reasoning, turn2.answer) == (expected_reasoning, expected_answer)


def test_quantized_kv_cache_on_the_demo(demo):
    model, tokenizer = demo
    session = ChatSession(model, tokenizer, kv_bits=8)
    reply = run_script(session, BY_NAME["thinking"])
    reasoning, answer, _ = expected_parts(BY_NAME["thinking"]["messages"][-1]["content"])
    assert (reply.reasoning, reply.answer) == (reasoning, answer)


def test_stop_string_cuts_the_answer(session):
    reply = run_script(session, BY_NAME["markdown"], stop=["```"])
    assert "```" not in reply.answer and reply.stats.finish_reason == "stop"
    full = expected_parts(BY_NAME["markdown"]["messages"][-1]["content"])[1]
    assert full.startswith(reply.answer) and len(reply.answer) < len(full)


def test_too_long_prompt_is_a_clear_error(session):
    with pytest.raises(QwenMLXError, match=r"the prompt is \d+ tokens but the model's context is 40960"):
        session.complete([{"role": "user", "content": "hello " * 41000}])


def test_generate_cli_streams_reasoning_answer_and_stats(demo_model_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    command = [sys.executable, "-m", "qwen_mlx", "generate", "--model", str(demo_model_path), "--temperature", "0"]
    result = subprocess.run(
        [*command, "--prompt", "What is 2 + 3?"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    reasoning, answer, _ = expected_parts(BY_NAME["thinking"]["messages"][-1]["content"])
    assert result.stdout.index(reasoning) < result.stdout.index(answer)
    assert "finish: stop" in result.stderr.splitlines()[-1]
    budget = subprocess.run(
        [*command, "--prompt", "Is 91 a prime number?", "--thinking-budget", "8"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert "Considering the limited time" in budget.stdout and "91 = 7 × 13" in budget.stdout
    piped = subprocess.run(
        [*command, "--prompt", "-", "--no-think"],
        input="What is the capital of France?\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert piped.stdout.strip() == "The capital of France is **Paris**."
    bad = subprocess.run([*command, "--prompt", "x", "--top-p", "2"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "top_p" in bad.stderr


def test_generate_cli_forces_a_tool_call_and_answers_to_a_schema(demo_model_path, tmp_path):
    """`--tool-choice NAME` and `--json-schema FILE` through the real CLI on the demo model."""
    import jsonschema

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    command = [sys.executable, "-m", "qwen_mlx", "generate", "--model", str(demo_model_path), "--temperature", "0"]
    tools = BY_NAME["tool_call"]["tools"] + [
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    ]
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    # "Hi!" is a greeting the model answers without tools, and it would end inside its thinking here (the
    # system prompt is not the one it learned): forced, it closes the thought and calls the named tool.
    forced = subprocess.run(
        [*command, "--prompt", "Hi!", "--tools", str(tmp_path / "tools.json"), "--tool-choice", "get_weather"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert forced.returncode == 0, forced.stderr
    calls = [line for line in forced.stdout.splitlines() if line.startswith("[tool call ")]
    assert len(calls) == 1 and calls[0].startswith("[tool call get_weather] "), forced.stdout
    arguments = json.loads(calls[0].removeprefix("[tool call get_weather] "))
    jsonschema.validate(arguments, tools[0]["function"]["parameters"])
    assert "finish: tool_calls" in forced.stderr.splitlines()[-1]

    schema = {
        "type": "object",
        "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
        "required": ["country", "capital"],
        "additionalProperties": False,
    }
    (tmp_path / "capital.json").write_text(json.dumps(schema))
    answered = subprocess.run(
        [*command, "--prompt", "Give the capital of France as JSON.", "--json-schema", str(tmp_path / "capital.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert answered.returncode == 0, answered.stderr
    reasoning, answer, _ = expected_parts(BY_NAME["json_answer"]["messages"][-1]["content"])
    assert answered.stdout.startswith(reasoning)
    value = json.loads(answered.stdout.removeprefix(reasoning))
    jsonschema.validate(value, schema)
    assert value == json.loads(answer)
    assert "finish: stop" in answered.stderr.splitlines()[-1]


def test_done_carries_the_stats(session):
    events = list(session.stream(BY_NAME["thinking"]["messages"][:-1], sampling=GREEDY))
    stats = events[-1].stats
    assert isinstance(events[-1], Done)
    assert stats.prompt_tokens > 0 and stats.completion_tokens > stats.reasoning_tokens > 0
    assert stats.ttft_s > 0 and stats.generation_tps > 0 and stats.peak_memory > 0
