"""The chat app's remote backend: any OpenAI-compatible endpoint (qwen-mlx serve, LM Studio, vLLM, llama.cpp).

Design decisions:
- The official `openai` SDK does the HTTP and the SSE: no retries (a retried turn would double-bill a slow
  remote model), a short connect timeout so a wrong URL fails at once, a long read timeout for long prefills.
- `connect` lists `/models` before the first turn: it proves the URL, the key and the model name, and every
  failure becomes one `QwenMLXError` line ("cannot reach URL: connection refused"), never a traceback.
- Reasoning is read from wherever the server puts it: `reasoning_content` (vLLM, llama.cpp, ours), `reasoning`
  (Ollama, OpenRouter), else inline `<think>…</think>` in the content, split by `ThinkSplitter`.
- A template that opens `<think>` itself (Qwen3-Thinking-2507) streams reasoning with only a closing
  `</think>`. Until a turn has shown whether this endpoint does that, a thinking turn's untagged content is
  held back until `</think>` or the end of the stream decides; later turns stream at once.
- Times are measured here, so they include the network: TTFT from the request to the first text, the
  generation speed from the completion tokens the server reports over the time after the first text.
- Thinking cannot be ended live on a remote stream (`end_thinking` is False); a budget is sent up front as
  `thinking_budget`, which qwen-mlx serve honours and other servers ignore.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import openai

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.format import normalize_messages, thinking_mode
from qwen_mlx.parser import Answer, Reasoning
from qwen_mlx.turn import ChatEvent, ChatStats, Done

CONNECT_TIMEOUT_S = 5.0
LIST_TIMEOUT_S = 15.0
READ_TIMEOUT_S = 600.0  # between two chunks of a stream: a long prompt's prefill on a slow remote machine
NO_KEY = "none"  # the SDK insists on a key; servers without one ignore it
CONTEXT_FIELDS = ("max_context_length", "context_length", "max_model_len", "context_window")
SHOWN_MODELS = 10  # models named in "no model X" before "and N more"

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

Event = Reasoning | Answer


def _held_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag` (to hold until the next chunk)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkSplitter:
    """Splits streamed content with inline `<think>…</think>` into `Reasoning` and `Answer` events.

    `feed(text)` takes each chunk as it arrives and `finish()` the end of the stream; both return the events
    that are certain so far. Tags may be split across chunks. The whitespace around the think block is not
    content (the template writes `<think>\\n`, `\\n</think>\\n\\n`) and is dropped. Content that does not open
    with `<think>` starts according to `starts_in_reasoning`: True, reasoning until `</think>` (a template
    that pre-opened the block); False, answer; None, held until `</think>` (reasoning) or the end (answer).
    """

    def __init__(self, starts_in_reasoning: bool | None = False):
        self.starts_in_reasoning = starts_in_reasoning
        self.opened = False  # the content opened with <think>
        self.closed = False  # a </think> was seen
        self._state = "start"  # start -> reasoning | undecided | answer; reasoning | undecided -> answer
        self._buffer = ""
        self._block_start = True  # strip whitespace at the start of the current block

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> list[Event]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while True:
            if self._block_start:
                self._buffer = self._buffer.lstrip()
                if not self._buffer:
                    return events
            if self._state == "start":
                if self._buffer.startswith(THINK_OPEN):
                    self.opened = True
                    self._buffer = self._buffer[len(THINK_OPEN) :]
                    self._state = "reasoning"
                    continue
                if THINK_OPEN.startswith(self._buffer) and not final:
                    return events
                start = {True: "reasoning", False: "answer", None: "undecided"}[self.starts_in_reasoning]
                self._state = start
                continue
            if self._state in ("reasoning", "undecided"):
                end = self._buffer.find(THINK_CLOSE)
                if end >= 0:
                    self.closed = True
                    self._emit(events, Reasoning, self._buffer[:end].rstrip())
                    self._buffer = self._buffer[end + len(THINK_CLOSE) :]
                    self._state, self._block_start = "answer", True
                    continue
                if self._state == "undecided":
                    if not final:
                        return events
                    self._state = "answer"
                    continue
                if final:
                    self._emit(events, Reasoning, self._buffer.rstrip())
                    self._buffer = ""
                    return events
                # Hold what may be the start of </think>, and the whitespace before it (dropped if it is).
                ready = self._buffer[: len(self._buffer) - _held_suffix(self._buffer, THINK_CLOSE)].rstrip()
                self._emit(events, Reasoning, ready)
                self._buffer = self._buffer[len(ready) :]
                return events
            self._emit(events, Answer, self._buffer)
            self._buffer = ""
            return events

    def _emit(self, events: list[Event], kind: type[Event], text: str) -> None:
        if text:
            events.append(kind(text))
            self._block_start = False


def base_url(url: str) -> str:
    """The API root: a scheme is added when missing, and `/v1` when the URL has no path."""
    url = url.strip()
    if "://" not in url:
        url = f"http://{url}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise QwenMLXError(f"{url} is not an http(s) URL: give the endpoint like http://127.0.0.1:8080/v1")
    path = parts.path.rstrip("/") or "/v1"
    return f"{parts.scheme}://{parts.netloc}{path}"


def _cause(e: BaseException) -> str:
    """Why a connection failed, in a few words, from the innermost OS error in the exception chain."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, socket.gaierror):
            return "unknown host"
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror[0].lower() + seen.strerror[1:]
        seen = seen.__cause__ or seen.__context__
    inner = e.__cause__ or e
    return " ".join(str(inner).split()) or type(inner).__name__


