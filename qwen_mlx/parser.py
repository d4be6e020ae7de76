"""Splits a streamed Qwen3 reply into reasoning, answer text and tool calls, token by token.

Design decisions:
- Driven by token ids, not by text: `<think>`, `</think>`, `<tool_call>` and `</tool_call>` are single
  special tokens in Qwen3's vocabulary, so a user or a model writing the characters "<think>" inside
  ordinary text can never be mistaken for a tag (the tokenizer would have made them the special token).
- The starting state comes from the prompt (`format.prompt_phase`): a template that already opened `<think>`
  (Thinking-2507) starts in reasoning; one that pre-filled the empty block (`enable_thinking=False`) starts in
  the answer.
- The newlines the template puts around the block (`<think>\\n`, `\\n</think>\\n\\n`) are not content: they
  are dropped, as the template itself drops them when it renders `reasoning_content` back.
- A `<tool_call>` inside reasoning is reasoning text. A tool call that is not a JSON object with a string
  `name` (or is cut off) becomes a `ToolCallError` carrying the raw block, never silently dropped.
- Stop strings apply to the answer only (a stop of "\\n\\n" must not end a model that is still thinking);
  text that might be the start of a stop string is held back until it is known not to be.
Written here because no library parses Qwen3's token-level format; the parser is plain Python with no
MLX, and unit-testable with any token ids.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .format import SpecialIds


@dataclass(frozen=True)
class Reasoning:
    text: str


@dataclass(frozen=True)
class Answer:
    text: str


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True)
class ToolCallError:
    raw: str
    error: str


Event = Reasoning | Answer | ToolCall | ToolCallError


def parse_tool_call(raw: str) -> ToolCall | ToolCallError:
    """One `<tool_call>` body: `{"name": ..., "arguments": {...}}` (arguments may also be a JSON string)."""
    block = f"<tool_call>{raw}</tool_call>"
    try:
        call = json.loads(raw)
    except json.JSONDecodeError as e:
        return ToolCallError(block, f"the tool call is not valid JSON ({e})")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return ToolCallError(block, 'the tool call must be a JSON object with a "name" string')
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return ToolCallError(block, f"the tool call's arguments are not valid JSON ({e})")
    if not isinstance(arguments, dict):
        return ToolCallError(block, "the tool call's arguments must be a JSON object")
    return ToolCall(call["name"], arguments)


class StopStrings:
    """Cuts text at the first stop string, holding back any tail that could still become one."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        """Return the text that is safe to emit now."""
        if not self.stops:
            return text
        self.pending += text
        hits = [(i, stop) for stop in self.stops if (i := self.pending.find(stop)) >= 0]
        if hits:
            at, self.matched = min(hits, key=lambda hit: hit[0])
            out, self.pending, self.stopped = self.pending[:at], "", True
            return out
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class ReplyParser:
    """Feed (token id, its text) pairs; get events. `finish()` flushes what is held back."""

    def __init__(self, special: SpecialIds, in_thinking: bool = False, stop: Sequence[str] = ()):
        self.special = special
        self.in_thinking = in_thinking
        self.in_tool_call = False
        self.reasoning_tokens = 0  # tokens of the think block, its tags and any forced text included
        self.thought_tokens = 0  # tokens between the tags: what a thinking budget counts
        self.tool_calls = 0
        self._started = False  # anything but whitespace emitted (a later <think> is then plain text)
        self._answer_started = False
        self._reasoning_started = False
        self._held_newlines = ""  # trailing newlines of reasoning, dropped if </think> follows
        self._tool_text = ""
        self._stops = StopStrings(stop)

    @property
    def stopped(self) -> bool:
        """A stop string was found: the caller should end the generation."""
        return self._stops.stopped

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended the reply, if one did."""
        return self._stops.matched

    def feed(self, token: int, text: str) -> list[Event]:
        special = self.special
        if self.in_thinking:
            self.reasoning_tokens += 1
            if token == special.think_end:
                self.in_thinking = False
                self._held_newlines = ""
                return []
            self.thought_tokens += 1
            return self._reasoning(text)
        if token == special.think_start and not self._started:
            self.in_thinking = True
            self.reasoning_tokens += 1
            return []
        if self.in_tool_call:
            if token == special.tool_call_end:
                self.in_tool_call = False
                self.tool_calls += 1
                return [parse_tool_call(self._tool_text)]
            self._tool_text += text
            return []
        if token == special.tool_call_start:
            self.in_tool_call, self._tool_text = True, ""
            return self._answer(self._stops.flush())
        return self._answer(self._stops.feed(text))

    def _reasoning(self, text: str) -> list[Event]:
        if not self._reasoning_started:
            text = text.lstrip("\n")
            if not text:
                return []
            self._reasoning_started = True
        text = self._held_newlines + text
        body = text.rstrip("\n")
        self._held_newlines = text[len(body) :]
        return [Reasoning(body)] if body else []

    def _answer(self, text: str) -> list[Event]:
        if not self._answer_started:
            text = text.lstrip("\n")
            if not text:
                return []
            self._answer_started = True
        if text.strip():
            self._started = True
        return [Answer(text)] if text else []

    def finish(self) -> list[Event]:
        """End of generation: flush held text; an unfinished tool call becomes an error event."""
        events: list[Event] = []
        if self.in_tool_call:
            self.in_tool_call = False
            block = f"<tool_call>{self._tool_text}"
            events.append(ToolCallError(block, "the tool call was cut off before </tool_call>"))
        if self.in_thinking:
            self._held_newlines = ""
        events.extend(self._answer(self._stops.flush()))
        return events
