"""Load on the endpoint: 16 concurrent streaming clients, 64 requests, each answer equal to the sequential one.

Continuous batching must not change what a greedy request gets: every streamed reply (reasoning and
answer text joined from the deltas) equals the same request answered alone and non-streamed by the same
server. No timing assertions; `bench/bench_serve.py` measures throughput.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from openai import AsyncOpenAI, OpenAI

CLIENTS = 16
REQUESTS = 64
# Every demo answer ends before this (the longest, "Is 91 a prime number?", is 88 tokens).
MAX_TOKENS = 96
# (prompt, extra request body): the demo scripts, one of them in non-thinking mode as it was trained.
PROMPTS: list[tuple[str, dict[str, Any]]] = [
    ("What is 2 + 3?", {}),
    ("Hi!", {}),
    ("Is 91 a prime number?", {}),
    ("Write hello world in Python.", {}),
    ("What is the capital of France?", {"chat_template_kwargs": {"enable_thinking": False}}),
]


def request(index: int) -> dict[str, Any]:
    """The `index`-th request's parameters; identical for the sequential and the concurrent run."""
    prompt, extra_body = PROMPTS[index % len(PROMPTS)]
    return {
        "model": "demo",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "extra_body": extra_body,
    }


async def stream_one(client: AsyncOpenAI, index: int) -> dict[str, Any]:
    include_usage = index % 3 == 0
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = await client.chat.completions.create(**request(index), stream=True, **options)
    reasoning, content, finish, usage, usage_chunks = [], [], None, None, 0
    async for chunk in stream:
        if chunk.usage is not None:
            usage, usage_chunks = chunk.usage, usage_chunks + 1
        for choice in chunk.choices:
            reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
            content.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return {
        "index": index,
        "include_usage": include_usage,
        "reasoning": "".join(reasoning),
        "content": "".join(content),
        "finish": finish,
        "usage": usage,
        "usage_chunks": usage_chunks,
    }


async def run_clients(base_url: str) -> list[dict[str, Any]]:
    """CLIENTS clients, each sending its share of the REQUESTS one after another."""
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(REQUESTS):
        queue.put_nowait(index)
    results: list[dict[str, Any]] = []

    async def worker() -> None:
        while not queue.empty():
            results.append(await stream_one(client, queue.get_nowait()))

    try:
        await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    finally:
        await client.close()
    return results


@pytest.fixture(scope="module")
def sequential(demo_server: str) -> list[dict[str, Any]]:
    """Each distinct request answered alone, non-streamed, by the same server."""
    client = OpenAI(base_url=f"{demo_server}/v1", api_key="unused", max_retries=0, timeout=120)
    answers = []
    for index in range(len(PROMPTS)):
        response = client.chat.completions.create(**request(index))
        message = response.choices[0].message
        answers.append(
            {
                "reasoning": getattr(message, "reasoning_content", None) or "",
                "content": message.content or "",
                "finish": response.choices[0].finish_reason,
                "usage": response.usage,
            }
        )
    return answers


def test_concurrent_streams_match_sequential(demo_server: str, sequential: list[dict[str, Any]]):
    assert all(answer["reasoning"] + answer["content"] for answer in sequential), sequential
    results = asyncio.run(run_clients(demo_server))

    assert sorted(result["index"] for result in results) == list(range(REQUESTS))
    mismatched = []
    for result in sorted(results, key=lambda r: r["index"]):
        expected = sequential[result["index"] % len(PROMPTS)]
        got = (result["reasoning"], result["content"], result["finish"])
        if got != (expected["reasoning"], expected["content"], expected["finish"]):
            mismatched.append((result["index"], got, expected))
    assert not mismatched, f"{len(mismatched)} of {REQUESTS} differ from the sequential answer: {mismatched[:3]}"

    with_usage = [result for result in results if result["include_usage"]]
    assert with_usage
    for result in results:
        assert result["usage_chunks"] == (1 if result["include_usage"] else 0), result
    for result in with_usage:
        expected = sequential[result["index"] % len(PROMPTS)]["usage"]
        usage = result["usage"]
        assert usage.prompt_tokens == expected.prompt_tokens
        assert usage.completion_tokens == expected.completion_tokens
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
