"""`qwen-mlx serve` under bodies just below the cap: refused before they are tokenized, never freezing the server.

A 15 MiB prompt once held every request for 13 s while it was tokenized (the tokenizer kept the GIL) and
left two gigabytes resident. Here each protocol refuses it by its size alone, `/health` answers within a
second throughout, and the server's resident memory comes back; a long prompt that passes the size bound
is tokenized off the event loop. One server on the tiny checkpoint with a 64Ki-token context.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import running_server
from fixtures import VOCAB_SIZE, tokenizer_dir
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_mlx.errors import ContextLengthExceeded
from qwen_mlx.tokenizer import Tokenizer
from qwen_mlx.turn import Turns, _fewest_tokens

CONTEXT = 1 << 16
HUGE = "hello world " * (15 * 2**20 // 12)  # 15 MiB: at least 122,880 tokens by its bytes alone
LONG = "hello world " * (2**20 // 12)  # 1 MiB: at least 8,192 tokens by its bytes, 174,762 when tokenized
HEALTH_S = 1.0


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(tokenizer_dir())


def test_qwen3s_longest_token(tokenizer: Tokenizer):
    assert tokenizer.longest_token_bytes == 128  # 128 spaces (Qwen3's vocabulary; code indentation)
    assert len(tokenizer.encode(" " * 128 * 3)) == 3


# What text can be: runs of spaces and dashes (the longest tokens), words, digits, CJK, emoji, combining
# marks and Hangul jamo (which NFC composes into fewer bytes), anything else.
PIECES = st.sampled_from(
    [" " * 128, " " * 127, "-" * 96, "hello ", "42", "你好", "🙂", "e\u0301", "\u1100\u1161\u11a8"]
)
TEXTS = st.lists(PIECES | st.text(max_size=8), max_size=40).map("".join)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(text=TEXTS)
def test_the_size_bound_never_exceeds_the_token_count(tokenizer: Tokenizer, text: str):
    assert _fewest_tokens(text, tokenizer.longest_token_bytes) <= len(tokenizer.encode(text))


def test_a_prompt_too_big_for_the_context_is_refused_without_tokenizing(tokenizer: Tokenizer, monkeypatch):
    turns = Turns(tokenizer, VOCAB_SIZE, 1024)
    too_big = "x" * (1024 * 128)
    turns.plan([{"role": "user", "content": "x" * 4096}])  # fits by its size: tokenized, and fits
    monkeypatch.setattr(tokenizer, "encode", lambda text: pytest.fail("tokenized a prompt its size refuses"))
    with pytest.raises(ContextLengthExceeded, match="at least") as chat:
        turns.plan([{"role": "user", "content": too_big}])
    assert chat.value.param == "messages"
    with pytest.raises(ContextLengthExceeded, match="at least") as text:
        turns.plan_text(too_big)
    assert text.value.param == "prompt"


def requests(text: str) -> list[tuple[str, dict]]:
    """One request of every protocol whose prompt holds `text`."""
    user = [{"role": "user", "content": text}]
    return [
        ("/v1/chat/completions", {"model": "tiny", "messages": user, "max_tokens": 2}),
        ("/v1/completions", {"model": "tiny", "prompt": text, "max_tokens": 2}),
        ("/v1/responses", {"model": "tiny", "input": text, "max_output_tokens": 2}),
        ("/v1/messages", {"model": "tiny", "messages": user, "max_tokens": 2}),
        ("/v1/messages/count_tokens", {"model": "tiny", "messages": user}),
        ("/api/chat", {"model": "tiny", "messages": user, "stream": False}),
        ("/api/generate", {"model": "tiny", "prompt": text, "stream": False}),
    ]


def assert_context_error(response: httpx.Response, path: str) -> str:
    """The protocol's own shape of a context-length error; returns its message."""
    assert response.status_code == 400, (path, response.text[:300])
    body = response.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        message = body["error"]["message"]
    elif path.startswith("/api/"):
        message = body["error"]
    else:
        assert body["error"]["code"] == "context_length_exceeded", body
        message = body["error"]["message"]
    assert f"context is {CONTEXT}" in message, message
    return message


@pytest.fixture(scope="module")
def long_context_model(checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with a 64Ki-token context (weights hard-linked, the config rewritten)."""
    out = tmp_path_factory.mktemp("big-bodies") / "tiny-long"
    shutil.copytree(checkpoint("dense_tied"), out, copy_function=os.link)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").unlink()  # a new file, not a write through the link into the shared checkpoint
    (out / "config.json").write_text(json.dumps(config | {"max_position_embeddings": CONTEXT}))
    return out


@pytest.fixture(scope="module")
def server(long_context_model: Path) -> Iterator[tuple[str, int]]:
    """(base URL, process id) of one server of the long-context model."""
    with running_server(long_context_model, "--model-name", "tiny") as url:
        yield url, _pid_serving(long_context_model)


def _pid_serving(model: Path) -> int:
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and str(model) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                return int(entry.name)
    raise AssertionError(f"no process serves {model}")


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@contextlib.contextmanager
def health_watch(url: str) -> Iterator[list[float]]:
    """Asks `/health` every 50 ms while the block runs; yields the list its answer times go into."""
    times: list[float] = []
    done = threading.Event()

    def watch() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not done.is_set():
                started = time.perf_counter()
                assert client.get("/health").status_code == 200
                times.append(time.perf_counter() - started)
                done.wait(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield times
    finally:
        done.set()
        thread.join(timeout=60)
    assert times, "/health never answered"


def test_a_huge_prompt_is_refused_by_its_size_in_every_protocol(server: tuple[str, int]):
    url, pid = server
    with httpx.Client(base_url=url, timeout=120) as client:
        user = [{"role": "user", "content": "hi"}]
        assert client.post("/v1/chat/completions", json={"messages": user, "max_tokens": 2}).status_code == 200
        before = resident_mib(pid)
        for path, body in requests(HUGE):
            with health_watch(url) as health:
                started = time.perf_counter()
                response = client.post(path, json=body)
                took = time.perf_counter() - started
            message = assert_context_error(response, path)
            assert "at least" in message, message  # refused by the bound, not by counting every token
            # Tokenizing it took 15 s or more on the machine that found this; the bound takes a fraction.
            assert took < 10, (path, took)
            assert max(health) < HEALTH_S, (path, max(health))
        # Back near where it was (glibc kept the freed copies, 100 MiB of them, until trimmed).
        assert _settles(pid, lambda rss: rss <= before * 1.1), (before, resident_mib(pid))


def test_a_long_prompt_is_tokenized_off_the_event_loop(server: tuple[str, int]):
    """Under the size bound, so tokenized in full (and then refused): `/health` answers meanwhile."""
    url, pid = server
    with httpx.Client(base_url=url, timeout=120) as client:
        for path, body in requests(LONG)[:2]:
            with health_watch(url) as health:
                started = time.perf_counter()
                response = client.post(path, json=body)
                took = time.perf_counter() - started
            message = assert_context_error(response, path)
            assert "at least" not in message and "174" in message, message  # counted exactly
            # A tokenizer holding the GIL stalls /health for about the whole request.
            assert max(health) < min(HEALTH_S, took / 2), (path, max(health), took)


def _settles(pid: int, ok, seconds: float = 10) -> bool:
    """Whether the server's resident memory satisfies `ok` within `seconds` (memory returns after the reply)."""
    deadline = time.monotonic() + seconds
    while not ok(resident_mib(pid)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
