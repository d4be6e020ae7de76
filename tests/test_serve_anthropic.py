"""End to end: Anthropic's Messages API on `qwen-mlx serve`, driven by the official `anthropic` SDK.

The demo model replays its scripted chats (qwen_mlx/demo_scripts.json) at temperature 0, so thinking,
text and tool calls can be compared exactly, and with what Chat Completions says for the same chat.
The current SDK sends `temperature` only through `extra_body`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import anthropic
import httpx
import pytest
from conftest import running_server
from openai import OpenAI

from qwen_mlx.demo import SCRIPTS
from qwen_mlx.format import THINKING_BUDGET_TEXT

SCRIPT = {s["name"]: s for s in SCRIPTS}
GREEDY = {"extra_body": {"temperature": 0}}
TIMEOUT_S = 120
RESULT = {"temperature_c": 18, "condition": "sunny"}


def user(name: str) -> list[dict]:
    return [m for m in SCRIPT[name]["messages"] if m["role"] != "assistant"][:1]


def anthropic_tools(name: str) -> list[dict]:
    return [
        {"name": f["name"], "description": f.get("description", ""), "input_schema": f["parameters"]}
        for f in (t["function"] for t in SCRIPT[name]["tools"])
    ]


def parts(message) -> tuple[str, str, list]:
    """(thinking, text, tool_use blocks) of a Message."""
    thinking = "".join(b.thinking for b in message.content if b.type == "thinking")
    text = "".join(b.text for b in message.content if b.type == "text")
    return thinking, text, [b for b in message.content if b.type == "tool_use"]


@pytest.fixture(scope="module")
def client(demo_server: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=demo_server, api_key="unused", max_retries=0, timeout=TIMEOUT_S)


def test_create_splits_thinking_and_text_as_chat_completions_does(client, demo_server):
    message = client.messages.create(model="demo", max_tokens=200, messages=user("thinking"), **GREEDY)
    thinking, text, calls = parts(message)
    openai = OpenAI(base_url=f"{demo_server}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    reference = openai.chat.completions.create(model="demo", messages=user("thinking"), temperature=0)
    assert text == reference.choices[0].message.content == "2 + 3 = **5**."
    assert thinking == reference.choices[0].message.reasoning_content and thinking
    assert [b.type for b in message.content] == ["thinking", "text"] and not calls
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.role == "assistant" and message.id.startswith("msg_") and message.model == "demo"
    usage = message.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == reference.usage.prompt_tokens
    assert usage.output_tokens == reference.usage.completion_tokens


def test_stream_gives_the_same_message_in_anthropics_event_order(client):
    whole = client.messages.create(model="demo", max_tokens=200, messages=user("thinking"), **GREEDY)
    kinds = []
    with client.messages.stream(model="demo", max_tokens=200, messages=user("thinking"), **GREEDY) as stream:
        for event in stream:
            kinds.append(event.type)
        streamed = stream.get_final_message()
    assert parts(streamed) == parts(whole)
    assert streamed.stop_reason == "end_turn" and streamed.usage.output_tokens == whole.usage.output_tokens
    raw = [k for k in kinds if k not in ("text", "thinking", "signature", "input_json")]  # the SDK's own extras
    assert raw[0] == "message_start" and raw[-2:] == ["message_delta", "message_stop"]
    blocks = [k for k in raw if k.startswith("content_block_") and k != "content_block_delta"]
    assert blocks == ["content_block_start", "content_block_stop"] * 2


def test_the_stream_names_each_event_and_pings(demo_server):
    """On the wire (the SDK hides pings): `event:` lines match each payload's type, a ping follows message_start."""
    body = {"model": "demo", "max_tokens": 50, "messages": user("thinking"), "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{demo_server}/v1/messages", json=body, timeout=TIMEOUT_S) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    named = [line.removeprefix("event: ") for line in lines[0::2]]
    payloads = [json.loads(line.removeprefix("data: "))["type"] for line in lines[1::2]]
    assert named == payloads and named[:2] == ["message_start", "ping"] and named[-1] == "message_stop"


