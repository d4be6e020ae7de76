"""End to end: OpenAI's Responses API on `qwen-mlx serve`, driven by the official `openai` SDK.

The demo model replays its scripted chats (qwen_mlx/demo_scripts.json) at temperature 0, so reasoning,
text and function calls can be compared exactly, and with what Chat Completions says for the same chat.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import running_server
from openai import OpenAI

from qwen_mlx.demo import SCRIPTS

SCRIPT = {s["name"]: s for s in SCRIPTS}
TIMEOUT_S = 120
RESULT = '{"temperature_c": 18, "condition": "sunny"}'
ANSWER = "It is 18 °C and sunny in Paris."
SCHEMA = {
    "type": "object",
    "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
    "required": ["country", "capital"],
    "additionalProperties": False,
}


def question(name: str) -> str:
    return next(m["content"] for m in SCRIPT[name]["messages"] if m["role"] == "user")


def flat_tools(name: str) -> list[dict]:
    """The script's tools in Responses' flat function shape."""
    return [{"type": "function", **t["function"]} for t in SCRIPT[name]["tools"]]


def parts(response) -> tuple[str, str, list]:
    """(reasoning text, output text, function_call items) of a Response."""
    reasoning = "".join(c.text for item in response.output if item.type == "reasoning" for c in item.content or [])
    return reasoning, response.output_text, [item for item in response.output if item.type == "function_call"]


def collapsed(kinds: list[str]) -> list[str]:
    """Event types with runs of deltas shown once."""
    return [k for i, k in enumerate(kinds) if not (k.endswith(".delta") and i and kinds[i - 1] == k)]


@pytest.fixture(scope="module")
def client(demo_server: str) -> OpenAI:
    return OpenAI(base_url=f"{demo_server}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)


def test_create_gives_reasoning_and_text_as_chat_completions_does(client):
    response = client.responses.create(model="demo", input=question("thinking"), temperature=0)
    messages = [{"role": "user", "content": question("thinking")}]
    reference = client.chat.completions.create(model="demo", messages=messages, temperature=0)
    reasoning, text, calls = parts(response)
    assert text == reference.choices[0].message.content == "2 + 3 = **5**."
    assert reasoning == reference.choices[0].message.reasoning_content and reasoning
    assert [item.type for item in response.output] == ["reasoning", "message"] and not calls
    thought, message = response.output
    assert thought.id.startswith("rs_") and thought.summary == [] and thought.content[0].type == "reasoning_text"
    assert message.id.startswith("msg_") and message.role == "assistant" and message.status == "completed"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert response.id.startswith("resp_") and response.object == "response" and response.model == "demo"
    assert response.status == "completed" and response.incomplete_details is None and response.error is None
    usage = response.usage
    assert usage.input_tokens == reference.usage.prompt_tokens
    assert usage.output_tokens == reference.usage.completion_tokens
    reasoning_tokens = reference.usage.completion_tokens_details.reasoning_tokens
    assert usage.output_tokens_details.reasoning_tokens == reasoning_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_stream_gives_the_same_response_in_the_responses_event_order(client):
    whole = client.responses.create(model="demo", input=question("thinking"), temperature=0)
    kinds, numbers = [], []
    with client.responses.stream(model="demo", input=question("thinking"), temperature=0) as stream:
        for event in stream:
            kinds.append(event.type)
            numbers.append(event.sequence_number)
        streamed = stream.get_final_response()
    assert parts(streamed) == parts(whole) and streamed.usage.output_tokens == whole.usage.output_tokens
    assert [item.type for item in streamed.output] == ["reasoning", "message"] and streamed.status == "completed"
    assert numbers == list(range(len(numbers)))
    item = ["response.output_item.added", "response.content_part.added"]
    done = ["response.content_part.done", "response.output_item.done"]
    assert collapsed(kinds) == [
        "response.created",
        "response.in_progress",
        *item,
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        *done,
        *item,
        "response.output_text.delta",
        "response.output_text.done",
        *done,
        "response.completed",
    ]


def test_the_stream_names_each_event_and_keeps_a_long_prefill_alive(demo_model_path):
    """On the wire: `event:` lines match each payload's type; an SSE comment while a long prompt is prefilled."""
    body = {"model": "demo", "input": "word " * 3000 + "What is 2 + 3?", "stream": True, "max_output_tokens": 2}
    with (
        running_server(demo_model_path, "--model-name", "demo", "--keepalive", "0.05") as url,
        httpx.stream("POST", f"{url}/v1/responses", json=body, timeout=TIMEOUT_S) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert ": keep-alive" in lines, lines[:5]
    frames = [line for line in lines if line != ": keep-alive"]
    named = [line.removeprefix("event: ") for line in frames[0::2]]
    payloads = [json.loads(line.removeprefix("data: ")) for line in frames[1::2]]
    assert named == [p["type"] for p in payloads] and named[0] == "response.created"
    assert named[-1] == "response.incomplete" and payloads[-1]["response"]["usage"]["output_tokens"] == 2
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))


