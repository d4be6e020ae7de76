"""`qwen-mlx serve` of several models, as LM Studio serves them: a request's `model` picks one, it loads just
in time, the least recently used idle model makes room under the memory budget, `--ttl` unloads idle ones,
and a model that fails to load fails only its own request. Three tiny real checkpoints (two float32 ones,
one bfloat16) stand in a models folder of the test's own; the budget holds any two of them, never three."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import httpx
import ollama
import pytest
from conftest import SERVERS, running_server
from openai import OpenAI

from qwen_mlx.registry import GIB, Registry, ServedModel, shape_facts
from qwen_mlx.wire import APIError

MODELS = {"tiny-a": "dense_tied", "tiny-b": "dense_untied", "tiny-c": "dense_bf16"}
BROKEN = "tiny-broken"  # config.json says 3 layers, the weights hold 2: it lists, and fails to load
TIMEOUT_S = 120
USER = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def homes(checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A qwen-mlx cache whose models folder holds the three models and the broken one; an empty Hub cache."""
    root = tmp_path_factory.mktemp("serve-models")
    models = root / "qwen-mlx" / "models"
    for name, variant in MODELS.items():
        shutil.copytree(checkpoint(variant), models / name, copy_function=os.link)
    shutil.copytree(checkpoint("dense_tied"), models / BROKEN, copy_function=os.link)
    config = json.loads((models / BROKEN / "config.json").read_text())
    (models / BROKEN / "config.json").unlink()  # a new file, not a write through the link
    (models / BROKEN / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))
    (root / "hub").mkdir()
    return {"QWEN_MLX_CACHE": str(root / "qwen-mlx"), "HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1"}


def folder(homes: dict[str, str], name: str) -> Path:
    return Path(homes["QWEN_MLX_CACHE"]) / "models" / name


def two_of_three(homes: dict[str, str]) -> int:
    """A budget in bytes that holds the two largest of the three models but not all three."""
    sizes = sorted(shape_facts(folder(homes, name))[0] for name in MODELS)
    assert sizes[0] > 0.1 * sizes[-1]
    return sizes[1] + sizes[2] + sizes[0] // 2


@contextlib.contextmanager
def serving(*options: str, env: dict[str, str]) -> Iterator[tuple[str, list[str]]]:
    """`qwen-mlx serve OPTIONS` on a free loopback port: (base URL, its stderr lines so far and to come)."""
    with running_server(None, *options, env=env) as url:
        yield url, SERVERS[url][1]


def loaded(url: str) -> list[str]:
    return sorted(m["id"] for m in httpx.get(f"{url}/api/ps", timeout=TIMEOUT_S).json()["models"])


def count(lines: list[str], text: str) -> int:
    return sum(text in line for line in lines)


@pytest.fixture(scope="module")
def server(homes) -> Iterator[tuple[str, list[str]]]:
    """One server of every model `list` shows (no --model), under a budget that holds two of the three."""
    budget = two_of_three(homes) / GIB
    with serving("--memory-budget", f"{budget:.6f}", env=homes) as running:
        yield running


def test_every_model_is_listed_and_none_is_loaded_until_asked_for(server):
    url, _ = server
    ids = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=TIMEOUT_S).json()["data"]]
    assert {*MODELS, BROKEN, "demo"} <= set(ids)
    tags = {m["name"] for m in httpx.get(f"{url}/api/tags", timeout=TIMEOUT_S).json()["models"]}
    assert {f"{name}:latest" for name in MODELS} <= tags
    cards = {c["id"]: c for c in httpx.get(f"{url}/api/v0/models", timeout=TIMEOUT_S).json()["data"]}
    assert cards["tiny-a"]["state"] == "not-loaded" and cards["tiny-a"]["max_context_length"] == 64
    assert loaded(url) == []


