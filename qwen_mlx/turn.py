"""One turn, planned once and read once: every front end (the chat session, the server's routes, its
batch, the lockstep over several Macs) is a caller of this module.

`Turns` (one per model) plans a turn: messages and `TurnOptions` in; out a `TurnPlan` with the prompt ids
(the checkpoint's template), the thinking mode, the resolved sampling, the turn's `TurnGuide` (thinking
budget, "end thinking now", `tool_choice`, `response_format`, penalties), and max tokens capped to the
room left in the context. `TurnReader` reads the tokens a plan produces: detokenizer, reply parser,
events, logprobs and the stats, with the one finish rule (a stop string is "stop"; an end token after a
tool call is "tool_calls").

Design decisions:
- A prompt that does not fit the model's context is an error (`ContextLengthExceeded`), never a silent
  truncation; `max_tokens` is capped to the room that is left (finish reason `length` when reached). One
  whose bytes alone outnumber the context's worth of the longest tokens is refused before it is tokenized.
- A turn without `max_tokens` may run to the end of the context, unless the planner has a default
  (`qwen-mlx serve --max-tokens-default`); either way a reply caught repeating one span over and over
  (`LoopGuard`) ends with finish reason "length" and a log line instead of holding its slot for an hour.
- Tool calls are parsed when the turn was given tools; without them a `<tool_call>` block stays answer
  text (a client that prompts for tools itself parses the text itself).
- Every plan carries its guide, so "end thinking now" works in every front end; the guide reads the
  tokens only while a decision depends on them, so an idle guide leaves decoding pipelined.
- The planner knows templates, thinking and tools; it knows nothing about HTTP or MLX caches.
"""

from __future__ import annotations

import logging
import math
import time
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx

from . import format as qwen3
from .engine import Stats
from .errors import ContextLengthExceeded, QwenMLXError
from .format import SpecialIds, normalize_messages, thinking_mode
from .guide import TurnGuide
from .parser import Answer, Event, Reasoning, ReplyParser, StopStrings, ToolCall, ToolCallError
from .sampling import Sampler, Sampling
from .tokenizer import Tokenizer

log = logging.getLogger("qwen_mlx")

MAX_STOPS = 16
UNLIKELY_LOGPROB = -9999.0  # what OpenAI reports for a token that cannot be drawn
# Effort levels, in every protocol's spelling (OpenAI's reasoning_effort and reasoning.effort, Anthropic's
# output_config.effort, Ollama's think levels), as a thinking budget in tokens; None: unbounded. ("none",
# where a protocol has it, turns thinking off instead.)
EFFORT_BUDGETS = {"minimal": 256, "low": 1024, "medium": 8192, "high": None, "xhigh": None, "max": None}
TOOL_CHOICES = ("auto", "none", "required")
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "add_generation_prompt", "enable_thinking")


@dataclass
class ChatStats(Stats):
    """One turn's numbers: the engine's, plus token counts as OpenAI reports them and the mode used.

    `finish_reason` is "stop", "length" or "tool_calls"; `prefill_tokens` = `prompt_tokens` - `cached_tokens`.
    """

    prompt_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    thinking: bool = True  # the mode the turn ran in, soft switches applied
    stop_sequence: str | None = None  # the stop string that ended the reply (finish_reason "stop")
    notes: list[str] = field(default_factory=list)  # the plan's: asked-for behaviour this model lacks


@dataclass(frozen=True)
class Done:
    """The last event of every turn."""

    stats: ChatStats


ChatEvent = Event | Done


@dataclass
class Reply:
    """A whole turn, gathered from its events (what a non-streaming caller wants)."""

    reasoning: str = ""
    answer: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[ToolCallError] = field(default_factory=list)
    stats: ChatStats = field(default_factory=ChatStats)

    @classmethod
    def gather(cls, events: Iterator[ChatEvent]) -> Reply:
        reply = cls()
        for event in events:
            if isinstance(event, Reasoning):
                reply.reasoning += event.text
            elif isinstance(event, Answer):
                reply.answer += event.text
            elif isinstance(event, ToolCall):
                reply.tool_calls.append(event)
            elif isinstance(event, ToolCallError):
                reply.errors.append(event)
            elif isinstance(event, Done):
                reply.stats = event.stats
        return reply


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]]