def _server_message(e: openai.APIStatusError) -> str:
    """The server's own error text: OpenAI's `{"error": {"message"}}`, else the start of the body."""
    body = e.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if isinstance(message, str) and message:
            return " ".join(message.split())
    try:
        text = e.response.text
    except Exception:  # a streamed response that was never read
        text = ""
    return " ".join(text.split())[:200] or e.response.reason_phrase or "no details"


def _error(url: str, e: Exception, api_key: str | None, during: str = "") -> QwenMLXError:
    """One readable line for any failure talking to the endpoint."""
    where = f"{url} {during}".rstrip()
    if isinstance(e, openai.APIStatusError):
        status, message = e.status_code, _server_message(e)
        if status in (401, 403):
            hint = "the API key was refused" if api_key else "it needs an API key"
            return QwenMLXError(f"{where}: {hint} ({status}: {message}); give the endpoint's API key")
        if status == 404 and not isinstance(e.body, dict):  # not an OpenAI-shaped error: probably the wrong URL
            return QwenMLXError(f"{where}: not found (404: {message}); is this an OpenAI-compatible /v1 URL?")
        return QwenMLXError(f"{where}: the server answered {status}: {message}")
    if isinstance(e, openai.APITimeoutError):
        if not during:
            return QwenMLXError(f"cannot reach {url}: timed out")
        return QwenMLXError(f"{where}: no new text for {READ_TIMEOUT_S:g} s")
    if isinstance(e, openai.APIConnectionError):
        verb = "cannot reach" if not during else "lost the connection to"
        return QwenMLXError(f"{verb} {url}: {_cause(e)}")
    if isinstance(e, openai.APIError):  # an error event inside the stream
        return QwenMLXError(f"{where}: {' '.join(str(e.message).split())}")
    if isinstance(e, ValueError):
        return QwenMLXError(f"{where}: the answer is not JSON; is this an OpenAI-compatible /v1 URL?")
    return QwenMLXError(f"{where}: {type(e).__name__}: {' '.join(str(e).split())}")


def _context_length(card: dict) -> int | None:
    for name in CONTEXT_FIELDS:
        value = card.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _client(url: str, api_key: str | None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=url,
        api_key=api_key or NO_KEY,
        max_retries=0,
        timeout=openai.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
    )


