"""End to end: Ollama's native API on `qwen-mlx serve` (the demo model), driven by the official `ollama` client.

The demo model replays its scripted chats (qwen_mlx/demo_scripts.json) at temperature 0, so answers,
thinking and tool calls can be compared exactly with the scripts.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

import httpx
import ollama
import pytest
from fixtures import tokenizer_dir

from qwen_mlx.demo import SCRIPTS
from qwen_mlx.tokenizer import Tokenizer
from qwen_mlx.turn import Turns

TURNS = Turns(Tokenizer.load(tokenizer_dir()), 151936, 40960)
SCRIPT = {s["name"]: s for s in SCRIPTS}
GREEDY = {"temperature": 0}
TOOL_BLOCK = re.compile(r"<tool_call>\n?(.*?)\n?</tool_call>", re.S)


def user(name: str) -> list[dict]:
    return [m for m in SCRIPT[name]["messages"] if m["role"] != "assistant"][:1]


def expected(name: str) -> tuple[str, str, list[dict]]:
    """(thinking, answer, tool calls) the script's last assistant message holds, split as the template does."""
    raw, thinking = SCRIPT[name]["messages"][-1]["content"], ""
    if "</think>" in raw:
        thinking = raw.split("</think>")[0].split("<think>")[-1].strip("\n")
        raw = raw.split("</think>")[-1].lstrip("\n")
    calls = [json.loads(body) for body in TOOL_BLOCK.findall(raw)]
    return thinking, TOOL_BLOCK.sub("", raw).strip(), calls


def tokens(messages: list[dict], tools: list[dict] | None = None) -> int:
    """The prompt's length through the real template (the demo model's tokenizer and template are Qwen3's)."""
    return len(TURNS.render(messages, tools))


@pytest.fixture(scope="module")
def client(demo_server: str) -> ollama.Client:
    return ollama.Client(host=demo_server, timeout=120)


def _rfc3339_utc(text: str) -> datetime:
    assert text.endswith("Z"), text
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert stamp.tzinfo is not None and stamp.utcoffset().total_seconds() == 0
    return stamp


def test_chat_puts_the_reasoning_in_thinking_and_reports_ollamas_numbers(client: ollama.Client):
    thinking, answer, _ = expected("thinking")
    response = client.chat(model="demo", messages=user("thinking"), options=GREEDY)
    assert response.message.role == "assistant"
    assert response.message.content == answer == "2 + 3 = **5**."
    assert response.message.thinking == thinking and "<think>" not in response.message.content
    assert response.done is True and response.done_reason == "stop" and response.model == "demo"
    assert response.prompt_eval_count > 0 and response.eval_count > len(answer.split())
    durations = [response.total_duration, response.prompt_eval_duration, response.eval_duration]
    assert all(isinstance(d, int) and d > 0 for d in durations)
    assert response.total_duration >= response.prompt_eval_duration + response.eval_duration
    assert response.load_duration is not None and response.load_duration >= 0
    assert abs((datetime.now(timezone.utc) - _rfc3339_utc(response.created_at)).total_seconds()) < 300


def test_streamed_chat_equals_the_whole_one(client: ollama.Client):
    whole = client.chat(model="demo", messages=user("markdown"), options=GREEDY, stream=False)
    parts = list(client.chat(model="demo", messages=user("markdown"), options=GREEDY, stream=True))
    assert len(parts) > 3
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert "```python" in whole.message.content
    assert "".join(p.message.thinking or "" for p in parts) == whole.message.thinking == expected("markdown")[0]
    # Thinking and content never share a chunk's text: the reasoning is never in the content.
    assert all(not (p.message.thinking and p.message.content) for p in parts)
    last = parts[-1]
    assert last.done_reason == "stop" and last.eval_count == whole.eval_count
    # The same prompt again: the prefix cache holds all of it, and only the last token is evaluated anew.
    assert last.prompt_eval_count == 1 and last.eval_duration > 0


def test_think_false_turns_thinking_off(client: ollama.Client):
    response = client.chat(model="demo", messages=user("non_thinking"), think=False, options=GREEDY)
    assert response.message.content == "The capital of France is **Paris**."
    assert not response.message.thinking