def test_a_request_mix_evicts_and_reloads_without_an_error(server, homes):
    """Interleaved and concurrent requests, streamed and not, over the OpenAI, Ollama and Anthropic APIs: the
    least recently used idle model makes room, each reload answers as before (greedy), no request fails."""
    url, lines = server
    openai = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    llama = ollama.Client(host=url, timeout=TIMEOUT_S)

    def chat(model: str) -> str:
        reply = openai.chat.completions.create(model=model, messages=USER, max_tokens=6, temperature=0)
        assert reply.model == model
        return reply.choices[0].message.content

    def streamed(model: str) -> str:
        chunks = openai.chat.completions.create(model=model, messages=USER, max_tokens=6, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def ollama_chat(model: str, stream: bool) -> str:
        options = {"temperature": 0, "num_predict": 6}
        if not stream:
            return llama.chat(model=model, messages=USER, options=options, think=True).message.content
        parts = llama.chat(model=model, messages=USER, options=options, think=True, stream=True)
        return "".join(p.message.content or "" for p in parts)

    first = {"tiny-a": chat("tiny-a")}
    assert loaded(url) == ["tiny-a"]
    first["tiny-b"] = ollama_chat("tiny-b", stream=True)
    assert loaded(url) == ["tiny-a", "tiny-b"]
    first["tiny-c"] = streamed("tiny-c")  # tiny-a is the least recently used: it makes room
    assert loaded(url) == ["tiny-b", "tiny-c"]
    assert count(lines, "unloaded tiny-a (to make room for tiny-c)") == 1
    claude = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    message = claude.messages.create(model="tiny-a", max_tokens=6, messages=USER)
    assert message.model == "tiny-a" and message.stop_reason in ("end_turn", "max_tokens")
    assert loaded(url) == ["tiny-a", "tiny-c"]

    # Concurrent: each model wanted by several requests at once, more than the budget holds together.
    calls = [(chat, m) for m in MODELS] + [(streamed, m) for m in MODELS] + [(ollama_chat, m) for m in MODELS]
    calls = calls * 2
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [
            (model, pool.submit(call, model, *((i % 2 == 0,) if call is ollama_chat else ())))
            for i, (call, model) in enumerate(calls)
        ]
        replies = [(model, future.result()) for model, future in futures]
    for model, reply in replies:
        assert reply == first[model], (model, reply)  # the same model, reloaded, answers as before
    assert len(loaded(url)) <= 2
    ps = httpx.get(f"{url}/api/ps", timeout=TIMEOUT_S).json()["models"]
    assert sum(m["size"] for m in ps) <= two_of_three(homes)
    assert count(lines, "could not load") == 0
    for name in MODELS:
        assert count(lines, f"loaded {name} in ") >= 1
    assert count(lines, "qwen-mlx: unloaded") >= 2
    assert all(re.search(r"loaded \S+ in \d+\.\d s", line) for line in lines if "qwen-mlx: loaded" in line)


def test_a_model_that_fails_to_load_fails_only_its_request(server):
    url, lines = server
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": BROKEN, "messages": USER}, timeout=TIMEOUT_S)
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["code"] == "model_load_failed" and error["message"].startswith(f"could not load the model '{BROKEN}'")
    assert "\n" not in error["message"] and "Traceback" not in "".join(lines)
    ollama_error = httpx.post(f"{url}/api/generate", json={"model": BROKEN, "prompt": "hi"}, timeout=TIMEOUT_S)
    assert ollama_error.status_code == 500 and "could not load the model" in ollama_error.json()["error"]
    unknown = httpx.post(f"{url}/v1/chat/completions", json={"model": "nope", "messages": USER}, timeout=TIMEOUT_S)
    assert unknown.status_code == 404 and "GET /v1/models lists them" in unknown.json()["error"]["message"]
    again = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny-a", "messages": USER, "max_tokens": 3},
                       timeout=TIMEOUT_S)  # fmt: skip
    assert again.status_code == 200, again.text
    assert BROKEN not in loaded(url)


