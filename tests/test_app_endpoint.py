"""The chat app's endpoint backend: `ThinkSplitter` over every chunking, then real `qwen-mlx serve` runs.

The demo model replays its scripted chats (qwen_mlx/demo_scripts.json) at temperature 0, so reasoning and
answers are compared exactly. A small in-process HTTP server stands in for what qwen-mlx serve never sends
(a pre-opened think block, the `reasoning` field, an error event, a dropped connection, a non-JSON page).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import running_server

from qwen_mlx.app.endpoint import EndpointBackend, ThinkSplitter, base_url
from qwen_mlx.chat import Done, Reply
from qwen_mlx.demo import SCRIPTS
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.parser import Answer, Reasoning

SCRIPT = {s["name"]: s for s in SCRIPTS}
TAGGED = "<think>\nThe user asks for 2 + 3.\nAdding gives 5.\n</think>\n\n2 + 3 = **5**."
REASONING, ANSWER = "The user asks for 2 + 3.\nAdding gives 5.", "2 + 3 = **5**."


def user(name: str) -> list[dict]:
    return [m for m in SCRIPT[name]["messages"] if m["role"] != "assistant"][:1]


def scripted(name: str) -> tuple[str, str]:
    """(reasoning, answer) the demo model replays for a script."""
    raw = SCRIPT[name]["messages"][-1]["content"]
    if "</think>" not in raw:
        return "", raw
    reasoning, answer = raw.split("</think>")
    return reasoning.removeprefix("<think>").strip(), answer.strip()


def split(pieces: list[str], starts_in_reasoning: bool | None = False) -> tuple[str, str, list]:
    """(reasoning, answer, events) of content fed to a fresh splitter in these pieces."""
    splitter = ThinkSplitter(starts_in_reasoning)
    events = [e for piece in pieces for e in splitter.feed(piece)] + splitter.finish()
    assert all(e.text for e in events)
    reasoning = "".join(e.text for e in events if isinstance(e, Reasoning))
    return reasoning, "".join(e.text for e in events if isinstance(e, Answer)), events


def chunkings(text: str) -> Iterator[list[str]]:
    """Every split into two pieces, every split into three around each tag boundary, and char by char."""
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    for i in range(len(text) + 1):
        for j in range(i, min(i + 9, len(text)) + 1):
            yield [text[:i], text[i:j], text[j:]]
    yield list(text)


# --- ThinkSplitter: a parser, pure strings in ---------------------------------------------------------


@pytest.mark.parametrize("starts", [False, None, True])
@pytest.mark.parametrize("lead", ["", "\n", "  \n "])
def test_splitter_tagged_at_every_split_point(starts, lead):
    for pieces in chunkings(lead + TAGGED):
        reasoning, answer, _ = split(pieces, starts)
        assert (reasoning, answer) == (REASONING, ANSWER), pieces


@pytest.mark.parametrize("starts", [True, None])
def test_splitter_only_closing_tag_at_every_split_point(starts):
    text = TAGGED.removeprefix("<think>\n")
    for pieces in chunkings(text):
        assert split(pieces, starts)[:2] == (REASONING, ANSWER), pieces


@pytest.mark.parametrize("starts", [False, None])
def test_splitter_no_tags_is_all_answer(starts):
    text = "The capital of France is **Paris**.\n\nIt is <b>big</b> and < 3 > 2."
    for pieces in chunkings(text):
        assert split(pieces, starts)[:2] == ("", text), pieces


def test_splitter_empty_think_block_gives_no_reasoning():
    for pieces in chunkings("<think>\n\n</think>\n\nHello! How can I help you today?"):
        reasoning, answer, events = split(pieces)
        assert (reasoning, answer) == ("", "Hello! How can I help you today?")
        assert not any(isinstance(e, Reasoning) for e in events)


def test_splitter_tags_after_the_block_are_answer_text():
    assert split(["<think>a</think>b <think> c </think>"])[:2] == ("a", "b <think> c </think>")
    assert split(["Answer with </think> in it"], starts_in_reasoning=False)[:2] == ("", "Answer with </think> in it")


def test_splitter_streams_reasoning_and_holds_only_what_may_be_a_tag():
    splitter = ThinkSplitter()
    assert splitter.feed("<think>\nStep one") == [Reasoning("Step one")]
    assert splitter.feed(".\n</th") == [Reasoning(".")]  # "\n</th" may be the closing tag: held
    assert splitter.feed("ink>\n\nDone") == [Answer("Done")]
    assert splitter.feed(" now.") == [Answer(" now.")]
    assert splitter.finish() == []
    assert (splitter.opened, splitter.closed) == (True, True)


def test_splitter_undecided_holds_until_the_closing_tag_or_the_end():
    splitter = ThinkSplitter(starts_in_reasoning=None)
    assert splitter.feed("Thinking hard") == []
    assert splitter.feed("\n</think>\n\nYes.") == [Reasoning("Thinking hard"), Answer("Yes.")]
    assert (splitter.opened, splitter.closed) == (False, True)
    splitter = ThinkSplitter(starts_in_reasoning=None)
    assert splitter.feed("Just an answer.") == []
    assert splitter.finish() == [Answer("Just an answer.")]


def test_splitter_cut_off_inside_reasoning():
    assert split(["<think>\nhalf a thou", "ght\n"])[:2] == ("half a thought", "")
    assert split(["<thi"])[:2] == ("", "<thi")  # a stream that ends inside what looked like a tag


@pytest.mark.parametrize(
    "given, expected",
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/v1"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/v1"),
        ("http://127.0.0.1:8080/v1/", "http://127.0.0.1:8080/v1"),
        ("localhost:1234", "http://localhost:1234/v1"),
        ("https://example.com/api/openai/v1", "https://example.com/api/openai/v1"),
    ],
)
def test_base_url(given, expected):
    assert base_url(given) == expected


def test_base_url_rejects_other_schemes():
    with pytest.raises(QwenMLXError, match="not an http"):
        base_url("ftp://example.com")


# --- against the real server ----------------------------------------------------------------------------


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture(scope="module")
def demo(demo_server: str) -> EndpointBackend:
    return EndpointBackend.connect(demo_server)  # no /v1: added


def test_connect_picks_the_served_model(demo, demo_server):
    assert demo.model == "demo"
    assert demo.label == f"demo @ {demo_server.removeprefix('http://')}"
    # Our own server's card gives the context length (the status bar shows "ctx used/40960").
    assert (demo.context_limit, demo.notices, demo.memory(), demo.end_thinking()) == (40960, [], None, False)
    assert EndpointBackend.connect(f"{demo_server}/v1/", model="demo").model == "demo"


def test_thinking_turn_matches_the_script(demo):
    events = list(demo.stream(user("thinking"), thinking=True, budget=None, temperature=0))
    reply = Reply.gather(iter(events))
    assert (reply.reasoning, reply.answer) == scripted("thinking")
    assert isinstance(events[-1], Done) and sum(isinstance(e, Done) for e in events) == 1
    kinds = [type(e) for e in events if not isinstance(e, Done)]
    assert kinds == sorted(kinds, key=lambda k: k is Answer)  # all reasoning, then all answer
    stats = reply.stats
    assert stats.reasoning_tokens > 0 and stats.completion_tokens > stats.reasoning_tokens
    assert stats.prompt_tokens > 0 and stats.finish_reason == "stop" and stats.thinking
    assert 0 < stats.ttft_s < 60 and stats.generation_tps > 0


def test_non_thinking_turn_has_no_reasoning(demo):
    events = list(demo.stream(user("non_thinking"), thinking=False, budget=None, temperature=0))
    assert not any(isinstance(e, Reasoning) for e in events)
    reply = Reply.gather(iter(events))
    assert reply.answer == scripted("non_thinking")[1]
    assert reply.stats.reasoning_tokens == 0 and not reply.stats.thinking


def test_thinking_budget_is_sent(demo):
    reply = Reply.gather(demo.stream(user("thinking_long"), thinking=True, budget=8, temperature=0))
    assert 0 < reply.stats.reasoning_tokens <= 8 + 40  # the budget, then the early-stop text
    assert reply.answer


def test_closing_early_leaves_the_server_answering(demo, demo_server):
    events = demo.stream(user("thinking_long"), thinking=True, budget=None, temperature=0)
    assert isinstance(next(events), Reasoning)
    events.close()
    deadline = time.monotonic() + 30
    while json.load(urllib.request.urlopen(f"{demo_server}/health"))["in_flight"]:  # the server saw it go
        assert time.monotonic() < deadline
        time.sleep(0.01)
    reply = Reply.gather(demo.stream(user("thinking"), thinking=True, budget=None, temperature=0))
    assert (reply.reasoning, reply.answer) == scripted("thinking")


def test_unknown_model_names_the_served_ones(demo_server):
    with pytest.raises(QwenMLXError) as e:
        EndpointBackend.connect(demo_server, model="qwen3-8b")
    assert "'qwen3-8b'" in one_line(e) and "demo" in one_line(e)


def test_unreachable_endpoint_is_one_line():
    with socket.socket() as s:  # a port that was free a moment ago, now closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(QwenMLXError) as e:
        EndpointBackend.connect(f"http://127.0.0.1:{port}")
    assert one_line(e) == f"cannot reach http://127.0.0.1:{port}/v1: connection refused"


@pytest.fixture(scope="module")
def inline_server(demo_model_path: Path) -> Iterator[str]:
    """One server for the inline `<think>` path and the API key (each server start costs seconds)."""
    options = ("--model-name", "demo", "--reasoning-field", "think", "--api-key", "k")
    with running_server(demo_model_path, *options) as url:
        yield url


def test_inline_think_tags_give_the_same_split(inline_server):
    backend = EndpointBackend.connect(inline_server, api_key="k")
    reply = Reply.gather(backend.stream(user("thinking"), thinking=True, budget=None, temperature=0))
    assert (reply.reasoning, reply.answer) == scripted("thinking")
    assert reply.stats.reasoning_tokens > 0
    events = list(backend.stream(user("non_thinking"), thinking=False, budget=None, temperature=0))
    assert not any(isinstance(e, Reasoning) for e in events)
    assert Reply.gather(iter(events)).answer == scripted("non_thinking")[1]


@pytest.mark.parametrize("key", ["wrong", None])
def test_api_key_refused_is_one_line(inline_server, key):
    with pytest.raises(QwenMLXError) as e:
        EndpointBackend.connect(inline_server, api_key=key)
    assert "API key" in one_line(e) and "401" in one_line(e)


# --- what qwen-mlx serve never sends: a stand-in server ------------------------------------------------------


def sse(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": choices}
    return f"data: {json.dumps({**chunk, 'usage': usage})}\n\n".encode()


STREAMS = {
    # A template that opened <think> itself: the content has only the closing tag.
    "pre-opened": [
        *(sse({"content": text}) for text in ["Adding", " gives 5.\n</thi", "nk>\n\n5."]),
        sse(usage={"prompt_tokens": 9, "completion_tokens": 7}),
    ],
    # Ollama's and OpenRouter's field, and no usage at all.
    "reasoning-field": [sse({"reasoning": "Adding"}), sse({"reasoning": " gives 5."}), sse({"content": "5."}, "stop")],
    "error-event": [sse({"content": "5"}), b'data: {"error": {"message": "the model crashed", "type": "x"}}\n\n'],
    "dropped": [sse({"content": "5"})],
}


class StandIn(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/html/"):
            return self.reply(200, b"<html>a router's login page</html>", "text/html")
        cards = [{"id": name, "object": "model", "max_model_len": 4096} for name in STREAMS]
        self.reply(200, json.dumps({"object": "list", "data": cards}).encode(), "application/json")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in STREAMS[body["model"]]:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        if body["model"] == "dropped":  # no last chunk: the body is cut off
            self.close_connection = True
            return
        self.wfile.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")

    def reply(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def stand_in() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def turn(url: str, model: str, thinking: bool = True) -> Reply:
    backend = EndpointBackend.connect(url, model=model)
    messages = [{"role": "user", "content": "2 + 3?"}]
    return Reply.gather(backend.stream(messages, thinking=thinking, budget=None, temperature=None))


def test_stand_in_pre_opened_think_block(stand_in):
    reply = turn(stand_in, "pre-opened")
    assert (reply.reasoning, reply.answer) == ("Adding gives 5.", "5.")
    assert (reply.stats.completion_tokens, reply.stats.prompt_tokens) == (7, 9)
    assert EndpointBackend.connect(stand_in, model="pre-opened").context_limit == 4096


def test_stand_in_learns_the_pre_opened_block_and_streams_it_next_turn(stand_in):
    backend = EndpointBackend.connect(stand_in, model="pre-opened")
    messages = [{"role": "user", "content": "2 + 3?"}]
    list(backend.stream(messages, thinking=True, budget=None, temperature=None))
    events = backend.stream(messages, thinking=False, budget=None, temperature=None)
    assert next(events) == Reasoning("Adding")  # not held back: this endpoint is known to pre-open
    assert Reply.gather(events).answer == "5."


def test_stand_in_reasoning_field(stand_in):
    reply = turn(stand_in, "reasoning-field")
    assert (reply.reasoning, reply.answer) == ("Adding gives 5.", "5.")
    assert reply.stats.completion_tokens == 3  # no usage: one token a chunk
    assert reply.stats.reasoning_tokens == round(3 * 15 / 17)  # no count: the reasoning's share of the text
    assert reply.stats.finish_reason == "stop"


def test_stand_in_error_event_is_one_line(stand_in):
    with pytest.raises(QwenMLXError) as e:
        turn(stand_in, "error-event")
    assert one_line(e).endswith("failed mid-answer: the model crashed")


def test_stand_in_dropped_connection_is_one_line(stand_in):
    with pytest.raises(QwenMLXError) as e:
        turn(stand_in, "dropped")
    assert one_line(e).startswith(f"lost the connection to {stand_in}/v1")


def test_stand_in_html_page_is_one_line(stand_in):
    with pytest.raises(QwenMLXError) as e:
        EndpointBackend.connect(f"{stand_in}/html")
    assert "not JSON" in one_line(e)
