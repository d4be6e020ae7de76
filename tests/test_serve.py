"""End to end: `qwen-mlx serve` on the demo model, driven by the official `openai` SDK.

The demo model replays its scripted chats (qwen_mlx/demo_scripts.json) at temperature 0, so answers,
reasoning and tool calls can be compared exactly, and with what the engine (`ChatSession`) says.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from conftest import running_server
from openai import OpenAI

from qwen_mlx.chat import ChatSession
from qwen_mlx.demo import SCRIPTS
from qwen_mlx.sampling import Sampling

SCRIPT = {s["name"]: s for s in SCRIPTS}
GREEDY = {"temperature": 0}


def user(name: str) -> list[dict]:
    return [m for m in SCRIPT[name]["messages"] if m["role"] != "assistant"][:1]


@pytest.fixture(scope="module")
def client(demo_server: str) -> OpenAI:
    return OpenAI(base_url=f"{demo_server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(demo_model_path: Path) -> ChatSession:
    return ChatSession.load(str(demo_model_path))


def joined(stream) -> tuple[str, str, list]:
    """(reasoning, content, chunks) of a streamed chat completion."""
    chunks = list(stream)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return reasoning, content, chunks


def test_models_lists_the_served_model(client: OpenAI):
    (card,) = client.models.list().data
    assert card.id == "demo" and card.owned_by == "qwen-mlx"
    assert card.context_length == 40960  # the demo model's max_position_embeddings; the chat app shows it


def test_chat_splits_thinking_into_reasoning_content_as_the_engine_does(client: OpenAI, engine: ChatSession):
    response = client.chat.completions.create(model="demo", messages=user("thinking"), **GREEDY)
    expected = engine.complete(user("thinking"), sampling=Sampling(temperature=0))
    message = response.choices[0].message
    assert message.content == expected.answer == "2 + 3 = **5**."
    assert message.reasoning_content == expected.reasoning
    assert "<think>" not in message.content and expected.reasoning
    assert response.choices[0].finish_reason == "stop"
    usage = response.usage
    assert usage.completion_tokens == expected.stats.completion_tokens
    assert usage.prompt_tokens == expected.stats.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens_details.reasoning_tokens == expected.stats.reasoning_tokens > 0


def test_streamed_chat_equals_the_whole_one_and_reports_usage_when_asked(client: OpenAI):
    whole = client.chat.completions.create(model="demo", messages=user("markdown"), **GREEDY)
    reasoning, content, chunks = joined(
        client.chat.completions.create(
            model="demo", messages=user("markdown"), stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert content == whole.choices[0].message.content and "```python" in content
    assert reasoning == whole.choices[0].message.reasoning_content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    _, _, plain = joined(client.chat.completions.create(model="demo", messages=user("markdown"), stream=True))
    assert all(c.usage is None for c in plain)


def test_tool_call_round_trip_reuses_the_cached_prefix(client: OpenAI):
    tools = SCRIPT["tool_call"]["tools"]
    first = client.chat.completions.create(model="demo", messages=user("tool_call"), tools=tools, **GREEDY)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.reasoning_content and "<tool_call>" not in (choice.message.content or "")

    messages = [
        *user("tool_call"),
        {
            "role": "assistant",
            "content": choice.message.content,
            "reasoning_content": choice.message.reasoning_content,
            "tool_calls": [call.model_dump()],
        },
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18, "condition": "sunny"})},
    ]
    second = client.chat.completions.create(model="demo", messages=messages, tools=tools, **GREEDY)
    assert second.choices[0].message.content == "It is 18 °C and sunny in Paris."
    assert second.choices[0].finish_reason == "stop"
    # The first request's prompt (tools and question) is a prefix of the second's.
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1


def test_streamed_tool_call_comes_as_openai_deltas(client: OpenAI):
    tools = SCRIPT["tool_call"]["tools"]
    _, content, chunks = joined(
        client.chat.completions.create(model="demo", messages=user("tool_call"), tools=tools, stream=True, **GREEDY)
    )
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    head, body = deltas
    assert head.index == body.index == 0
    assert head.id.startswith("call_") and head.function.name == "get_weather" and head.function.arguments == ""
    assert json.loads(body.function.arguments) == {"city": "Paris"} and body.id is None
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and "<tool_call>" not in content


@pytest.mark.parametrize(
    "switch",
    [
        {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}},
        {"extra_body": {"enable_thinking": False}},
        {"reasoning_effort": "none"},
    ],
    ids=["chat_template_kwargs", "enable_thinking", "reasoning_effort"],
)
def test_thinking_switched_off(client: OpenAI, switch: dict):
    response = client.chat.completions.create(model="demo", messages=user("non_thinking"), **GREEDY, **switch)
    message = response.choices[0].message
    assert message.content == "The capital of France is **Paris**."
    assert not message.reasoning_content
    assert response.usage.completion_tokens_details.reasoning_tokens == 0


def test_thinking_budget_matches_the_engine(client: OpenAI, engine: ChatSession):
    messages = user("thinking_long")
    response = client.chat.completions.create(
        model="demo", messages=messages, extra_body={"thinking_budget": 6}, **GREEDY
    )
    expected = engine.complete(messages, thinking_budget=6, sampling=Sampling(temperature=0))
    message = response.choices[0].message
    assert "Considering the limited time" in message.reasoning_content
    assert (message.reasoning_content, message.content) == (expected.reasoning, expected.answer)


def test_reasoning_in_assistant_history_reaches_the_template(client: OpenAI):
    """vLLM and SGLang drop it; the tool_result script needs the first turn's reasoning to be rendered."""
    script = SCRIPT["tool_result"]["messages"][:-1]
    for field in ("reasoning_content", "reasoning", "thinking"):
        messages = [dict(m) for m in script]
        messages[1][field] = messages[1].pop("reasoning_content")
        response = client.chat.completions.create(
            model="demo", messages=messages, tools=SCRIPT["tool_result"]["tools"], **GREEDY
        )
        assert response.choices[0].message.content == "It is 18 °C and sunny in Paris.", field