def test_ttl_unloads_idle_models_and_the_next_request_loads_again(homes):
    """Several --model paths (only those are served) and --ttl 1: an idle model leaves `/api/ps`, a new
    request loads it again."""
    paths = [str(folder(homes, name)) for name in MODELS]
    options = [part for path in paths for part in ("--model", path)]
    with serving(*options, "--ttl", "1", env=homes) as (url, lines):
        assert sorted(m["id"] for m in httpx.get(f"{url}/v1/models", timeout=TIMEOUT_S).json()["data"]) == sorted(
            MODELS
        )
        body = {"model": "tiny-b", "messages": USER, "max_tokens": 3}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT_S).status_code == 200
        assert loaded(url) == ["tiny-b"]
        deadline = time.monotonic() + 20
        while loaded(url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert loaded(url) == []
        assert count(lines, "unloaded tiny-b (idle") == 1
        reply = httpx.post(f"{url}/api/chat", json={**body, "stream": False}, timeout=TIMEOUT_S)
        assert reply.status_code == 200 and reply.json()["done"], reply.text
        assert count(lines, "loaded tiny-b in ") == 2


# --- the registry itself: who waits, who gets the 503 -------------------------------------------------------


def registry_of(homes, budget: int, **options) -> Registry:
    from qwen_mlx.loader import load_model
    from qwen_mlx.scheduler import Scheduler
    from qwen_mlx.tokenizer import Tokenizer

    def make_scheduler(model: ServedModel) -> Scheduler:
        def load():
            loaded = load_model(model.source)
            return loaded, Tokenizer.load(loaded.path)

        return Scheduler(load)

    models = []
    for name in MODELS:
        memory, context = shape_facts(folder(homes, name))
        models.append(ServedModel(name, str(folder(homes, name)), folder(homes, name), memory=memory,
                                  context_length=context))  # fmt: skip
    return Registry(models, make_scheduler, budget=budget, log=lambda line: None, **options)


def test_a_load_waits_for_a_busy_model_never_unloads_it_and_gives_up_with_a_503(homes):
    """With both loaded models answering requests, a third waits; once one of them is done, it makes room.
    When none is done within the wait, the request gets a 503; a model past the whole budget gets it at once."""
    registry = registry_of(homes, two_of_three(homes))

    async def scenario():
        done = {name: asyncio.Event() for name in MODELS}
        got = {name: asyncio.Event() for name in MODELS}

        async def request(name):
            with registry.holding():
                await registry.get(name)
                got[name].set()
                await done[name].wait()

        tasks = {name: asyncio.create_task(request(name)) for name in ("tiny-a", "tiny-b")}
        await got["tiny-a"].wait()
        await got["tiny-b"].wait()
        tasks["tiny-c"] = asyncio.create_task(request("tiny-c"))
        await asyncio.sleep(1.0)
        assert not got["tiny-c"].is_set()  # no idle model to unload: it waits
        assert {m.name for m in registry.loaded()} == {"tiny-a", "tiny-b"}
        done["tiny-b"].set()
        await asyncio.wait_for(got["tiny-c"].wait(), TIMEOUT_S)
        assert {m.name for m in registry.loaded()} == {"tiny-a", "tiny-c"}  # tiny-a is busy: it stays

        registry.load_wait_s = 0.3  # tiny-a and tiny-c still busy: tiny-b waits that long, then gives up
        with pytest.raises(APIError) as busy, registry.holding():
            await registry.get("tiny-b")
        assert busy.value.status == 503 and busy.value.code == "model_busy"
        assert "are all answering requests: try again shortly" in busy.value.message
        assert {m.name for m in registry.loaded()} == {"tiny-a", "tiny-c"}
        for event in done.values():
            event.set()
        await asyncio.gather(*tasks.values())
        assert not any(m.holds for m in registry.models)

    try:
        asyncio.run(scenario())
    finally:
        registry.close()
    small = registry_of(homes, 1 << 20)
    with pytest.raises(APIError) as too_large:
        asyncio.run(small.get("tiny-a"))
    assert too_large.value.status == 503 and too_large.value.code == "model_too_large"
    assert "--memory-budget" in too_large.value.message and not small.loaded()


def test_both_demo_models_are_served_from_their_own_folders(homes, tmp_path):
    """With no --model, `demo` and `demo-coder` (built: here, tiny stand-ins under their folder names) load
    from their own folders, neither from the other's nor rebuilt."""
    from qwen_mlx import demo

    cache = tmp_path / "qwen-mlx"
    cache.mkdir()
    (cache / demo.demo_dir().name).symlink_to(folder(homes, "tiny-a"))
    (cache / demo.demo_coder_dir().name).symlink_to(folder(homes, "tiny-b"))
    with serving(env={**homes, "QWEN_MLX_CACHE": str(cache)}) as (url, lines):
        openai = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)
        assert sorted(m.id for m in openai.models.list().data) == ["demo", "demo-coder"]
        for name in ("demo-coder", "demo"):
            reply = openai.chat.completions.create(model=name, messages=USER, max_tokens=2, temperature=0)
            assert reply.model == name
        sizes = {m["id"]: m["size"] for m in httpx.get(f"{url}/api/ps", timeout=TIMEOUT_S).json()["models"]}
    assert sizes == {
        "demo": shape_facts(folder(homes, "tiny-a"))[0],
        "demo-coder": shape_facts(folder(homes, "tiny-b"))[0],
    }
    assert count(lines, "building") == 0, lines
