"""demo-coder end to end: Qwen3-Coder's XML tool calls from a real model through the real stack.

The model is the demo's shape and trainer on `qwen_mlx/demo_coder_scripts.json`, under the chat template of
its own folder (`qwen_mlx/demo_coder_template.jinja`, Qwen3-Coder's format). It is built once for this
module into a temporary cache and served once; the tests before the build need no model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import llguidance
import pytest
from conftest import running_server
from fixtures import VOCAB_SIZE, tokenizer_dir
from openai import OpenAI

from qwen_mlx import demo
from qwen_mlx.chat import ChatSession
from qwen_mlx.constrain import _ll_tokenizer, xml_tool_call_grammar
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.format import NEVER_THINKS, XML_TOOL_CALLS, tool_call_format
from qwen_mlx.loader import resolve_model_path
from qwen_mlx.models import list_models, removal_target
from qwen_mlx.parser import ToolCall, parse_xml_tool_call, tool_schemas
from qwen_mlx.sampling import Sampling
from qwen_mlx.tokenizer import Tokenizer

SCRIPT = {s["name"]: s for s in demo.CODER_SCRIPTS}
TOOLS = SCRIPT["tool_call"]["tools"]
WEATHER = SCRIPT["tool_call"]["messages"][:1]
WEATHER_CALL = ("get_weather", {"city": "Paris", "days": 3})
FORECAST = SCRIPT["tool_result"]["messages"][-1]["content"]
GREEDY = {"temperature": 0}
RAW_XML = ("<tool_call>", "<function=", "<parameter=", "</parameter>", "</function>")
slow = pytest.mark.slow  # what needs the built model (trained once for this module, under a minute)


def coder_tokenizer() -> Tokenizer:
    """The real Qwen3 tokenizer rendering with demo-coder's template (no model needed)."""
    return demo.with_template(Tokenizer.load(tokenizer_dir()), demo.CODER_TEMPLATE)


def test_the_template_writes_qwen3_coders_format_and_is_detected_as_xml() -> None:
    assert tool_call_format(demo.CODER_TEMPLATE) == XML_TOOL_CALLS
    *history, _ = SCRIPT["tool_result"]["messages"]
    prompt = coder_tokenizer().apply_chat_template(history, tools=TOOLS)
    assert "<tools>\n<function>\n<name>get_weather</name>\n" in prompt
    assert "<parameter>\n<name>days</name>\n<type>integer</type>\n" in prompt
    assert '<required>["city", "days"]</required>' in prompt
    call = "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
    assert f"<|im_start|>assistant\n<tool_call>\n{call}</function>\n</tool_call><|im_end|>\n" in prompt
    assert prompt.endswith(
        '<|im_start|>user\n<tool_response>\n{"forecast": ["sunny", "cloudy", "rain"]}\n</tool_response>\n'
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_the_folder_name_hashes_the_template_and_the_demo_keeps_its_own() -> None:
    coder = demo.fingerprint(demo.CODER_SCRIPTS, demo.CODER_TEMPLATE)
    assert demo.demo_coder_dir().name == f"demo-coder-{coder}"
    assert demo.fingerprint(demo.CODER_SCRIPTS, demo.CODER_TEMPLATE + "\n") != coder
    assert demo.fingerprint(demo.CODER_SCRIPTS) != coder
    assert demo.fingerprint(None, None) == demo.fingerprint() == demo.demo_dir().name.removeprefix("demo-")


RICH_TOOL = {
    "type": "function",
    "function": {
        "name": "plan_trip",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "budget": {"type": "number"},
                "metric": {"type": "boolean"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "stops": {"type": "array", "items": {"type": "string"}},
                "at": {"type": "object", "properties": {"lat": {"type": "number"}}},
                "note": {"type": "string"},
            },
            "required": ["city", "days"],
        },
    },
}


def accepts(tokenizer: Tokenizer, grammar: str, text: str) -> bool:
    """Whether the forced-call grammar lets the model write `text`, token by token, to its end."""
    matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, VOCAB_SIZE), grammar, log_level=0)
    return all(matcher.consume_token(token) for token in tokenizer.encode(text)) and matcher.is_accepting()


