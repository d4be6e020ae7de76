"""Fuzzing every route of `qwen-mlx serve` in-process: whatever schemathesis sends, no 5xx and nothing but JSON.

The app runs over ASGI in this process (no sockets, no server start) with the tiny random-weight checkpoint
behind it: its 64-token context and a 4-token default keep every generated reply short, so a case costs
milliseconds. Each operation gets a fixed, derandomized number of positive cases, and the routes that read a
body as many negative ones. A body is JSON by the letter (no `NaN`, no `Infinity`); a stream is SSE or
NDJSON whose every event is such JSON. `/openapi.json` itself documents the statuses really sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fixtures import SERVED_ROUTES as OPERATIONS
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from qwen_mlx.loader import load_model
from qwen_mlx.scheduler import Scheduler
from qwen_mlx.server import Settings, create_app
from qwen_mlx.tokenizer import Tokenizer

EXAMPLES = {"GET": 8, "DELETE": 8, "POST": 12}
MAX_TOKENS = 4
BASE_URL = "http://127.0.0.1"  # a loopback Host, as a local client sends
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"
]


@pytest.fixture(scope="module")
def app(checkpoint) -> Iterator:
    path: Path = checkpoint("dense_tied")

    def load():
        loaded = load_model(path)
        return loaded, Tokenizer.load(loaded.path)

    scheduler = Scheduler(load, default_max_tokens=4)
    scheduler.start()
    try:
        yield create_app(scheduler, Settings(model_id="tiny"))
    finally:
        scheduler.stop()


@pytest.fixture(scope="module")
def api_schema(app):
    schema = schemathesis.openapi.from_dict(json.loads(json.dumps(app.openapi())))
    schema.app = app
    return schema


def cheap(body: dict) -> None:
    """A valid body, made to reach generation and keep it short: the served model's name (unknown names are
    the negative cases' 404s) and a few tokens at most."""
    if "model" in body:
        body["model"] = "tiny"
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if isinstance(body.get(field), int) and not isinstance(body[field], bool):
            body[field] = min(body[field], MAX_TOKENS)
    options = body.get("options")
    if isinstance(options, dict) and isinstance(options.get("num_predict"), int):
        options["num_predict"] = min(options["num_predict"], MAX_TOKENS)


def _not_a_number(constant: str):
    raise ValueError(f"{constant} is not JSON")


def strict_json(text: str):
    """`json.loads`, refusing what Python's reader lets through but JSON has not: NaN and the infinities."""
    return json.loads(text, parse_constant=_not_a_number)


def assert_json_body(response) -> None:
    """The body is JSON; an SSE stream's every `data:` is (but `[DONE]`); an NDJSON stream's every line is."""
    kind = ",".join(response.headers.get("content-type", []))  # schemathesis keeps each header's values
    text = response.text
    if kind.startswith("text/event-stream"):
        for line in text.splitlines():
            if line.startswith("data:"):
                if line[5:].strip() != "[DONE]":
                    strict_json(line[5:])
            else:
                assert not line or line.startswith(("event:", ":")), line
    elif kind.startswith("application/x-ndjson"):
        for line in filter(None, text.splitlines()):
            strict_json(line)
    else:
        assert kind.startswith("application/json"), (kind, text[:200])
        strict_json(text)


def test_the_schema_lists_every_route(api_schema):
    listed = {(op.method.upper(), op.path) for op in (r.ok() for r in api_schema.get_all_operations())}
    assert listed == set(OPERATIONS)


def test_the_schema_documents_the_statuses_sent(app):
    schema = app.openapi()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            statuses = set(operation["responses"])
            assert "422" not in statuses, (method, path)  # validation errors are 400s here
            assert "500" in statuses, (method, path)
            if path != "/health":
                assert "401" in statuses, (method, path)
            if method == "post":
                assert {"400", "404", "413"} <= statuses, (method, path)
            error = operation["responses"]["500"]["content"]["application/json"]["schema"]["$ref"]
            expected = "Anthropic" if path.startswith("/v1/messages") else "Ollama" if path[:5] == "/api/" else ""
            if expected and not path.startswith("/api/v0/"):
                assert error.endswith(f"/{expected}Error"), (path, error)
            else:
                assert error.endswith("/OpenAIError"), (path, error)
    generating = {p for p, ops in schema["paths"].items() if "429" in ops.get("post", {}).get("responses", {})}
    assert generating == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/messages",
        "/v1/responses",
        "/api/chat",
        "/api/generate",
    }
    assert not {"HTTPValidationError", "ValidationError"} & set(schema["components"]["schemas"])


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_no_server_errors_and_only_json(api_schema, method: str, path: str, mode: GenerationMode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES[method],
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
            cheap(case.body)
        response = case.call(base_url=BASE_URL)
        assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
        assert_json_body(response)

    check()