def test_a_function_call_round_trip(client):
    tools = flat_tools("tool_call")
    first = client.responses.create(model="demo", input=question("tool_call"), tools=tools, temperature=0)
    reasoning, text, (call,) = parts(first)
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and call.status == "completed"
    assert reasoning and text == "" and "<tool_call>" not in json.dumps(first.model_dump())
    history = [{"role": "user", "content": question("tool_call")}]
    history += [item.model_dump(exclude_none=True) for item in first.output]
    second = client.responses.create(
        model="demo",
        input=[*history, {"type": "function_call_output", "call_id": call.call_id, "output": RESULT}],
        tools=tools,
        temperature=0,
    )
    assert second.output_text == ANSWER and not parts(second)[2]
    # The reasoning item reached the template: the same prompt as Chat Completions with reasoning_content.
    function = {"name": call.name, "arguments": call.arguments}
    assistant = {
        "role": "assistant",
        "content": "",
        "reasoning_content": reasoning,
        "tool_calls": [{"id": call.call_id, "type": "function", "function": function}],
    }
    reference = client.chat.completions.create(
        model="demo",
        messages=[
            {"role": "user", "content": question("tool_call")},
            assistant,
            {"role": "tool", "tool_call_id": call.call_id, "content": RESULT},
        ],
        tools=SCRIPT["tool_call"]["tools"],
        temperature=0,
        max_tokens=1,
    )
    assert second.usage.input_tokens == reference.usage.prompt_tokens


