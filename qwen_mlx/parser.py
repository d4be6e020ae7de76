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
- Two call formats inside the same `<tool_call>` tokens: Qwen3's JSON, and Qwen3-Coder's XML
  (`<function=NAME><parameter=KEY>value</parameter>...</function>`, `format.tool_call_format` tells which a
  template renders). XML values are text; each is typed by the tool's JSON schema (integer, number,
  boolean, null, object, array), and kept as text where it does not parse as its type, so a call is never
  lost to a model's formatting.
- Stop strings apply to the answer only (a stop of "\\n\\n" must not end a model that is still thinking);
  text that might be the start of a stop string is held back until it is known not to be.
Written here because no library parses Qwen3's token-level format; the parser is plain Python with no
MLX, and unit-testable with any token ids.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .format import JSON_TOOL_CALLS, XML_TOOL_CALLS, SpecialIds

_XML_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*)</function>\s*", re.S)
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.S)


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


def parse_xml_tool_call(raw: str, schemas: Mapping[str, dict] | None = None) -> ToolCall | ToolCallError:
    """One Qwen3-Coder `<tool_call>` body, `<function=NAME>` and its `<parameter=KEY>value</parameter>`s;
    `schemas` maps a tool's name to its parameters' JSON schema, which types the values."""
    block = f"<tool_call>{raw}</tool_call>"
    match = _XML_FUNCTION.fullmatch(raw)
    if match is None:
        return ToolCallError(block, "the tool call must be one <function=NAME>...</function> block")
    name, body = match.group(1).strip(), match.group(2)
    if not name:
        return ToolCallError(block, "the tool call's <function=...> has no name")
    properties = ((schemas or {}).get(name) or {}).get("properties") or {}
    arguments: dict[str, Any] = {}
    for key, value in _XML_PARAMETER.findall(body):
        key = key.strip()
        value = value.removeprefix("\n").removesuffix("\n")  # the template's own line breaks around a value
        arguments[key] = typed_value(value, properties.get(key))
    if _XML_PARAMETER.sub("", body).strip():
        return ToolCallError(block, "the tool call holds text outside its <parameter=...> blocks")
    return ToolCall(name, arguments)


def typed_value(text: str, schema: dict | None) -> Any:
    """An XML parameter's text as the JSON type its schema names; the text itself when it does not parse."""
    kinds = schema_types(schema)
    if not kinds or kinds == {"string"}:
        return text
    stripped = text.strip()
    if "null" in kinds and stripped == "null":
        return None
    if "boolean" in kinds and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    if kinds & {"integer", "number", "object", "array"}:
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return text
        if isinstance(value, bool):
            return text
        if isinstance(value, int) and kinds & {"integer", "number"}:
            return value
        if isinstance(value, float) and ("number" in kinds or ("integer" in kinds and value.is_integer())):
            return int(value) if "number" not in kinds else value
        if (isinstance(value, dict) and "object" in kinds) or (isinstance(value, list) and "array" in kinds):
            return value
    return text


def schema_types(schema: dict | None) -> set[str]:
    """The JSON types a (sub)schema allows: its `type` (a name or a list), or its `anyOf`/`oneOf` members'."""
    if not isinstance(schema, dict):
        return set()
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return {k for k in kind if isinstance(k, str)}
    if "enum" in schema and all(isinstance(v, str) for v in schema["enum"] or ()):
        return {"string"}
    members = schema.get("anyOf") or schema.get("oneOf") or []
    return set().union(*(schema_types(m) for m in members)) if isinstance(members, list) else set()


def tool_schemas(tools: Sequence[dict] | None) -> dict[str, dict]:
    """{tool name: its parameters' JSON schema}, from OpenAI tool definitions."""
    schemas = {}
    for tool in tools or ():
        function = tool.get("function") or tool if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            parameters = function.get("parameters")
            schemas[function["name"]] = parameters if isinstance(parameters, dict) else {}
    return schemas


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

    def __init__(
        self,
        special: SpecialIds,
        in_thinking: bool = False,
        stop: Sequence[str] = (),
        *,
        tool_format: str = JSON_TOOL_CALLS,
        tools: Sequence[dict] | None = None,
    ):
        self.special = special
        self.tool_format = tool_format
        self._schemas = tool_schemas(tools)
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
                if self.tool_format == XML_TOOL_CALLS and not self._tool_text.lstrip().startswith("{"):
                    return [parse_xml_tool_call(self._tool_text, self._schemas)]  # (a JSON call still parses)
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
