"""`qwen-mlx serve` when things go wrong: every error a client can cause, against real servers on the demo model.

Each error is OpenAI's shape with the status a client expects; servers with special options are started
once per module (each costs a few seconds) and shared by the tests that need them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import running_server

API_KEY = "test-key-123"
ORIGIN = "http://example.test"
# Suppresses the end-of-turn ids (<|im_end|>, <|endoftext|>) so a held stream keeps generating.
NO_EOS = {"151645": -100, "151643": -100}


def chat(text: str = "Hello", **extra) -> dict:
    return {"model": "demo", "messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """The response is OpenAI's error shape with `status`; returns the inner error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.fixture(scope="module")
def client(demo_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=demo_server, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def guarded_server(demo_model_path: Path) -> Iterator[str]:
    """A server with an API key, a 1 MiB body cap and one CORS origin."""
    options = ("--model-name", "demo", "--api-key", API_KEY, "--max-body-mb", "1", "--cors-origin", ORIGIN)
    with running_server(demo_model_path, *options) as url:
        yield url


@pytest.fixture(scope="module")
def busy_server(demo_model_path: Path) -> Iterator[str]:
    """A server with one slot and no queue: a second concurrent request is refused."""
    with running_server(demo_model_path, "--model-name", "demo", "--max-batch", "1", "--max-waiting", "0") as url:
        yield url


# 400: bad JSON and bad values


@pytest.mark.parametrize(
    "content",
    [
        b'{"model": "demo", "messages": [',
        b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["truncated", "bad-utf8", "nested-too-deep"],
)
def test_invalid_json_is_400(client: httpx.Client, content: bytes):
    response = client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_json")


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        ({"n": 2}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": "0.5"}, "temperature"),
        ({"stream": 1}, "stream"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ],
    ids=[
        "temperature",
        "empty-messages",
        "wrong-role",
        "top-logprobs",
        "n",
        "max-tokens",
        "too-many-stops",
        "bool-as-count",
        "text-as-number",
        "number-as-bool",
        "overflowing-penalty",
    ],
)
def test_invalid_values_are_400(client: httpx.Client, change: dict, param: str):
    error = assert_error(client.post("/v1/chat/completions", json=chat(**change)), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param), error


@pytest.mark.parametrize("key", ["messages", "tools", "add_generation_prompt"])
def test_chat_template_kwargs_may_not_override_the_request(client: httpx.Client, key: str):
    body = chat(chat_template_kwargs={key: 1})
    error = assert_error(client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "chat_template_kwargs" and key in error["message"], error


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\udcff"}], "max_tokens": 2}'),
        ("/v1/completions", b'{"prompt": "a\\udcff", "max_tokens": 2}'),
    ],
    ids=["chat", "completions"],
)
def test_lone_surrogate_is_400(client: httpx.Client, path: str, body: bytes):
    """Valid JSON, but not text any tokenizer can take."""
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert_error(response, 400)


USER = [{"role": "user", "content": "Hello"}]
OLLAMA_FIELDS = ("options.num_predict", "options.temperature")
# One small request of every protocol, and where each keeps its token cap and temperature.
PROTOCOLS = {
    "/v1/chat/completions": (chat(), "max_tokens", "temperature"),
    "/v1/completions": ({"model": "demo", "prompt": "Hello", "max_tokens": 4}, "max_tokens", "temperature"),
    "/v1/responses": ({"model": "demo", "input": "Hello", "max_output_tokens": 4}, "max_output_tokens", "temperature"),
    "/v1/messages": ({"model": "demo", "messages": USER, "max_tokens": 4}, "max_tokens", "temperature"),
    "/api/chat": ({"model": "demo", "messages": USER, "stream": False}, *OLLAMA_FIELDS),
    "/api/generate": ({"model": "demo", "prompt": "Hello", "stream": False}, *OLLAMA_FIELDS),
}


def _with(body: dict, field: str, value) -> dict:
    """`body` with `field` (dotted: one level of nesting) set to `value`."""
    head, _, rest = field.partition(".")
    return {**body, head: {**(body.get(head) or {}), rest: value}} if rest else {**body, head: value}


def error_message(response: httpx.Response, status: int = 400) -> str:
    """The message of an error in any protocol's shape (OpenAI's, Anthropic's, Ollama's)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    return error if isinstance(error, str) else error["message"]


@pytest.mark.parametrize("path", list(PROTOCOLS))
@pytest.mark.parametrize("wrong", ["bool-as-count", "text-as-number"])
def test_wrong_types_are_400_in_every_protocol(client: httpx.Client, path: str, wrong: str):
    """Not coerced, as OpenAI answers them: `true` is no token count, "0.5" no temperature."""
    body, count, temperature = PROTOCOLS[path]
    field, value = (count, True) if wrong == "bool-as-count" else (temperature, "0.5")
    message = error_message(client.post(path, json=_with(body, field, value)))
    assert message.startswith(f"{field}:"), message


def test_chat_template_kwargs_are_strict_too(client: httpx.Client):
    body = chat(chat_template_kwargs={"enable_thinking": "yes"})
    error = assert_error(client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "chat_template_kwargs.enable_thinking", error


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (
            "/v1/messages",
            {
                "model": "demo",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "is_error": 1}]}],
            },
            "messages.0.content.0.is_error",
        ),
        (
            "/v1/responses",
            {"model": "demo", "input": "Hello", "tools": [{"type": "function", "name": "f", "strict": "yes"}]},
            "tools.0.strict",
        ),
    ],
    ids=["anthropic-block", "responses-tool"],
)
def test_blocks_and_tools_are_strict_too(client: httpx.Client, path: str, body: dict, field: str):
    message = error_message(client.post(path, json=body))
    assert message.startswith(f"{field}:"), message


@pytest.mark.parametrize(
    ("content", "param"),
    [
        (b'{"messages": [{"role": "user", "content": "hi"}], "tool_choice": "bogus"}', "tool_choice"),
        (b'{"messages": [{"role": "user", "content": 5}]}', "messages.0.content"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stop": 3}', "stop"),
    ],
    ids=["literal-or-object", "text-or-parts", "text-or-list"],
)
def test_a_field_of_several_types_is_named_as_sent(client: httpx.Client, content: bytes, param: str):
    """pydantic names the member of the union that failed (`tool_choice.literal['none','auto','required']`);
    the client's field is what the error names."""
    response = client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    error = assert_error(response, 400)
    assert error["param"] == param and error["message"].startswith(f"{param}: "), error


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}})),
        ("/v1/chat/completions", chat(tool_choice="required")),
        (
            "/v1/responses",
            {
                "model": "demo",
                "input": "Hello",
                "tools": [{"type": "function", "name": "get_weather"}],
                "tool_choice": {"type": "function", "name": "nope"},
            },
        ),
        ("/v1/responses", {"model": "demo", "input": "Hello", "tool_choice": {"type": "function"}}),
    ],
    ids=["chat-unknown-name", "chat-required-without-tools", "responses-unknown-name", "responses-no-name"],
)
def test_a_bad_tool_choice_is_named_in_param(client: httpx.Client, path: str, body: dict):
    error = assert_error(client.post(path, json=body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == "tool_choice", error


def test_a_bad_tool_choice_in_anthropics_shape(client: httpx.Client):
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    body = {"model": "demo", "messages": USER, "max_tokens": 4, "tools": tools, "tool_choice": {"type": "tool"}}
    response = client.post("/v1/messages", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["message"].startswith("tool_choice"), response.text


def test_missing_messages_is_400(client: httpx.Client):
    assert_error(client.post("/v1/chat/completions", json={"model": "demo"}), 400)


def test_context_overflow_is_400_with_token_counts(client: httpx.Client, demo_model_path: Path):
    import json

    context = json.loads((demo_model_path / "config.json").read_text())["max_position_embeddings"]
    response = client.post("/v1/chat/completions", json=chat(" hello" * (context + 100)))
    error = assert_error(response, 400, "context_length_exceeded")
    assert str(context) in error["message"], error
    prompt_tokens = [int(word) for word in error["message"].replace(":", " ").split() if word.isdigit()]
    assert any(n > context for n in prompt_tokens), error


# 404


def test_unknown_model_is_404(client: httpx.Client):
    error = assert_error(client.post("/v1/chat/completions", json=chat(model="nope")), 404, "model_not_found")
    assert "nope" in error["message"]


def test_unknown_model_card_is_404(client: httpx.Client):
    assert_error(client.get("/v1/models/nope"), 404, "model_not_found")


def test_unknown_route_is_404(client: httpx.Client):
    assert_error(client.get("/v1/nowhere"), 404)


# 401


def test_missing_key_is_401(guarded_server: str):
    response = httpx.post(guarded_server + "/v1/chat/completions", json=chat(), timeout=60)
    assert_error(response, 401, "invalid_api_key")
    assert_error(httpx.get(guarded_server + "/v1/models", timeout=60), 401)


def test_wrong_key_is_401(guarded_server: str):
    for headers in ({"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
        response = httpx.post(guarded_server + "/v1/chat/completions", json=chat(), headers=headers, timeout=60)
        assert_error(response, 401, "invalid_api_key")


@pytest.mark.parametrize(
    "headers", [{"Authorization": f"Bearer {API_KEY}"}, {"x-api-key": API_KEY}], ids=["bearer", "x-api-key"]
)
def test_right_key_is_accepted(guarded_server: str, headers: dict):
    response = httpx.post(guarded_server + "/v1/chat/completions", json=chat(), headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"


def test_health_needs_no_key(guarded_server: str):
    response = httpx.get(guarded_server + "/health", timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ok"
    # Clients probe the root before they send their key (Claude Code's HEAD /, Ollama apps' GET /).
    assert httpx.head(guarded_server + "/", timeout=60).status_code == 200
    assert httpx.get(guarded_server + "/api/tags", timeout=60).json() == {
        "error": "Missing API key: send Authorization: Bearer KEY"
    }


def test_every_protocol_gets_its_own_401_shape(guarded_server: str):
    anthropic = httpx.post(guarded_server + "/v1/messages", json={}, timeout=60)
    assert anthropic.status_code == 401 and anthropic.json()["error"]["type"] == "authentication_error"
    assert anthropic.json()["type"] == "error"
    responses = httpx.post(guarded_server + "/v1/responses", json={}, timeout=60)
    assert_error(responses, 401, "invalid_api_key")


# 413


def test_body_over_the_cap_is_413(guarded_server: str):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(
        guarded_server + "/v1/chat/completions", json=chat("x" * (1 << 20) + "x"), headers=headers, timeout=60
    )
    assert_error(response, 413, "request_too_large")


def test_chunked_body_over_the_cap_is_413(guarded_server: str):
    """No content-length to trust: the cap holds while the body streams in."""

    def body() -> Iterator[bytes]:
        yield b'{"model": "demo", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"x" * (64 << 10)
        yield b'"}]}'

    headers = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    response = httpx.post(guarded_server + "/v1/chat/completions", content=body(), headers=headers, timeout=60)
    assert_error(response, 413, "request_too_large")


# CORS


def test_cors_preflight_allows_the_configured_origin(guarded_server: str):
    headers = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    response = httpx.options(guarded_server + "/v1/chat/completions", headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers.get("access-control-allow-origin") == ORIGIN


def test_no_cors_headers_without_an_origin_option(client: httpx.Client):
    headers = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    response = client.options("/v1/chat/completions", headers=headers)
    assert "access-control-allow-origin" not in response.headers
    response = client.get("/v1/models", headers={"Origin": ORIGIN})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


# 429 and disconnects


def _hold_stream(client: httpx.Client):
    """A streaming chat request that keeps its slot busy until the context manager closes it."""
    body = chat(stream=True, max_tokens=20000, logit_bias=NO_EOS)
    return client.stream("POST", "/v1/chat/completions", json=body)


def _wait_for_success(client: httpx.Client, seconds: float = 5) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while True:
        response = client.post("/v1/chat/completions", json=chat())
        if response.status_code != 429 or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def test_overloaded_is_429_and_the_server_recovers(busy_server: str):
    with httpx.Client(base_url=busy_server, timeout=60) as c:
        with _hold_stream(c) as held:
            assert held.status_code == 200
            lines = held.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            error = assert_error(c.post("/v1/chat/completions", json=chat()), 429, "server_busy")
            assert error["type"] == "rate_limit_error"
            stream_body = chat(stream=True)
            assert_error(c.post("/v1/chat/completions", json=stream_body), 429, "server_busy")
        response = _wait_for_success(c)
        assert response.status_code == 200, response.text


def test_a_client_that_disconnects_frees_its_slot(busy_server: str):
    with httpx.Client(base_url=busy_server, timeout=60) as c:
        assert _wait_for_success(c).status_code == 200  # the slot starts free
        with _hold_stream(c) as held:
            assert held.status_code == 200
            assert next(line for line in held.iter_lines() if line.startswith("data: "))
        response = _wait_for_success(c)
        assert response.status_code == 200, response.text
        assert c.get("/health").json()["in_flight"] == 0


def test_non_streamed_client_that_disconnects_frees_its_slot(busy_server: str):
    with httpx.Client(base_url=busy_server, timeout=60) as c:
        assert _wait_for_success(c).status_code == 200
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/chat/completions", json=chat(max_tokens=20000, logit_bias=NO_EOS), timeout=1.5)
        response = _wait_for_success(c)
        assert response.status_code == 200, response.text


# The server survives garbage


def test_server_survives_a_burst_of_bad_requests(client: httpx.Client):
    garbage = [
        ("POST", "/v1/chat/completions", b"\xff\xfe\x00garbage"),
        ("POST", "/v1/chat/completions", b"[]"),
        ("POST", "/v1/chat/completions", b"null"),
        ("POST", "/v1/chat/completions", b'{"messages": "hello"}'),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}'),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user"}], "max_tokens": -3}'),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"a": 1}}'),
        (
            "POST",
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"999999999": 1}}',
        ),
        (
            "POST",
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}',
        ),
        ("POST", "/v1/completions", b'{"prompt": []}'),
        ("POST", "/v1/completions", b'{"prompt": [-1, 5]}'),
        ("POST", "/v1/completions", b'{"prompt": ""}'),
        ("GET", "/v1/chat/completions", b""),
        ("DELETE", "/v1/models", b""),
        ("POST", "/health", b"{}"),
    ]
    wrong_method = client.delete("/v1/models")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "GET"
    for method, path, content in garbage:
        response = client.request(method, path, content=content, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (method, path, content, response.status_code, response.text)
        assert_error(response, response.status_code)
    response = client.post("/v1/chat/completions", json=chat())
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


# Startup refusals: one readable line on stderr, exit status 1


def _serve(*options: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "QWEN_MLX_API_KEY"}
    command = [sys.executable, "-m", "qwen_mlx", "serve", *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_port_in_use_is_one_line_and_exit_1(demo_model_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve("--model", str(demo_model_path), "--port", str(port))
    assert result.returncode == 1, result.stderr
    line = _one_line(result.stderr)
    assert str(port) in line and "in use" in line, line


def test_public_host_without_a_key_is_refused(demo_model_path: Path):
    result = _serve("--model", str(demo_model_path), "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 1, result.stderr
    line = _one_line(result.stderr)
    assert "--api-key" in line, line