def test_thinking_budget_and_disabled_thinking(client):
    budgeted = client.messages.create(
        model="demo",
        max_tokens=200,
        messages=user("thinking_long"),
        thinking={"type": "enabled", "budget_tokens": 8},
        **GREEDY,
    )
    thinking, text, _ = parts(budgeted)
    assert thinking.endswith(THINKING_BUDGET_TEXT.split("</think>")[0].strip())
    assert "91 = 7 × 13" in text
    off = client.messages.create(
        model="demo", max_tokens=200, messages=user("non_thinking"), thinking={"type": "disabled"}, **GREEDY
    )
    assert [b.type for b in off.content] == ["text"] and off.content[0].text == "The capital of France is **Paris**."


def test_tool_round_trip_with_tool_result_reuses_the_prefix(client):
    tools = anthropic_tools("tool_call")
    first = client.messages.create(model="demo", max_tokens=200, messages=user("tool_call"), tools=tools, **GREEDY)
    thinking, text, (call,) = parts(first)
    assert first.stop_reason == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    assert call.id.startswith("toolu_") and thinking and "<tool_call>" not in text
    messages = [
        *user("tool_call"),
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": call.id,
                    "content": '{"temperature_c": 18, "condition": "sunny"}',
                }
            ],
        },
    ]
    second = client.messages.create(model="demo", max_tokens=200, messages=messages, tools=tools, **GREEDY)
    assert parts(second)[1] == "It is 18 °C and sunny in Paris." and second.stop_reason == "end_turn"
    # The first request's prompt (tools and question) is a prefix of the second's, and it was cached.
    assert second.usage.cache_read_input_tokens >= first.usage.input_tokens + first.usage.cache_read_input_tokens - 1


def test_streamed_tool_use_arrives_as_input_json(client):
    tools = anthropic_tools("tool_call")
    with client.messages.stream(
        model="demo", max_tokens=200, messages=user("tool_call"), tools=tools, **GREEDY
    ) as stream:
        message = stream.get_final_message()
    (call,) = parts(message)[2]
    assert call.input == {"city": "Paris"} and message.stop_reason == "tool_use"


def test_tool_choice_forces_the_named_tool(client):
    tools = anthropic_tools("tool_call")
    message = client.messages.create(
        model="demo",
        max_tokens=300,
        messages=[{"role": "user", "content": "Hi!"}],
        tools=tools,
        tool_choice={"type": "tool", "name": "get_weather"},
        **GREEDY,
    )
    (call,) = parts(message)[2]
    assert call.name == "get_weather" and isinstance(call.input.get("city"), str)
    assert message.stop_reason == "tool_use"


def test_output_format_constrains_the_answer_to_a_schema(client):
    schema = {
        "type": "object",
        "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
        "required": ["country", "capital"],
        "additionalProperties": False,
    }
    message = client.messages.create(
        model="demo",
        max_tokens=200,
        messages=user("json_answer"),
        output_config={"format": {"type": "json_schema", "schema": schema}},
        **GREEDY,
    )
    assert json.loads(parts(message)[1]) == {"country": "France", "capital": "Paris"}