def test_tool_choice_none_never_calls(client: OpenAI):
    tools = SCRIPT["tool_call"]["tools"]
    response = client.chat.completions.create(
        model="demo", messages=user("tool_call"), tools=tools, tool_choice="none", max_tokens=80, **GREEDY
    )
    assert not response.choices[0].message.tool_calls
    assert response.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_choice_forces_a_valid_call(client: OpenAI, choice):
    """The demo model would just say hi; forced, it must call get_weather with arguments fitting its schema.

    The city is an enum and no other key is allowed here: the tiny model would otherwise write an endless
    (valid) string or invent keys.
    """
    tools = json.loads(json.dumps(SCRIPT["tool_call"]["tools"]))
    tools[0]["function"]["parameters"]["properties"]["city"]["enum"] = ["Paris", "Tokyo"]
    tools[0]["function"]["parameters"]["additionalProperties"] = False
    response = client.chat.completions.create(
        model="demo",
        messages=user("hi"),
        tools=tools,
        tool_choice=choice,
        max_tokens=120,
        extra_body={"thinking_budget": 8},  # the tiny model's thinking wanders with tools it was not trained on
        **GREEDY,
    )
    choice_out = response.choices[0]
    assert choice_out.finish_reason == "tool_calls"
    (call,) = choice_out.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and arguments["city"] in ("Paris", "Tokyo")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_ends_at_its_natural_token_boundaries(client: OpenAI, choice, stream: bool):
    """The call's JSON ends in one token spanning `}}` and the newline; forced, it must still close and end
    the turn with `tool_calls`: no schema crutches, no thinking budget, the tool exactly as the demo knows it."""
    tools = SCRIPT["tool_call"]["tools"]
    request = {"model": "demo", "messages": user("tool_call"), "tools": tools, "tool_choice": choice, **GREEDY}
    if stream:
        _, content, chunks = joined(client.chat.completions.create(stream=True, **request))
        deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        name, arguments = deltas[0].function.name, "".join(d.function.arguments or "" for d in deltas)
        finish = chunks[-1].choices[0].finish_reason
    else:
        message = client.chat.completions.create(**request).choices[0]
        (call,) = message.message.tool_calls
        name, arguments, finish, content = call.function.name, call.function.arguments, message.finish_reason, ""
    assert (name, json.loads(arguments), finish) == ("get_weather", {"city": "Paris"}, "tool_calls")
    assert "<tool_call>" not in (content or "")