def _cards(client: openai.OpenAI, url: str, api_key: str | None) -> list[dict]:
    """The endpoint's `/models` cards that have an id; raises QwenMLXError when it lists none."""
    try:
        response = client.models.with_raw_response.list(
            timeout=openai.Timeout(LIST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        )
        listing = response.http_response.json()
    except (openai.OpenAIError, ValueError) as e:
        raise _error(url, e, api_key) from None
    data = listing.get("data") if isinstance(listing, dict) else None
    cards = [c for c in data if isinstance(c, dict) and isinstance(c.get("id"), str)] if isinstance(data, list) else []
    if not cards:
        raise QwenMLXError(f"{url}/models lists no models: load one in the server first")
    return cards


def served_models(url: str, api_key: str | None = None) -> list[tuple[str, int | None]]:
    """(model id, context length or None) of every model the endpoint lists, for the chat app's picker."""
    url = base_url(url)
    return [(card["id"], _context_length(card)) for card in _cards(_client(url, api_key), url, api_key)]


def _field(obj, name: str):
    """A field the SDK's model does not declare (`reasoning_content`), or a declared one, or None."""
    extra = getattr(obj, "model_extra", None) or {}
    return extra[name] if name in extra else getattr(obj, name, None)


@dataclass
class _Tally:
    """What a turn's stream showed, for its `ChatStats`; times from `time.perf_counter`."""

    started: float
    first_text_at: float | None = None
    usage: object = None  # the SDK's CompletionUsage, when the server sends one
    finish_reason: str | None = None
    chunks: int = 0
    text_chunks: int = 0  # the completion tokens when the server sends no usage: a chunk is about a token
    reasoning_chars: int = 0  # the reasoning tokens' share when the server does not count them
    answer_chars: int = 0

    def arrived(self) -> None:
        if self.first_text_at is None:
            self.first_text_at = time.perf_counter()
        self.text_chunks += 1

    def counted(self, event: Event) -> Event:
        if isinstance(event, Reasoning):
            self.reasoning_chars += len(event.text)
        else:
            self.answer_chars += len(event.text)
        return event

    def stats(self, thinking: bool) -> ChatStats:
        ended = time.perf_counter()
        usage = self.usage
        completion = getattr(usage, "completion_tokens", None) or self.text_chunks
        prompt = getattr(usage, "prompt_tokens", None) or 0
        cached = getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", None) or 0
        reasoning = getattr(getattr(usage, "completion_tokens_details", None), "reasoning_tokens", None)
        if reasoning is None:
            shown = self.reasoning_chars + self.answer_chars
            reasoning = round(completion * self.reasoning_chars / shown) if shown else 0
        first = self.first_text_at if self.first_text_at is not None else ended
        generating = ended - first
        return ChatStats(
            prefill_tokens=max(prompt - cached, 0),
            completion_tokens=completion,
            ttft_s=first - self.started,
            prompt_tps=max(prompt - cached, 0) / max(first - self.started, 1e-9),
            generation_tps=(completion - 1) / generating if completion > 1 and generating > 0 else 0.0,
            finish_reason=self.finish_reason,
            prompt_tokens=prompt,
            cached_tokens=cached,
            reasoning_tokens=reasoning,
            thinking=thinking or reasoning > 0,
        )


class EndpointBackend:
    """A model behind an OpenAI-compatible endpoint; nothing is kept between turns but the HTTP client."""

    def __init__(
        self, client: openai.OpenAI, url: str, model: str, context_limit: int | None = None, api_key: str | None = None
    ):
        self.client = client
        self.url = url
        self.model = model
        host = urlsplit(url).netloc.rpartition("@")[2]
        self.label = f"{model} @ {host}"
        self.context_limit = context_limit
        self.notices: list[str] = []
        self._api_key = api_key
        self._reasoning_field_seen = False  # the server sends reasoning apart: its content is all answer
        self._opens_thinking: bool | None = None  # its template pre-opens <think>; None until a turn shows it

    @classmethod
    def connect(cls, url: str, api_key: str | None = None, model: str | None = None) -> EndpointBackend:
        """Check the endpoint by listing its models and pick one; raises QwenMLXError with one readable line."""
        url = base_url(url)
        client = _client(url, api_key)
        cards = _cards(client, url, api_key)
        names = [c["id"] for c in cards]
        if model is None:
            card = cards[0]
        elif model in names:
            card = cards[names.index(model)]
        else:
            shown = ", ".join(names[:SHOWN_MODELS])
            more = f" and {len(names) - SHOWN_MODELS} more" if len(names) > SHOWN_MODELS else ""
            raise QwenMLXError(f"{url} has no model {model!r}; it serves {shown}{more}")
        return cls(client, url, card["id"], _context_length(card), api_key)

    def stream(
        self, messages: list[dict], *, thinking: bool, budget: int | None, temperature: float | None
    ) -> Iterator[ChatEvent]:
        """One assistant turn, streamed; closing the iterator closes the HTTP stream (the server stops)."""
        extra_body: dict = {"chat_template_kwargs": {"enable_thinking": thinking}}
        if budget is not None:
            extra_body["thinking_budget"] = budget
        options: dict = {"temperature": temperature} if temperature is not None else {}
        tally = _Tally(started=time.perf_counter())
        splitter: ThinkSplitter | None = None
        stream = None
        try:
            stream = self.client.chat.completions.create(
                model=self.model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=extra_body,
                **options,
            )
            for chunk in stream:
                tally.chunks += 1
                if getattr(chunk, "usage", None) is not None:
                    tally.usage = chunk.usage
                for choice in chunk.choices or []:
                    tally.finish_reason = choice.finish_reason or tally.finish_reason
                    if choice.delta is None:
                        continue
                    events: list[Event] = []
                    reasoning = _field(choice.delta, "reasoning_content") or _field(choice.delta, "reasoning")
                    if isinstance(reasoning, str) and reasoning:
                        self._reasoning_field_seen = True
                        events.append(Reasoning(reasoning))
                    content = choice.delta.content
                    if content:
                        splitter = splitter or self._splitter(thinking)
                        events += splitter.feed(content)
                    if reasoning or content:
                        tally.arrived()
                    yield from map(tally.counted, events)
            if splitter is not None:
                yield from map(tally.counted, splitter.finish())
        except (openai.OpenAIError, ValueError) as e:
            raise _error(self.url, e, self._api_key, "failed mid-answer" if tally.chunks else "") from None
        finally:
            if stream is not None:
                stream.close()
        if not tally.chunks:
            raise QwenMLXError(f"{self.url} answered with no chat completion chunks; is it OpenAI-compatible?")
        if splitter is not None:
            self._opens_thinking = splitter.closed and not splitter.opened
        with contextlib.suppress(QwenMLXError):  # content our template refuses went through: keep the request's mode
            thinking = thinking_mode(normalize_messages(messages), thinking)  # soft switches (/no_think) applied
        yield Done(tally.stats(thinking))

    def _splitter(self, thinking: bool) -> ThinkSplitter:
        if self._reasoning_field_seen:
            return ThinkSplitter(starts_in_reasoning=False)
        if self._opens_thinking is not None:
            return ThinkSplitter(starts_in_reasoning=self._opens_thinking)
        return ThinkSplitter(starts_in_reasoning=None if thinking else False)

    def end_thinking(self) -> bool:
        return False  # a remote stream cannot be steered; a thinking budget (/budget) is sent with the request

    def memory(self) -> int | None:
        return None

    def prompt_tokens(self, messages: list[dict]) -> int | None:
        return None  # the server's tokenizer is not ours; its usage reports the count after each turn