def test_tool_call_arguments_are_an_object_and_the_round_trip_answers(client: ollama.Client, demo_server: str):
    tools = SCRIPT["tool_call"]["tools"]
    thinking, _, calls = expected("tool_call")
    first = client.chat(model="demo", messages=user("tool_call"), tools=tools, options=GREEDY)
    (call,) = first.message.tool_calls
    assert call.function.name == "get_weather" and dict(call.function.arguments) == calls[0]["arguments"]
    assert first.message.thinking == thinking and "<tool_call>" not in first.message.content
    assert first.done_reason == "stop"  # as Ollama ends a tool-call turn

    # On the wire the arguments are a JSON object, not a string (the OpenAI shape).
    raw = httpx.post(
        f"{demo_server}/api/chat",
        json={"model": "demo", "messages": user("tool_call"), "tools": tools, "stream": False, "options": GREEDY},
        timeout=120,
    ).json()
    assert raw["message"]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}

    # The assistant turn goes back with its thinking and tool call, then the tool's result.
    result = json.dumps({"temperature_c": 18, "condition": "sunny"})
    messages = [*user("tool_call"), first.message, {"role": "tool", "content": result, "tool_name": "get_weather"}]
    second = client.chat(model="demo", messages=messages, tools=tools, options=GREEDY)
    tool_thinking, tool_answer, _ = expected("tool_result")
    assert second.message.content == tool_answer == "It is 18 °C and sunny in Paris."
    assert second.message.thinking == tool_thinking and not second.message.tool_calls
    # Only what the round trip added is evaluated: the first request's prompt came from the prefix cache.
    assistant = {"role": "assistant", "content": "", "reasoning_content": thinking,
                 "tool_calls": [{"type": "function", "function": calls[0]}]}  # fmt: skip
    history = [*user("tool_call"), assistant, {"role": "tool", "content": result}]
    added = tokens(history, tools) - tokens(user("tool_call"), tools)
    assert 0 < second.prompt_eval_count <= added + 1


def test_streamed_tool_call_comes_in_one_chunk(client: ollama.Client):
    tools = SCRIPT["tool_call"]["tools"]
    parts = list(client.chat(model="demo", messages=user("tool_call"), tools=tools, options=GREEDY, stream=True))
    with_calls = [p for p in parts if p.message.tool_calls]
    assert len(with_calls) == 1
    (call,) = with_calls[0].message.tool_calls
    assert call.function.name == "get_weather" and dict(call.function.arguments) == {"city": "Paris"}
    assert parts[-1].done and parts[-1].done_reason == "stop"
    assert "".join(p.message.content for p in parts) == ""


def test_format_json_schema_gives_the_scripted_json(client: ollama.Client):
    schema = {
        "type": "object",
        "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
        "required": ["country", "capital"],
        "additionalProperties": False,
    }
    response = client.chat(model="demo", messages=user("json_answer"), format=schema, options=GREEDY)
    assert json.loads(response.message.content) == {"country": "France", "capital": "Paris"}
    assert response.message.thinking == expected("json_answer")[0]


def test_format_json_schema_is_enforced_where_the_model_would_not_write_json(client: ollama.Client):
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
        "required": ["answer", "sure"],
        "additionalProperties": False,
    }
    options = {**GREEDY, "num_predict": 200}
    response = client.chat(model="demo", messages=user("thinking_long"), format=schema, options=options)
    document = json.loads(response.message.content)  # unconstrained, it answers "No, 91 is not prime..."
    assert set(document) == {"answer", "sure"} and document["answer"] in ("yes", "no")
    assert isinstance(document["sure"], bool) and response.message.thinking


def test_format_json_gives_an_object(client: ollama.Client):
    options = {**GREEDY, "num_predict": 60}
    response = client.chat(model="demo", messages=user("non_thinking"), think=False, format="json", options=options)
    if response.done_reason == "stop":
        assert isinstance(json.loads(response.message.content), dict)
    else:  # cut off: still the start of an object
        assert response.message.content.lstrip().startswith("{")
    assert response.message.content != "The capital of France is **Paris**."


def test_generate_through_the_template_and_raw(client: ollama.Client, demo_model_path):
    thinking, answer, _ = expected("thinking")
    prompt = user("thinking")[0]["content"]
    templated = client.generate(model="demo", prompt=prompt, options=GREEDY)
    assert templated.response == answer and templated.thinking == thinking and templated.done_reason == "stop"
    streamed = list(client.generate(model="demo", prompt=prompt, options=GREEDY, stream=True))
    assert "".join(p.response for p in streamed) == answer and streamed[-1].done

    # raw: the prompt goes in as plain text, and the reply comes back as plain text (no thinking split).
    from qwen_mlx.tokenizer import Tokenizer

    text = Tokenizer.load(demo_model_path).apply_chat_template(user("thinking"), add_generation_prompt=True)
    raw = client.generate(model="demo", prompt=text, raw=True, options=GREEDY)
    assert raw.prompt_eval_count == 1  # the same tokens as the templated prompt (all cached), not templated twice
    assert not raw.thinking and thinking in raw.response and raw.response.endswith(answer)
    assert raw.response.index("</think>") < raw.response.index(answer)


