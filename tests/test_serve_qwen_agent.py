"""qwen-agent against `qwen-mlx serve`: the function-calling round trip of the Qwen3 README, on the demo model.

The client is set up the way the Qwen3 README sets up qwen-agent for an OpenAI-compatible server (vLLM, LM
Studio): `get_chat_model({"model", "model_server": ".../v1", "api_key": "EMPTY", "generate_cfg"})`, tools
given as `functions=` in qwen-agent's own format (the `function` part of an OpenAI tool), the tool result
sent back as a `{"role": "function", "name", "content"}` message.

Both of qwen-agent's modes are driven. With `use_raw_api: True` it sends the tools in the request's
`tools`, lets the server render them with the model's chat template, and reads OpenAI `tool_calls` and
`reasoning_content` back from the stream. Its default (`fncall_prompt_type: "nous"`) writes the tools into
a system message itself, sends no `tools`, and parses the raw `<tool_call>` text in `content` on its own:
so a request without `tools` gets its `<tool_call>` blocks back as text (as vLLM does), never as
`tool_calls` the client would not read. `use_raw_api` is streaming only (`stream=True`,
`delta_stream=False`), and in that mode `chat` yields `Message` objects even for dict input, so the replies
are normalised to dicts here.
"""

from __future__ import annotations

import json

import pytest
from qwen_agent.llm import get_chat_model

from qwen_mlx.demo import SCRIPTS

BY_NAME = {script["name"]: script for script in SCRIPTS}
CALL = BY_NAME["tool_call"]
RESULT = BY_NAME["tool_result"]


def split_think(raw: str) -> tuple[str, str]:
    """A scripted assistant output `<think>\\nR\\n</think>\\n\\nA` -> (R, A)."""
    head, _, answer = raw.partition("</think>")
    return head.removeprefix("<think>").strip(), answer.strip()


def as_dicts(responses: list) -> list[dict]:
    return [r if isinstance(r, dict) else r.model_dump(exclude_none=True) for r in responses]


def chat(llm, messages: list, functions: list[dict]) -> list[dict]:
    *_, responses = llm.chat(messages=messages, functions=functions, stream=True)
    return as_dicts(responses)


@pytest.mark.parametrize("generate_cfg", [{"use_raw_api": True}, {}], ids=["use_raw_api", "nous"])
def test_function_calling_round_trip(demo_server: str, generate_cfg: dict) -> None:
    llm = get_chat_model(
        {
            "model": "demo",
            "model_server": f"{demo_server}/v1",
            "api_key": "EMPTY",
            "generate_cfg": {**generate_cfg, "temperature": 0},
        }
    )
    functions = [tool["function"] for tool in CALL["tools"]]
    assert CALL["tools"] == RESULT["tools"]
    messages: list[dict] = [dict(m) for m in CALL["messages"][:-1]]
    assert messages == [{"role": "user", "content": "What's the weather in Paris?"}]

    # Turn 1: the model thinks, then calls get_weather(city="Paris").
    responses = chat(llm, messages, functions)
    thinking, _ = split_think(CALL["messages"][-1]["content"])
    reasoning = [r["reasoning_content"] for r in responses if r.get("reasoning_content")]
    calls = [r for r in responses if r.get("function_call")]
    assert reasoning == [thinking], responses
    assert len(calls) == 1, responses
    assert calls[0]["function_call"]["name"] == "get_weather"
    assert json.loads(calls[0]["function_call"]["arguments"]) == {"city": "Paris"}
    assert calls[0]["extra"]["function_id"], calls[0]  # the server's tool_call id, echoed back next turn
    assert not any(r.get("content") for r in responses), responses

    # Turn 2: qwen-agent's history (reasoning, call) plus the tool's result -> the scripted answer.
    tool_message = RESULT["messages"][-2]
    assert tool_message["role"] == "tool"
    messages += responses
    messages.append({"role": "function", "name": "get_weather", "content": tool_message["content"]})
    responses = chat(llm, messages, functions)
    thinking, answer = split_think(RESULT["messages"][-1]["content"])
    assert [r.get("reasoning_content") for r in responses if r.get("reasoning_content")] == [thinking]
    assert not any(r.get("function_call") for r in responses), responses
    content = "".join(r.get("content") or "" for r in responses)
    assert content == answer, responses
    assert "18" in content and "sunny" in content