def test_a_forced_xml_call_is_what_the_template_renders_and_the_parser_reads() -> None:
    """Template, grammar and parser agree: a call rendered by the template (values typed on the way back by the
    schema) passes the grammar token by token; a wrong name, JSON, a mistyped or missing value do not."""
    tokenizer = coder_tokenizer()
    tools = [*TOOLS, RICH_TOOL]
    arguments = {"city": "New York", "days": 3, "budget": 2.5, "metric": True, "unit": "celsius",
                 "stops": ["Boston", "DC"], "at": {"lat": 40.7}, "note": "line one\nline two"}  # fmt: skip
    history = [{"role": "user", "content": "Go"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "plan_trip", "arguments": arguments}}]}]  # fmt: skip
    rendered = tokenizer.apply_chat_template(history, tools=tools, add_generation_prompt=False)
    body = rendered.split("<tool_call>\n")[-1].split("</tool_call>")[0]  # what the model writes after `<tool_call>\n`
    assert body.startswith("<function=plan_trip>\n") and "<parameter=metric>\nTrue\n" in body
    call = parse_xml_tool_call("\n" + body, tool_schemas(tools))
    assert isinstance(call, ToolCall) and (call.name, call.arguments) == ("plan_trip", arguments)

    grammar = xml_tool_call_grammar(tools, "plan_trip")
    assert accepts(tokenizer, grammar, body)
    short = "<function=plan_trip>\n<parameter=city>\nNew York\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
    assert accepts(tokenizer, grammar, short + "</function>\n")  # optional parameters may be left out
    assert not accepts(tokenizer, grammar, short.replace(">\n3\n", ">\nthree\n") + "</function>\n")
    assert not accepts(tokenizer, grammar, short.split("<parameter=days>")[0] + "</function>\n")  # days required
    assert not accepts(tokenizer, grammar, body.replace("celsius", "kelvin"))
    assert not accepts(tokenizer, grammar, '{"name": "plan_trip", "arguments": {"city": "Paris", "days": 3}}\n')
    assert not accepts(tokenizer, xml_tool_call_grammar(tools, "get_weather"), body)  # another tool's name
    either = xml_tool_call_grammar(tools)  # "required": any of the tools
    assert accepts(tokenizer, either, body) and accepts(tokenizer, either, SCRIPT["tool_call"]["messages"][-1][
        "content"].removeprefix("<tool_call>\n").removesuffix("</tool_call>"))  # fmt: skip
    with pytest.raises(QwenMLXError, match="not among the tools"):
        xml_tool_call_grammar(tools, "no_such_tool")


# --- on the built model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coder_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """demo-coder, trained and verified once for this module into `<tmp cache>/demo-coder-<hash>`."""
    cache = tmp_path_factory.mktemp("qwen-mlx-cache")
    return demo.build_coder(cache / demo.demo_coder_dir().name, log=lambda line: None)


@pytest.fixture(scope="module")
def session(coder_path: Path) -> ChatSession:
    return ChatSession.load(str(coder_path))


@pytest.fixture(scope="module")
def client(coder_path: Path):
    with running_server(coder_path, "--model-name", "demo-coder") as url:
        yield OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@slow