def test_generate_with_a_system_prompt_and_no_prompt_loads(client: ollama.Client):
    loaded = client.generate(model="demo")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    chat_loaded = client.chat(model="demo", messages=[])
    assert chat_loaded.done and chat_loaded.done_reason == "load"
    unloaded = client.generate(model="demo", keep_alive=0)
    assert unloaded.done_reason == "unload"
    with_system = client.generate(model="demo", prompt="What is 2 + 3?", system="Be brief.", options=GREEDY)
    plain = client.generate(model="demo", prompt="What is 2 + 3?", options=GREEDY)
    assert with_system.prompt_eval_count > plain.prompt_eval_count  # the system message reached the template


def test_options_num_predict_stop_and_unknown_ones(client: ollama.Client):
    short = client.chat(model="demo", messages=user("thinking"), options={**GREEDY, "num_predict": 3})
    assert short.done_reason == "length" and short.eval_count == 3
    stopped = client.chat(model="demo", messages=user("thinking"), options={**GREEDY, "stop": ["**"]})
    assert stopped.message.content == "2 + 3 = " and stopped.done_reason == "stop"
    ignored = {**GREEDY, "num_predict": -1, "mirostat": 2, "num_gpu": 99, "num_thread": 4, "repeat_last_n": 64}
    full = client.chat(model="demo", messages=user("thinking"), options=ignored, keep_alive="5m")
    assert full.message.content == "2 + 3 = **5**."


def test_num_ctx_may_lower_the_context_but_never_raise_it(client: ollama.Client):
    whole = client.chat(model="demo", messages=user("thinking"), options=GREEDY)
    prompt = tokens(user("thinking"))
    lowered = client.chat(model="demo", messages=user("thinking"), options={**GREEDY, "num_ctx": prompt + 2})
    assert lowered.done_reason == "length" and lowered.eval_count == 2
    raised = client.chat(model="demo", messages=user("thinking"), options={**GREEDY, "num_ctx": 10**9})
    assert raised.message.content == whole.message.content
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model="demo", messages=user("thinking"), options={**GREEDY, "num_ctx": prompt - 1})
    assert refused.value.status_code == 400 and "num_ctx" in refused.value.error


def test_tags_lists_the_served_model_with_a_tag(client: ollama.Client):
    (model,) = client.list().models
    assert model.model == "demo:latest"
    assert model.details.family == "qwen3" and model.details.format == "safetensors"
    assert model.size > 0 and len(model.digest) == 64 and model.modified_at is not None


def test_show_describes_the_model_as_ollama_does(client: ollama.Client):
    shown = client.show("demo")
    assert set(shown.capabilities) == {"completion", "tools", "thinking"}
    assert shown.modelinfo["general.architecture"] == "qwen3"
    assert shown.modelinfo["qwen3.context_length"] == 40960  # the demo model's max_position_embeddings
    assert shown.modelinfo["qwen3.block_count"] == 2 and shown.modelinfo["general.parameter_count"] > 10**6
    details = shown.details
    assert details.family == "qwen3" and details.format == "safetensors" and details.quantization_level == "BF16"
    assert details.parameter_size.endswith("M")
    assert "<|im_start|>" in shown.template and "FROM " in shown.modelfile
    assert "temperature" in shown.parameters and "top_k" in shown.parameters


def test_ps_lists_the_loaded_model(client: ollama.Client):
    (model,) = client.ps().models
    assert model.model == model.name == "demo:latest" and model.context_length == 40960
    assert model.size_vram > 0 and model.expires_at > datetime.now(timezone.utc)


def test_version_and_the_root_probe(demo_server: str):
    version = httpx.get(f"{demo_server}/api/version").json()["version"]
    assert tuple(int(p) for p in version.split(".")[:2]) >= (0, 12)
    root = httpx.get(f"{demo_server}/")
    assert root.status_code == 200 and root.text == "Ollama is running"
    head = httpx.head(f"{demo_server}/")
    assert head.status_code == 200 and head.content == b""


