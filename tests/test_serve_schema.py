"""Property tests of `qwen-mlx serve` from its own `/openapi.json`: whatever schemathesis sends, no 5xx.

Positive and negative cases, a bounded number per operation; generating requests get a small
`max_tokens` so each case stays cheap on a slow CPU (the check is about validation, not generation).
Hypothesis runs inside each test (rather than `schemathesis.pytest.from_fixture`, which breaks on
pytest 9) because the schema only exists once the session's server is up.
"""

from __future__ import annotations

import pytest
import schemathesis
from fixtures import SERVED_ROUTES as OPERATIONS
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

MAX_EXAMPLES = {"GET": 10, "DELETE": 10, "POST": 25}
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def api_schema(demo_server: str):
    return schemathesis.openapi.from_url(demo_server + "/openapi.json")


def test_the_schema_lists_every_route(api_schema):
    listed = {(op.method.upper(), op.path) for op in (r.ok() for r in api_schema.get_all_operations())}
    assert listed == set(OPERATIONS)


# Negative cases need an input that can be wrong: only the request bodies have one.
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_no_server_errors(api_schema, method: str, path: str, mode: GenerationMode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES[method],
        deadline=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        body = case.body
        if isinstance(body, dict) and (path.endswith("completions") or path == "/v1/messages"):
            if body.get("max_tokens") is None or isinstance(body["max_tokens"], int):  # None: no cap at all
                body["max_tokens"] = MAX_TOKENS
            body.pop("max_completion_tokens", None)
        generates = path in ("/api/chat", "/api/generate")
        if isinstance(body, dict) and generates and isinstance(body.get("options") or {}, dict):
            body["options"] = {**(body.get("options") or {}), "num_predict": MAX_TOKENS}
        if isinstance(body, dict) and path == "/v1/responses":
            body["max_output_tokens"] = MAX_TOKENS
        case.call_and_validate(checks=[not_a_server_error], timeout=60)

    check()