@dataclass
class TurnOptions:
    """What a caller may ask of one turn (every front end's options map onto these)."""

    tools: list[dict] | None = None
    tool_choice: str | None = None  # "auto", "none", "required", or the name of one of `tools`
    parallel_tool_calls: bool = True
    response_format: dict | None = None  # OpenAI's: {"type": "json_object"} or {"type": "json_schema", ...}
    enable_thinking: bool = True
    thinking_budget: int | None = None
    max_tokens: int | None = None
    sampling: Sampling | None = None
    stop: Sequence[str] = ()
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    top_logprobs: int | None = None  # None: no logprobs
    speculative: tuple[str, int] | None = None  # ("lookup" | "model" | "none", draft tokens); None: the default


@dataclass
class TurnPlan:
    """Everything the token loop needs for one reply, and what its reader needs to read it."""

    prompt_ids: list[int]
    max_tokens: int
    sampler: Sampler
    guide: TurnGuide
    stop: list[str] = field(default_factory=list)
    chat: bool = True  # parse Qwen3's reply format; False: raw text (`/v1/completions`)
    tool_calls: bool = True  # False (a turn without tools): `<tool_call>` blocks stay answer text
    tools: list[dict] = field(default_factory=list)  # their schemas type Qwen3-Coder's XML arguments
    tool_format: str = qwen3.JSON_TOOL_CALLS  # how the template writes a call (`format.tool_call_format`)
    thinking: bool = True  # the mode, for the stats
    top_logprobs: int | None = None
    speculative: tuple[str, int] | None = None  # ("lookup" | "model" | "none", draft tokens); None: the default
    notes: list[str] = field(default_factory=list)  # what the user asked that this model cannot do, said once

    @property
    def processors(self) -> list:
        return [self.guide]


def _stops(stop: Sequence[str] | str | None) -> list[str]:
    stops = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOPS:
        raise QwenMLXError(f"stop may hold at most {MAX_STOPS} strings", param="stop")
    return stops


def _valid_text(text: str, param: str) -> str:
    """`text`, unless it holds a lone surrogate (JSON's "\\udc80" parses to one; no tokenizer takes it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        message = f"{param} holds a lone surrogate escape (\\ud800-\\udfff), which is not text"
        raise QwenMLXError(message, param=param) from None
    return text


def _tool_choice(choice: str | None, tools: list[dict] | None) -> str | None:
    """The choice the guide applies (None: the model decides), checked against the tools."""
    if choice in (None, "auto"):
        return None
    if not isinstance(choice, str) or not choice:
        raise QwenMLXError("tool_choice must be auto, none, required or a tool's name", param="tool_choice")
    names = [(t.get("function") or t).get("name") for t in tools or []]
    if choice == "required" and not names:
        raise QwenMLXError('tool_choice "required" needs at least one tool in tools', param="tool_choice")
    if choice not in TOOL_CHOICES and choice not in names:
        raise QwenMLXError(f"tool_choice names {choice!r}, which is not in tools", param="tool_choice")
    return choice if names else None


def _fewest_tokens(text: str, longest_token_bytes: int) -> int:
    """A lower bound on `text`'s token count without tokenizing it: no token stands for more bytes than the
    vocabulary's longest. Counted on the text as it is and as NFC (Qwen3's normalizer), the smaller of the
    two: composing characters can shrink the bytes (Hangul jamo to syllables: a third)."""
    size = len(text.encode("utf-8"))
    if not unicodedata.is_normalized("NFC", text):
        size = min(size, len(unicodedata.normalize("NFC", text).encode("utf-8")))
    return -(-size // longest_token_bytes)


def _finite(logprob: float) -> float:
    """A log-probability JSON can carry: a token the guide ruled out (-inf) is OpenAI's -9999.0."""
    return logprob if math.isfinite(logprob) else UNLIKELY_LOGPROB