def test_ollama_names_resolve_to_the_served_model(client: ollama.Client):
    for name in ("demo:latest", "demo"):
        response = client.chat(model=name, messages=user("non_thinking"), think=False, options=GREEDY)
        assert response.message.content == "The capital of France is **Paris**." and response.model == name
    assert client.show("demo:latest").modelinfo["general.architecture"] == "qwen3"
    for call in (
        lambda: client.chat(model="llama3:8b", messages=user("thinking")),
        lambda: client.generate(model="llama3:8b", prompt="hi"),
        lambda: client.show("llama3:8b"),
    ):
        with pytest.raises(ollama.ResponseError) as missing:
            call()
        assert missing.value.status_code == 404 and missing.value.error == "model 'llama3:8b' not found"


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/api/chat", {"model": "demo", "messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ("/api/chat", {"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ("/api/chat", {"model": "demo", "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, "images"),
        ("/api/chat", {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "format": "xml"}, "format"),
        ("/api/chat", {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "think": "max"}, "think"),
        (
            "/api/chat",
            {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "options": {"temperature": "hot"}},
            "temperature",
        ),  # fmt: skip
        (
            "/api/chat",
            {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "options": {"presence_penalty": 5}},
            "presence_penalty",
        ),  # fmt: skip
        (
            "/api/chat",
            {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "options": {"repeat_penalty": -1}},
            "repeat_penalty",
        ),  # fmt: skip
        (
            "/api/chat",
            {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 0}},
            "num_predict",
        ),  # fmt: skip
        (
            "/api/chat",
            {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "format": {"type": 5}},
            "format is not a usable JSON schema",
        ),  # fmt: skip
        ("/api/generate", {"model": "demo", "prompt": "hi", "images": ["aGk="]}, "images"),
        ("/api/generate", {"model": "demo", "prompt": "hi", "context": [1, 2]}, "context"),
        ("/api/generate", {"model": "demo", "prompt": "hi", "suffix": "bye"}, "suffix"),
        ("/api/generate", {"model": "demo", "prompt": "hi", "raw": True, "format": "json"}, "format"),
    ],
)
def test_bad_requests_are_400_in_ollamas_shape(demo_server: str, path: str, body: dict, words: str):
    response = httpx.post(f"{demo_server}{path}", json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()
    assert set(error) == {"error"} and isinstance(error["error"], str)
    assert words in error["error"] and "\n" not in error["error"] and "Traceback" not in error["error"]


def test_bad_json_and_the_client_see_ollamas_error(client: ollama.Client, demo_server: str):
    broken = httpx.post(
        f"{demo_server}/api/chat", content=b"{not json", headers={"Content-Type": "application/json"}, timeout=60
    )
    assert broken.status_code == 400 and broken.json() == {"error": "the request body is not valid JSON"}
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model="demo", messages=user("thinking"), options={"temperature": -1})
    assert refused.value.status_code == 400 and "temperature" in refused.value.error


def test_bodies_are_json_whatever_the_content_type_as_in_ollamas_curl_examples(demo_server: str):
    body = {"model": "demo", "prompt": "What is 2 + 3?", "stream": False, "options": GREEDY}
    form = {"Content-Type": "application/x-www-form-urlencoded"}  # what `curl -d` sends
    response = httpx.post(f"{demo_server}/api/generate", content=json.dumps(body), headers=form, timeout=120)
    assert response.status_code == 200 and response.json()["response"] == "2 + 3 = **5**."


def test_stream_is_ndjson(demo_server: str):
    body = {"model": "demo", "messages": user("thinking"), "options": GREEDY}  # streaming is the default
    with httpx.stream("POST", f"{demo_server}/api/chat", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        text = response.read().decode()
    assert text.endswith("\n")
    lines = text.split("\n")[:-1]
    assert lines and all(line.strip() for line in lines)  # one whole object per line, no blank keep-alives
    objects = [json.loads(line) for line in lines]
    assert [o["done"] for o in objects] == [False] * (len(objects) - 1) + [True]
    assert objects[-1]["done_reason"] == "stop" and isinstance(objects[-1]["eval_duration"], int)
    assert "".join(o["message"]["content"] for o in objects) == "2 + 3 = **5**."
    whole = httpx.post(f"{demo_server}/api/chat", json={**body, "stream": False}, timeout=120)
    assert whole.headers["content-type"].startswith("application/json") and whole.json()["done"] is True


def test_logprobs_come_per_token(client: ollama.Client):
    response = client.chat(
        model="demo", messages=user("thinking"), options={**GREEDY, "num_predict": 4}, logprobs=True, top_logprobs=2
    )
    assert len(response.logprobs) == 4
    assert all(entry.logprob <= 0 and len(entry.top_logprobs) == 2 for entry in response.logprobs)