def test_stop_sequences_and_max_tokens_set_the_stop_reason(client):
    stopped = client.messages.create(
        model="demo", max_tokens=200, messages=user("thinking"), stop_sequences=["**"], **GREEDY
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "**"
    assert parts(stopped)[1] == "2 + 3 = "
    short = client.messages.create(model="demo", max_tokens=3, messages=user("thinking"), **GREEDY)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


def test_count_tokens_counts_the_rendered_prompt(client):
    counted = client.messages.count_tokens(model="demo", messages=user("tool_call"), tools=anthropic_tools("tool_call"))
    message = client.messages.create(
        model="demo", max_tokens=1, messages=user("tool_call"), tools=anthropic_tools("tool_call"), **GREEDY
    )
    assert counted.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens > 100


def test_what_agents_send_that_a_local_server_cannot_honour_is_accepted(client):
    """Claude Code's fields: system blocks with cache_control, adaptive thinking, effort, metadata, server tools."""
    message = client.messages.create(
        model="demo",
        max_tokens=200,
        system=[{"type": "text", "text": "You are helpful.", "cache_control": {"type": "ephemeral"}}],
        messages=user("thinking"),
        thinking={"type": "adaptive"},
        output_config={"effort": "high"},
        metadata={"user_id": "someone"},
        tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
        extra_body={"temperature": 0, "context_management": {"edits": [{"type": "clear_thinking_20251015"}]}},
        extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"},
        extra_query={"beta": "true"},
    )
    assert message.stop_reason in ("end_turn", "max_tokens") and message.content


def test_errors_come_in_anthropics_shape(client, demo_server):
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=user("thinking"))
    assert missing.value.body["type"] == "error" and missing.value.body["error"]["type"] == "not_found_error"
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="demo", max_tokens=10, messages=[{"role": "user", "content": [image]}])
    assert "text only" in refused.value.body["error"]["message"]
    for body in ({"model": "demo", "messages": user("thinking")}, {"model": "demo", "max_tokens": 5}, "{"):
        raw = httpx.post(f"{demo_server}/v1/messages", content=body if isinstance(body, str) else json.dumps(body))
        assert raw.status_code == 400 and raw.json()["type"] == "error", raw.text
        assert raw.json()["error"]["type"] == "invalid_request_error"


def test_alias_patterns_answer_to_the_names_agents_send(demo_model_path):
    """Claude Code asks for claude-* names: `--alias 'claude-*'` maps them; other names keep their 404.
    (The same server checks `--max-tokens-default`: a request that sets no limit gets it.)"""
    options = ("--model-name", "demo", "--alias", "claude-*", "--max-tokens-default", "6")
    with running_server(demo_model_path, *options) as url:
        openai = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)
        capped = openai.chat.completions.create(model="demo", messages=user("thinking"), temperature=0)
        assert capped.choices[0].finish_reason == "length" and capped.usage.completion_tokens == 6
        client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=TIMEOUT_S)
        message = client.messages.create(model="claude-sonnet-4-5", max_tokens=200, messages=user("thinking"), **GREEDY)
        assert parts(message)[1] == "2 + 3 = **5**." and message.model == "claude-sonnet-4-5"
        with pytest.raises(anthropic.NotFoundError, match="--alias"):
            client.messages.create(model="gpt-5", max_tokens=10, messages=user("thinking"))


def test_an_alias_for_another_model_is_refused_before_loading(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_mlx",
            "serve",
            "--model",
            str(tmp_path),
            "--port",
            "0",
            "--alias",
            "claude-*=other",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "serves" in done.stderr and "'other'" in done.stderr


def test_a_long_prefill_streams_keepalives_in_both_protocols(demo_model_path):
    """While a long prompt is prefilled no token comes: the stream still talks (an SSE comment; a ping)."""
    long_prompt = [{"role": "user", "content": "word " * 3000 + "What is 2 + 3?"}]
    with running_server(demo_model_path, "--model-name", "demo", "--keepalive", "0.05") as url:
        body = {"model": "demo", "max_tokens": 2, "messages": long_prompt, "stream": True}
        with httpx.stream("POST", f"{url}/v1/messages", json=body, timeout=TIMEOUT_S) as response:
            named = [line.removeprefix("event: ") for line in response.iter_lines() if line.startswith("event: ")]
        assert named.count("ping") >= 2 and named[-1] == "message_stop", named  # after message_start, and the prefill's
        # Another long prompt: the same one would come from the prefix cache with no prefill to wait through.
        body["messages"] = [{"role": "user", "content": "term " * 3000 + "What is 2 + 3?"}]
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT_S) as response:
            lines = [line for line in response.iter_lines() if line]
        assert ": keep-alive" in lines[: lines.index("data: [DONE]")], lines[:5]