def test_a_streamed_function_call_arrives_as_argument_deltas(client):
    tools = flat_tools("tool_call")
    stream = client.responses.create(model="demo", input=question("tool_call"), tools=tools, temperature=0, stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    start = kinds.index("response.function_call_arguments.delta") - 1
    assert kinds[start : start + 4] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    added, delta, done, finished = events[start : start + 4]
    assert added.item.type == "function_call" and added.item.arguments == "" and added.item.status == "in_progress"
    assert json.loads(delta.delta) == {"city": "Paris"} and done.arguments == delta.delta
    assert finished.item.arguments == delta.delta and finished.item.call_id == added.item.call_id
    assert events[-1].type == "response.completed" and events[-1].response.output[-1].name == "get_weather"


def test_previous_response_id_continues_the_conversation_from_the_cache(client):
    tools = flat_tools("tool_call")
    first = client.responses.create(model="demo", input=question("tool_call"), tools=tools, temperature=0)
    (call,) = parts(first)[2]
    output = {"type": "function_call_output", "call_id": call.call_id, "output": RESULT}
    second = client.responses.create(
        model="demo", previous_response_id=first.id, input=[output], tools=tools, temperature=0
    )
    assert second.output_text == ANSWER and second.previous_response_id == first.id
    # The first prompt (tools and question) and its reply were a prefix of the second's, and it was cached.
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 1
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens - 2
    # A chain of two: the third turn's prompt is the whole conversation, as Chat Completions renders it.
    third = client.responses.create(
        model="demo", previous_response_id=second.id, input="Thanks!", tools=tools, temperature=0, max_output_tokens=2
    )
    calls = [{"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]
    conversation = [
        {"role": "user", "content": question("tool_call")},
        {"role": "assistant", "content": "", "reasoning_content": parts(first)[0], "tool_calls": calls},
        {"role": "tool", "tool_call_id": call.call_id, "content": RESULT},
        {"role": "assistant", "content": ANSWER, "reasoning_content": parts(second)[0]},
        {"role": "user", "content": "Thanks!"},
    ]
    reference = client.chat.completions.create(
        model="demo", messages=conversation, tools=SCRIPT["tool_call"]["tools"], max_tokens=1
    )
    assert third.usage.input_tokens == reference.usage.prompt_tokens
    assert third.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 1


def test_retrieve_and_delete_a_stored_response(client, demo_server):
    created = client.responses.create(
        model="demo", input=question("non_thinking"), reasoning={"effort": "none"}, temperature=0
    )
    assert created.output_text == "The capital of France is **Paris**."
    assert [item.type for item in created.output] == ["message"]
    assert created.usage.output_tokens_details.reasoning_tokens == 0
    assert created.store is True and created.reasoning.effort == "none"
    got = client.responses.retrieve(created.id)
    assert got.id == created.id and got.output_text == created.output_text and got.usage == created.usage
    deleted = httpx.delete(f"{demo_server}/v1/responses/{created.id}", timeout=TIMEOUT_S)
    assert deleted.status_code == 200
    assert deleted.json() == {"id": created.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.retrieve(created.id)
    assert created.id in gone.value.body["message"] and gone.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)


def test_an_unknown_previous_response_id_is_a_404_in_openais_shape(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="demo", previous_response_id="resp_nope", input="Hi!")
    body = missing.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == "previous_response_id" and "resp_nope" in body["error"]["message"]
    assert body["error"]["code"] == "previous_response_not_found"


def test_max_output_tokens_makes_the_response_incomplete(client):
    short = client.responses.create(model="demo", input=question("thinking"), max_output_tokens=3, temperature=0)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert short.usage.output_tokens == 3 and short.output[-1].status == "incomplete"
    assert short.max_output_tokens == 3


def test_text_format_json_schema_constrains_the_answer(client):
    text = {"format": {"type": "json_schema", "name": "capital", "schema": SCHEMA, "strict": True}}
    response = client.responses.create(model="demo", input=question("json_answer"), text=text, temperature=0)
    assert json.loads(response.output_text) == {"country": "France", "capital": "Paris"}
    assert response.text.format.type == "json_schema" and response.text.format.name == "capital"


def test_tool_choice_forces_the_named_function(client):
    response = client.responses.create(
        model="demo",
        input="Hi!",
        tools=flat_tools("tool_call"),
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=300,
        temperature=0,
    )
    (call,) = parts(response)[2]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments).get("city"), str)


def test_instructions_and_leading_developer_messages_are_one_system_prompt(client):
    response = client.responses.create(
        model="demo",
        instructions="You are helpful.",
        input=[
            {"role": "developer", "content": [{"type": "input_text", "text": "Answer briefly."}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi!"}]},
        ],
        max_output_tokens=1,
    )
    reference = client.chat.completions.create(
        model="demo",
        messages=[
            {"role": "system", "content": "You are helpful.\n\nAnswer briefly."},
            {"role": "user", "content": "Hi!"},
        ],
        max_tokens=1,
    )
    assert response.usage.input_tokens == reference.usage.prompt_tokens
    assert response.instructions == "You are helpful."


def test_what_codex_sends_is_accepted(client):
    """Codex CLI's fields: store false, encrypted reasoning asked for, summaries, a cache key, hosted and
    namespace tools. The hosted tool is left out and the namespace flattened, so the prompt is the
    tool_call script's, and the call comes back with its namespace."""
    weather = flat_tools("tool_call")[0]
    stream = client.responses.create(
        model="demo",
        input=[{"type": "message", "role": "user", "content": [{"type": "input_text", "text": question("tool_call")}]}],
        tools=[
            {"type": "web_search"},
            {"type": "namespace", "name": "weather", "description": "Weather tools.", "tools": [weather]},
        ],
        tool_choice="auto",
        parallel_tool_calls=False,
        reasoning={"effort": "high", "summary": "auto"},
        store=False,
        stream=True,
        include=["reasoning.encrypted_content"],
        prompt_cache_key="codex-session-1",
        temperature=0,
        extra_body={"client_metadata": {"originator": "codex_cli_rs"}, "service_tier": "auto"},
    )
    final = [e for e in stream if e.type == "response.completed"][0].response
    (call,) = parts(final)[2]
    assert call.name == "get_weather" and call.namespace == "weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert final.store is False and final.prompt_cache_key == "codex-session-1"
    with pytest.raises(openai.NotFoundError):  # store: false keeps nothing
        client.responses.retrieve(final.id)


def test_bad_requests_are_400s_in_openais_shape(client, demo_server):
    image = {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="demo", input=[{"role": "user", "content": [image]}])
    assert "text only" in refused.value.body["message"] and refused.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as hot:
        client.responses.create(model="demo", input="Hi!", temperature=5)
    assert hot.value.body["param"] == "temperature"
    for body in ({"model": "demo"}, {"model": "demo", "input": []}, "{", {"model": "demo", "input": [{"x": 1}]}):
        raw = httpx.post(
            f"{demo_server}/v1/responses",
            content=body if isinstance(body, str) else json.dumps(body),
            timeout=TIMEOUT_S,
        )
        assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}, raw.text