class Turns:
    """Plans turns for one model: its tokenizer, vocabulary, context and generation settings."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        context_length: int,
        generation_config: dict | None = None,
        *,
        default_max_tokens: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.generation_config = generation_config or {}
        self.default_max_tokens = default_max_tokens  # a turn that sets none gets this (None: the room left)
        self.special = SpecialIds.of(tokenizer)
        self.tool_format = qwen3.tool_call_format(tokenizer.chat_template)
        self.thinking_control = self._thinking_control()

    def _thinking_control(self) -> str:
        """Whether this checkpoint's template switches thinking, always thinks or never does."""
        probe = [{"role": "user", "content": "Hi"}]
        try:
            on, off = (self.render(probe, enable_thinking=flag) for flag in (True, False))
        except QwenMLXError:  # a template that cannot render a plain turn: Qwen3's rules, and its own errors later
            return qwen3.SWITCHED
        return qwen3.thinking_control(qwen3.prompt_phase(on, self.special), qwen3.prompt_phase(off, self.special))

    def _thinking(self, messages: list[dict], o: TurnOptions) -> tuple[bool, list[str]]:
        """The turn's thinking mode, and a note when what was asked does not apply to this model."""
        asked = thinking_mode(messages, o.enable_thinking)
        if self.thinking_control == qwen3.ALWAYS_THINKS:
            note = "this model always thinks (Thinking-2507): enable_thinking=false and /no_think do not apply"
            return True, [] if asked else [note]
        if self.thinking_control == qwen3.NEVER_THINKS:
            wanted = o.thinking_budget is not None or qwen3.latest_switch(messages) == "think"
            note = "this model does not think (Instruct-2507): /think and thinking budgets do not apply"
            return False, [note] if wanted else []
        return asked, []

    def render(
        self,
        messages: Sequence[dict],
        tools: list[dict] | None = None,
        enable_thinking: bool = True,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """The prompt token ids for these messages, through the checkpoint's template."""
        messages = normalize_messages(messages)
        if self.tool_format == qwen3.XML_TOOL_CALLS:
            messages = qwen3.arguments_as_objects(messages)
        text = self.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            enable_thinking=enable_thinking,
            add_generation_prompt=True,
            **(template_kwargs or {}),
        )
        return self.encode(text, "messages")

    def encode(self, text: str, param: str) -> list[int]:
        """`text`'s token ids; a text too long for the context by its size alone is refused before the
        tokenizer sees it (tokenizing megabytes takes seconds and gigabytes, to count what cannot fit)."""
        _valid_text(text, param)
        if len(text) * 4 >= self.context_length:  # under that, its bytes are too few for the bound to refuse it
            fewest = _fewest_tokens(text, self.tokenizer.longest_token_bytes)
            if fewest >= self.context_length:
                raise ContextLengthExceeded(
                    f"the prompt is at least {fewest} tokens ({len(text)} characters) but the model's context "
                    f"is {self.context_length}: shorten the conversation",
                    param=param,
                )
        return self.tokenizer.encode(text)

    def fit(self, prompt_len: int, max_tokens: int | None, param: str = "messages") -> int:
        """The max tokens to use: refused if the prompt leaves no room, else capped to the room left."""
        if max_tokens is not None and max_tokens < 1:  # as every protocol's API has it (a reply of nothing is no turn)
            raise QwenMLXError(f"max_tokens={max_tokens} is invalid: it must be at least 1", param="max_tokens")
        room = self.context_length - prompt_len
        if room <= 0:
            raise ContextLengthExceeded(
                f"the prompt is {prompt_len} tokens but the model's context is {self.context_length}: "
                "shorten the conversation",
                param=param,
            )
        if max_tokens is None:
            max_tokens = self.default_max_tokens
        return room if max_tokens is None else min(max_tokens, room)

    def plan(self, messages: Sequence[dict], options: TurnOptions | None = None) -> TurnPlan:
        """Render, tokenize and set up one chat turn (CPU work: a server runs it off its event loop)."""
        o = options or TurnOptions()
        if o.thinking_budget is not None and o.thinking_budget < 0:
            message = f"thinking_budget={o.thinking_budget} is invalid: it must be >= 0"
            raise QwenMLXError(message, param="thinking_budget")
        reserved = sorted(o.template_kwargs.keys() & set(RESERVED_TEMPLATE_KWARGS))
        if reserved:
            raise QwenMLXError(f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")
        messages = normalize_messages(messages)
        tools = list(o.tools) if o.tools else None
        choice = _tool_choice(o.tool_choice, tools)
        prompt_ids = self.render(messages, tools, o.enable_thinking, o.template_kwargs)
        max_tokens = self.fit(len(prompt_ids), o.max_tokens)
        thinking, notes = self._thinking(messages, o)
        sampling = (o.sampling or Sampling()).resolve(self.generation_config, thinking)
        guide = TurnGuide(
            self.tokenizer,
            self.vocab_size,
            prompt_ids,
            budget=o.thinking_budget,
            tool_choice=choice,
            tools=tools or (),
            parallel_tool_calls=o.parallel_tool_calls,
            response_format=o.response_format,
            penalties=sampling.logits_processors(self.vocab_size),
            tool_format=self.tool_format,
        )
        return TurnPlan(
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            sampler=sampling.sampler(self.vocab_size),
            guide=guide,
            stop=_stops(o.stop),
            tool_calls=bool(tools),
            tools=list(tools or ()),
            tool_format=self.tool_format,
            thinking=thinking,
            top_logprobs=o.top_logprobs,
            speculative=o.speculative,
            notes=notes,
        )

    def plan_text(self, prompt: str | Sequence[int], options: TurnOptions | None = None) -> TurnPlan:
        """A raw completion: the prompt as given (text or token ids), the reply as plain text."""
        o = options or TurnOptions()
        if isinstance(prompt, str):
            prompt_ids = self.encode(prompt, "prompt")
        else:
            prompt_ids = list(prompt)
            if any(not 0 <= t < self.vocab_size for t in prompt_ids):
                raise QwenMLXError(f"prompt token ids must be between 0 and {self.vocab_size - 1}", param="prompt")
        if not prompt_ids:
            raise QwenMLXError("prompt is empty", param="prompt")
        max_tokens = self.fit(len(prompt_ids), o.max_tokens, "prompt")
        sampling = (o.sampling or Sampling()).resolve(self.generation_config, False)
        penalties = sampling.logits_processors(self.vocab_size)
        return TurnPlan(
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            sampler=sampling.sampler(self.vocab_size),
            guide=TurnGuide(self.tokenizer, self.vocab_size, prompt_ids, penalties=penalties),
            stop=_stops(o.stop),
            chat=False,
            tool_calls=False,
            thinking=False,
            top_logprobs=o.top_logprobs,
            speculative=o.speculative,
        )

    def reader(self, plan: TurnPlan, *, cached: int = 0, started: float | None = None) -> TurnReader:
        return TurnReader(self, plan, cached=cached, started=started)


class LoopGuard:
    """Notices a reply stuck repeating itself (Qwen3's known endless-thinking loop, or a small model's): the
    last tokens are one span of at most `MAX_PERIOD` tokens, repeated until they cover `MIN_LOOP` tokens and
    at least `MIN_REPEATS` times. Checked every `EVERY` tokens; a few milliseconds of list compares at most.

    The bounds keep real text safe: a Markdown rule or a zero-filled array is far shorter than 1024 tokens of
    one repeated span. A caught loop ends the turn with finish reason "length" and a log line.
    """

    MAX_PERIOD = 256
    MIN_LOOP = 1024
    MIN_REPEATS = 8
    EVERY = 64

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.period: int | None = None  # the repeated span's length, once a loop is caught

    def feed(self, token: int) -> bool:
        """Add a generated token; True at the token that shows the reply is looping (`period` says so after)."""
        tokens = self.tokens
        tokens.append(token)
        if self.period is not None or len(tokens) % self.EVERY or len(tokens) < self.MIN_LOOP:
            return False
        for period in range(1, self.MAX_PERIOD + 1):
            span = max(self.MIN_LOOP, self.MIN_REPEATS * period)
            if span > len(tokens):
                break
            if tokens[-span + period :] == tokens[-span:-period]:  # periodic over the whole span
                self.period = period
                return True
        del tokens[: -(self.MAX_PERIOD * self.MIN_REPEATS)]  # older tokens cannot be part of a loop check
        return False


class TurnReader:
    """Reads one plan's tokens: `feed` each sampled token, `finish` once generation ends."""

    def __init__(self, turns: Turns, plan: TurnPlan, *, cached: int = 0, started: float | None = None):
        self.plan = plan
        self.tokenizer = turns.tokenizer
        self.end_ids = set(turns.tokenizer.end_token_ids)
        special = turns.special
        parsed = special if plan.tool_calls else replace(special, tool_call_start=None, tool_call_end=None)
        in_thinking = qwen3.prompt_phase(plan.prompt_ids, special) == qwen3.THINKING
        self.parser = ReplyParser(parsed, in_thinking, plan.stop, tool_format=plan.tool_format, tools=plan.tools)
        self.stops = StopStrings(plan.stop)
        self.detokenizer = turns.tokenizer.detokenizer()
        self.started = time.perf_counter() if started is None else started
        self.first_token_at: float | None = None
        n = len(plan.prompt_ids)
        self.stats = ChatStats(prefill_tokens=n - cached, prompt_tokens=n, cached_tokens=cached, thinking=plan.thinking)
        self.loop = LoopGuard()

    @property
    def stopped(self) -> bool:
        """A stop string or a caught loop ended the reply: the caller should end the generation."""
        return self.stop_found or self.loop.period is not None

    @property
    def stop_found(self) -> bool:
        return self.parser.stopped if self.plan.chat else self.stops.stopped

    def feed(self, token: int) -> list[Event]:
        """One sampled token's events (none for an end token)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.stats.completion_tokens += 1
        if token in self.end_ids:
            return []
        if self.loop.feed(token):
            log.warning(
                "ending a reply that repeats a %d-token span (after %d tokens): finish reason length",
                self.loop.period,
                self.stats.completion_tokens,
            )
        text = self.detokenizer.add(token)
        if self.plan.chat:
            return self.parser.feed(token, text)
        piece = self.stops.feed(text)
        return [Answer(piece)] if piece else []

    def logprob(self, token: int, logprobs: mx.array) -> TokenLogprob | None:
        """The sampled token's log-probability and the top alternatives, when the plan asks for them."""
        top = self.plan.top_logprobs
        if top is None or token in self.end_ids:
            return None

        def piece(i: int) -> tuple[str, list[int]]:
            raw = self.tokenizer.token_bytes(i)
            try:
                return raw.decode("utf-8"), list(raw)
            except UnicodeDecodeError:  # part of a character: named by its bytes, as OpenAI's API does
                return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)

        chosen = _finite(logprobs[token].item())
        tops = []
        if top:
            best = mx.argpartition(-logprobs, top - 1)[:top]
            values = [_finite(v) for v in logprobs[best].tolist()]
            for i, value in sorted(zip(best.tolist(), values, strict=True), key=lambda p: -p[1]):
                text, raw = piece(i)
                tops.append((text, value, raw))
        text, raw = piece(token)
        return TokenLogprob(text, chosen, raw, tops)

    def finish(self, finish_reason: str | None) -> tuple[list[Event], ChatStats]:
        """The held-back text, and the turn's stats; `finish_reason` is the loop's ("stop", "length" or None
        when the caller ended it)."""
        events = self.parser.finish() if self.plan.chat else [Answer(self.stops.flush())]
        events = [e for e in events if not (isinstance(e, Answer) and not e.text)]
        if self.loop.period is not None and not self.stop_found:
            finish = "length"  # cut short, as by a token limit: the client may ask for more
        else:
            finish = "stop" if self.stop_found else (finish_reason or "stop")
        if finish == "stop" and self.plan.chat and self.parser.tool_calls:
            finish = "tool_calls"
        stats = self.stats
        stats.finish_reason = finish
        stats.reasoning_tokens = self.parser.reasoning_tokens if self.plan.chat else 0
        stats.stop_sequence = self.parser.stop_sequence if self.plan.chat else self.stops.matched
        stats.notes = list(self.plan.notes)
        stats.measure(self.started, self.first_token_at, time.perf_counter())
        return events, stats