def test_response_format_json_schema_is_enforced(client: OpenAI):
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
        "required": ["answer", "sure"],
        "additionalProperties": False,
    }
    response = client.chat.completions.create(
        model="demo",
        messages=user("thinking_long"),
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}},
        max_tokens=200,
        **GREEDY,
    )
    document = json.loads(response.choices[0].message.content)
    assert (
        document["answer"] in ("yes", "no")
        and isinstance(document["sure"], bool)
        and set(document)
        == {
            "answer",
            "sure",
        }
    )
    assert response.choices[0].message.reasoning_content  # it still thought first


def test_json_object_mode(client: OpenAI):
    response = client.chat.completions.create(
        model="demo",
        messages=user("non_thinking"),
        response_format={"type": "json_object"},
        max_tokens=60,
        extra_body={"enable_thinking": False},
        **GREEDY,
    )
    if response.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(response.choices[0].message.content), dict)
    else:  # cut off: still a valid JSON prefix of an object
        assert response.choices[0].message.content.lstrip().startswith("{")


def test_logprobs_cover_every_token(client: OpenAI):
    response = client.chat.completions.create(
        model="demo", messages=user("thinking"), logprobs=True, top_logprobs=3, **GREEDY
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens - 1  # all but the end token
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the likeliest


def test_stop_strings_cut_the_answer(client: OpenAI):
    response = client.chat.completions.create(model="demo", messages=user("thinking"), stop=["**"], **GREEDY)
    assert response.choices[0].message.content == "2 + 3 = "
    assert response.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client: OpenAI):
    def ask():
        return (
            client.chat.completions.create(model="demo", messages=user("hi"), temperature=1.5, seed=11, max_tokens=30)
            .choices[0]
            .message
        )

    first, second = ask(), ask()
    assert (first.content, first.reasoning_content) == (second.content, second.reasoning_content)


def test_completions_continue_raw_text(client: OpenAI, demo_server: str):
    response = client.completions.create(
        model="demo", prompt="<|im_start|>user\nHi!<|im_end|>\n", max_tokens=8, **GREEDY
    )
    text = response.choices[0].text
    assert response.object == "text_completion" and response.usage.completion_tokens <= 8 and text
    echoed = client.completions.create(model="demo", prompt="Hello", max_tokens=3, echo=True, **GREEDY)
    assert echoed.choices[0].text.startswith("Hello")
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="demo", prompt="<|im_start|>user\nHi!<|im_end|>\n", max_tokens=8, stream=True, **GREEDY
        )
        if c.choices
    )
    assert streamed == text
    by_ids = httpx.post(
        f"{demo_server}/v1/completions", json={"prompt": [9707, 0], "max_tokens": 2, "temperature": 0}, timeout=60
    )
    assert by_ids.status_code == 200 and by_ids.json()["usage"]["prompt_tokens"] == 2


def test_health_and_openapi(demo_server: str):
    assert httpx.get(f"{demo_server}/health").json()["status"] == "ok"
    paths = httpx.get(f"{demo_server}/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(paths)


def test_inline_think_reasoning_field(demo_model_path: Path):
    with running_server(demo_model_path, "--reasoning-field", "think", "--model-name", "x") as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        whole = client.chat.completions.create(model="x", messages=user("thinking"), **GREEDY)
        _, streamed, _ = joined(
            client.chat.completions.create(model="x", messages=user("thinking"), stream=True, **GREEDY)
        )
    content = whole.choices[0].message.content
    assert content.startswith("<think>\nThe user asks") and content.endswith("</think>\n\n2 + 3 = **5**.")
    assert streamed == content
