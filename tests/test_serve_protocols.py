"""One conversation, four protocols: Chat Completions, Responses, Anthropic Messages and Ollama's `/api/chat`
give the same reasoning, answer and tool call on the demo model, each in its own shape, through each
protocol's official client. They run the same turn pipeline, so this holds by construction; the test is
that every protocol's mapping carries all of it."""

from __future__ import annotations

import json

import anthropic
import ollama
import pytest
from openai import OpenAI

from qwen_mlx.demo import SCRIPTS

SCRIPT = {s["name"]: s for s in SCRIPTS}
TIMEOUT_S = 120


def question(name: str) -> str:
    return SCRIPT[name]["messages"][0]["content"]


def chat_completions(url: str, name: str, tools: list[dict] | None) -> tuple[str, str, list]:
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    extra = {"tools": tools} if tools else {}
    message = (
        client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": question(name)}], temperature=0, **extra
        )
        .choices[0]
        .message
    )
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
    return message.reasoning_content or "", message.content or "", calls


def responses(url: str, name: str, tools: list[dict] | None) -> tuple[str, str, list]:
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    flat = [{"type": "function", **t["function"]} for t in tools or []]
    response = client.responses.create(
        model="demo", input=question(name), temperature=0, **({"tools": flat} if flat else {})
    )
    reasoning = "".join(c.text for item in response.output if item.type == "reasoning" for c in item.content or [])
    calls = [(item.name, json.loads(item.arguments)) for item in response.output if item.type == "function_call"]
    return reasoning, response.output_text, calls


def messages(url: str, name: str, tools: list[dict] | None) -> tuple[str, str, list]:
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    specs = [{"name": f["name"], "description": f["description"], "input_schema": f["parameters"]}
             for f in (t["function"] for t in tools or [])]  # fmt: skip
    message = client.messages.create(
        model="demo",
        max_tokens=300,
        messages=[{"role": "user", "content": question(name)}],
        extra_body={"temperature": 0},
        **({"tools": specs} if specs else {}),
    )
    reasoning = "".join(b.thinking for b in message.content if b.type == "thinking")
    text = "".join(b.text for b in message.content if b.type == "text")
    return reasoning, text, [(b.name, b.input) for b in message.content if b.type == "tool_use"]


def ollama_chat(url: str, name: str, tools: list[dict] | None) -> tuple[str, str, list]:
    client = ollama.Client(host=url, timeout=TIMEOUT_S)
    reply = client.chat(
        model="demo",
        messages=[{"role": "user", "content": question(name)}],
        options={"temperature": 0},
        **({"tools": tools} if tools else {}),
    ).message
    calls = [(c.function.name, dict(c.function.arguments)) for c in reply.tool_calls or []]
    return reply.thinking or "", reply.content or "", calls


PROTOCOLS = [chat_completions, responses, messages, ollama_chat]


@pytest.mark.parametrize("name", ["thinking", "tool_call", "chinese_emoji"])
def test_every_protocol_gives_the_same_turn(demo_server: str, name: str):
    tools = SCRIPT[name].get("tools")
    results = {protocol.__name__: protocol(demo_server, name, tools) for protocol in PROTOCOLS}
    reference = results["chat_completions"]
    assert reference[0], "the demo thinks first in every script used here"
    for protocol, result in results.items():
        assert result == reference, protocol
    if name == "tool_call":
        assert reference[2] == [("get_weather", {"city": "Paris"})] and reference[1] == ""


def test_lm_studio_clients_find_the_model_loaded(demo_server: str):
    import httpx

    (card,) = httpx.get(f"{demo_server}/api/v0/models", timeout=TIMEOUT_S).json()["data"]
    assert card["id"] == "demo" and card["type"] == "llm" and card["state"] == "loaded"
    assert card["arch"] == "qwen3" and card["max_context_length"] == 40960 and card["compatibility_type"] == "mlx"
    assert httpx.get(f"{demo_server}/api/v0/models/demo", timeout=TIMEOUT_S).json() == card
    missing = httpx.get(f"{demo_server}/api/v0/models/nope", timeout=TIMEOUT_S)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_an_agents_long_prompt_is_prefilled_once_whatever_the_protocol(demo_server: str):
    """An agent resends its long system prompt every turn; the prefix cache holds it across protocols."""
    system = "You are a careful assistant working in a large repository. " * 150  # about 1.6K tokens
    chat = [{"role": "system", "content": system}, {"role": "user", "content": question("thinking")}]
    openai = OpenAI(base_url=f"{demo_server}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    first = openai.chat.completions.create(model="demo", messages=chat, temperature=0, max_tokens=5)
    prompt = first.usage.prompt_tokens
    assert prompt > 1500

    claude = anthropic.Anthropic(base_url=demo_server, api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    again = claude.messages.create(
        model="demo", max_tokens=5, system=system, messages=chat[1:], extra_body={"temperature": 0}
    )
    assert again.usage.cache_read_input_tokens == prompt - 1 and again.usage.input_tokens == 1

    reply = ollama.Client(host=demo_server, timeout=TIMEOUT_S).chat(
        model="demo", messages=chat, options={"temperature": 0, "num_predict": 5}
    )
    assert reply.prompt_eval_count == 1  # Ollama counts what it evaluated: the rest came from the cache