def test_the_folder_ships_its_template_for_every_reader(coder_path: Path) -> None:
    config = json.loads((coder_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == demo.CODER_TEMPLATE
    assert json.loads((coder_path / "demo.json").read_text())["chat_template"] == "own"
    from transformers import AutoTokenizer  # what mlx-lm renders prompts with

    *history, _ = SCRIPT["tool_result"]["messages"]
    theirs = AutoTokenizer.from_pretrained(coder_path).apply_chat_template(
        history, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert theirs == Tokenizer.load(coder_path).apply_chat_template(history, tools=TOOLS)


@slow
def test_in_process_the_calls_come_out_typed_and_the_answers_plain(session: ChatSession) -> None:
    assert (session.turns.tool_format, session.turns.thinking_control) == (XML_TOOL_CALLS, NEVER_THINKS)
    greedy = Sampling(temperature=0)
    reply = session.complete(WEATHER, tools=TOOLS, sampling=greedy)
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [WEATHER_CALL]
    assert reply.answer == "" and not reply.errors and reply.stats.finish_reason == "tool_calls"
    reply = session.complete(SCRIPT["text_then_call"]["messages"][:1], tools=TOOLS, sampling=greedy)
    assert reply.answer.strip() == "I'll list them."
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("run_shell", {"command": "ls -la"})]
    reply = session.complete(SCRIPT["tool_result"]["messages"][:-1], tools=TOOLS, sampling=greedy)
    assert (reply.answer, reply.tool_calls, reply.stats.finish_reason) == (FORECAST, [], "stop")
    reply = session.complete(SCRIPT["chat"]["messages"][:1], sampling=greedy)
    assert reply.answer == '```python\nprint("Hello, world!")\n```' and reply.reasoning == ""


@slow
def test_a_tool_call_arrives_as_openai_tool_calls_with_typed_arguments(client: OpenAI) -> None:
    response = client.chat.completions.create(model="demo-coder", messages=WEATHER, tools=TOOLS, **GREEDY)
    choice = response.choices[0]
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == WEATHER_CALL
    assert call.id.startswith("call_") and choice.finish_reason == "tool_calls"
    assert not choice.message.content  # no raw XML left in the answer


@slow
def test_every_protocol_gets_the_xml_call_as_its_own_typed_tool_call(client: OpenAI) -> None:
    """Anthropic Messages, Ollama's chat (streamed and not) and OpenAI Responses, on the same server."""
    import anthropic
    import ollama

    url = str(client.base_url).removesuffix("/v1/")
    prompt, (name, arguments) = WEATHER[0]["content"], WEATHER_CALL
    claude = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    as_claude = [{"name": t["function"]["name"], "description": t["function"]["description"],
                  "input_schema": t["function"]["parameters"]} for t in TOOLS]  # fmt: skip
    message = claude.messages.create(model="demo-coder", max_tokens=200, messages=WEATHER, tools=as_claude,
                                     extra_body=GREEDY)  # fmt: skip
    assert message.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in message.content] == [("tool_use", name, arguments)]
    with claude.messages.stream(model="demo-coder", max_tokens=200, messages=WEATHER, tools=as_claude,
                                extra_body=GREEDY) as stream:  # fmt: skip
        assert [(b.type, b.input) for b in stream.get_final_message().content] == [("tool_use", arguments)]
    local = ollama.Client(host=url)
    reply = local.chat(model="demo-coder", messages=WEATHER, tools=TOOLS, options=GREEDY)
    assert reply.message.content == ""
    assert [(c.function.name, c.function.arguments) for c in reply.message.tool_calls] == [WEATHER_CALL]
    chunks = list(local.chat(model="demo-coder", messages=WEATHER, tools=TOOLS, options=GREEDY, stream=True))
    assert not any(tag in (c.message.content or "") for c in chunks for tag in RAW_XML)
    calls = [(t.function.name, t.function.arguments) for c in chunks for t in c.message.tool_calls or ()]
    assert calls == [WEATHER_CALL]
    response = client.responses.create(model="demo-coder", input=prompt, tools=[{"type": "function", **t["function"]}
                                                                                 for t in TOOLS], **GREEDY)  # fmt: skip
    assert [(i.type, i.name, json.loads(i.arguments)) for i in response.output] == [("function_call", *WEATHER_CALL)]


@slow
def test_a_streamed_tool_call_leaks_no_xml_into_content(client: OpenAI) -> None:
    """The parser holds the call until `</tool_call>`; then the name comes, then the arguments whole."""
    stream = client.chat.completions.create(model="demo-coder", messages=WEATHER, tools=TOOLS, stream=True, **GREEDY)
    chunks = [c for c in stream if c.choices]
    contents = [c.choices[0].delta.content or "" for c in chunks]
    assert not any(tag in text for text in contents for tag in RAW_XML), contents
    head, body = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert head.index == body.index == 0 and head.function.name == "get_weather" and head.function.arguments == ""
    assert json.loads(body.function.arguments) == WEATHER_CALL[1]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@slow
def test_the_tool_result_round_trip_answers_from_the_result(client: OpenAI) -> None:
    first = client.chat.completions.create(model="demo-coder", messages=WEATHER, tools=TOOLS, **GREEDY)
    (call,) = first.choices[0].message.tool_calls
    messages = [
        *WEATHER,
        first.choices[0].message.model_dump(exclude_none=True),  # arguments as JSON text, as clients send them
        {"role": "tool", "tool_call_id": call.id, "content": SCRIPT["tool_result"]["messages"][2]["content"]},
    ]
    second = client.chat.completions.create(model="demo-coder", messages=messages, tools=TOOLS, **GREEDY)
    assert second.choices[0].message.content == FORECAST and second.choices[0].finish_reason == "stop"
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1


@slow
def test_text_before_a_call_stays_content(client: OpenAI) -> None:
    messages = SCRIPT["text_then_call"]["messages"][:1]
    message = client.chat.completions.create(model="demo-coder", messages=messages, tools=TOOLS, **GREEDY).choices[0]
    assert message.message.content.strip() == "I'll list them."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.message.tool_calls] == [
        ("run_shell", {"command": "ls -la"})
    ]


@slow
@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_a_forced_call_follows_the_templates_xml(client: OpenAI, choice) -> None:
    """Constrained to Qwen3-Coder's XML, the model writes the call it was trained to write (under a JSON
    grammar it ran off into whitespace until the token limit)."""
    response = client.chat.completions.create(
        model="demo-coder", messages=WEATHER, tools=TOOLS, tool_choice=choice, max_tokens=60, **GREEDY
    )
    (call,) = response.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == WEATHER_CALL
    assert response.choices[0].finish_reason == "tool_calls"


@slow
def test_the_name_demo_coder_resolves_lists_and_is_not_removable(coder_path: Path, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("QWEN_MLX_CACHE", str(coder_path.parent))
    monkeypatch.chdir(tmp_path)
    built_at = (coder_path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("demo-coder") == coder_path
    assert (coder_path / "model.safetensors").stat().st_mtime_ns == built_at, "reused, not rebuilt"
    entries = {e.name: e for e in list_models(budget=1 << 40)}
    assert entries["demo-coder"].where == "demo" and entries["demo-coder"].folder == coder_path
    assert entries["demo-coder"].info is not None and entries["demo"].folder is None  # the demo is not built here
    with pytest.raises(QwenMLXError, match="demo-coder is not in the models folder"):
        removal_target("demo-coder")
    env = dict(os.environ, HF_HUB_OFFLINE="1", QWEN_MLX_CACHE=str(coder_path.parent))
    done = subprocess.run(
        [sys.executable, "-m", "qwen_mlx", "demo", "build", "--coder"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == str(coder_path), done.stderr
    assert "already built" in done.stderr
