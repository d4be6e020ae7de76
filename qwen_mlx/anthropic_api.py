"""Anthropic's Messages API on `qwen-mlx serve`: `POST /v1/messages` (SSE when `stream`) and
`POST /v1/messages/count_tokens`, so Claude Code and the `anthropic` SDK run on a local Qwen3.

A request becomes the one turn pipeline's messages and options (`plan_messages`), and the turn's events
become Anthropic's content blocks: `thinking` (Qwen3's reasoning), `text`, and `tool_use`.

Design decisions:
- Thinking in Anthropic's terms: `thinking: {type: "enabled", budget_tokens: N}` is Qwen3's thinking budget,
  `{type: "disabled"}` turns thinking off, `adaptive` or absent leaves the model's default (thinking on),
  and `output_config.effort` maps to budgets as `reasoning_effort` does on Chat Completions. A thinking
  block sent back reaches the template as `reasoning_content`; its `signature` is empty (nothing signs it
  here) and ignored on the way back.
- `tool_choice` `auto` / `any` / `tool` / `none` and `disable_parallel_tool_use` are the guide's
  `tool_choice` and `parallel_tool_calls`; `output_config.format` (a JSON schema) is `response_format`.
- Agents send what a local server cannot honour (`cache_control`, `context_management`, `metadata`,
  `service_tier`, beta headers): accepted and ignored, never a 400. Server tools (`web_search_*`,
  `bash_*`, any tool with a `type` other than `custom`) cannot run here: they are left out of the prompt,
  with a log line. Images and documents are refused with a clear 400 (Qwen3 reads text only).
- Usage as Anthropic counts it: `input_tokens` excludes `cache_read_input_tokens` (the prompt tokens the
  prefix cache already held), so their sum is the prompt.
- Streaming follows Anthropic's event sequence exactly (`message_start`, `content_block_start`,
  `content_block_delta`, `content_block_stop`, `message_delta`, `message_stop`), with a `ping` after
  `message_start` and while a long prompt is prefilled, so clients with read timeouts keep waiting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .format import function_tool
from .parser import Answer, Reasoning, ToolCall, ToolCallError
from .protocol import BUSY, Body
from .sampling import Sampling
from .scheduler import Failed, Finished, Scheduler, Ticket
from .turn import EFFORT_BUDGETS, TurnOptions, TurnPlan, Turns
from .wire import APIError, gather, sse, updates

log = logging.getLogger("qwen_mlx.serve")

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class Block(BaseModel):
    """A content block; only the fields of the types used here are read, the rest is ignored."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None
    thinking: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[Block] | None = None
    is_error: bool | None = None


class InputMessage(Body):
    role: Literal["user", "assistant", "system"]  # Claude Code puts system reminders between turns
    content: str | list[Block]


class ThinkingConfig(Body):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=0)


class JsonOutputFormat(Body):
    type: Literal["json_schema"] = "json_schema"
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Body):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: JsonOutputFormat | None = None


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(min_length=1, max_length=256)
    type: str | None = None  # None or "custom": a function; anything else is a server tool
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class ToolChoice(Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class MessagesRequest(Body):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[Block] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice | None = None


class CountTokensRequest(Body):
    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[Block] | None = None
    thinking: ThinkingConfig | None = None
    tools: list[ToolSpec] | None = None


Block.model_rebuild()


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    """Anthropic's error, as every status but 200 answers it here (documented in `/openapi.json`)."""

    type: Literal["error"] = "error"
    error: ErrorDetail


def _text(content: str | list[Block] | None, where: str) -> str:
    """The text of a string or a list of text blocks; other blocks are refused (text-only model)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if block.type == "text":
            parts.append(block.text or "")
        elif block.type in ("image", "document", "search_result"):
            raise APIError(400, f"{where}: {block.type} blocks are not supported: this model reads text only")
        else:
            raise APIError(400, f"{where}: a {block.type!r} block is not allowed here")
    return "\n\n".join(parts) if where == "system" else "".join(parts)


def template_messages(system, messages: list[InputMessage]) -> list[dict]:
    """Anthropic's system and messages as the Qwen3 template reads them (OpenAI's roles and fields)."""
    out: list[dict] = []
    if system:
        out.append({"role": "system", "content": _text(system, "system")})
    for i, message in enumerate(messages):
        where = f"messages.{i}.content"
        blocks = [Block(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        if message.role == "system":
            out.append({"role": "system", "content": _text(blocks, where)})
            continue
        if message.role == "user":
            text = []
            for block in blocks:
                if block.type == "tool_result":
                    result = _text(block.content, f"{where}: tool_result")
                    content = f"Error: {result}" if block.is_error else result
                    out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": content})
                else:
                    text.append(_text([block], where))
            if text or not out or out[-1]["role"] != "tool":
                out.append({"role": "user", "content": "".join(text)})
            continue
        turn: dict[str, Any] = {"role": "assistant", "content": ""}
        calls = []
        for block in blocks:
            if block.type == "text":
                turn["content"] += block.text or ""
            elif block.type == "thinking":
                turn["reasoning_content"] = turn.get("reasoning_content", "") + (block.thinking or "")
            elif block.type == "redacted_thinking":
                continue  # encrypted by another model: nothing to read
            elif block.type == "tool_use":
                if not block.name:
                    raise APIError(400, f"{where}: a tool_use block needs a name")
                function = {"name": block.name, "arguments": block.input or {}}
                calls.append({"id": block.id, "type": "function", "function": function})
            else:
                raise APIError(400, f"{where}: a {block.type!r} block is not allowed in an assistant turn")
        if calls:
            turn["tool_calls"] = calls
        out.append(turn)
    return out


def _tools(tools: list[ToolSpec] | None) -> list[dict] | None:
    functions = []
    for tool in tools or []:
        if tool.type not in (None, "custom"):
            log.info("leaving out the server tool %s (%s): it cannot run here", tool.name, tool.type)
            continue
        functions.append(function_tool(tool.name, tool.description, tool.input_schema))
    return functions or None


def _thinking(body: MessagesRequest | CountTokensRequest) -> tuple[bool, int | None]:
    """(enable_thinking, budget) from `thinking` and `output_config.effort`."""
    thinking = body.thinking
    if thinking is not None and thinking.type == "disabled":
        return False, None
    if thinking is not None and thinking.type == "enabled" and thinking.budget_tokens is not None:
        return True, thinking.budget_tokens
    effort = getattr(body, "output_config", None) and body.output_config.effort
    return True, EFFORT_BUDGETS[effort] if effort else None


def _tool_choice(choice: ToolChoice | None, tools: list[dict] | None) -> tuple[str | None, bool]:
    """(the guide's tool_choice, parallel_tool_calls)."""
    if choice is None:
        return None, True
    parallel = not choice.disable_parallel_tool_use
    if choice.type == "tool":
        if not choice.name:
            raise APIError(400, 'tool_choice: {"type": "tool"} needs the tool\'s name', param="tool_choice")
        return choice.name, parallel
    if choice.type == "any":
        return "required", parallel
    return (None if choice.type == "auto" else "none"), parallel


def plan_messages(turns: Turns, body: MessagesRequest) -> TurnPlan:
    """A Messages request as the one turn pipeline's plan (CPU work: run it off the event loop)."""
    tools = _tools(body.tools)
    choice, parallel = _tool_choice(body.tool_choice, tools)
    enable_thinking, budget = _thinking(body)
    output = body.output_config.format if body.output_config else None
    options = TurnOptions(
        tools=tools,
        tool_choice=choice if tools or choice not in (None, "none") else None,
        parallel_tool_calls=parallel,
        response_format={"type": "json_schema", "json_schema": {"name": "output", "schema": output.schema_}}
        if output
        else None,
        enable_thinking=enable_thinking,
        thinking_budget=budget,
        max_tokens=body.max_tokens,
        sampling=Sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k),
        stop=body.stop_sequences or (),
    )
    return turns.plan(template_messages(body.system, body.messages), options)


def count_tokens(turns: Turns, body: CountTokensRequest) -> int:
    enable_thinking, _ = _thinking(body)
    messages = template_messages(body.system, body.messages)
    return len(turns.render(messages, _tools(body.tools), enable_thinking))


def usage(stats) -> dict:
    return {
        "input_tokens": stats.prompt_tokens - stats.cached_tokens,
        "output_tokens": stats.completion_tokens,
        "cache_read_input_tokens": stats.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def stop_reason(stats) -> tuple[str, str | None]:
    if stats.stop_sequence is not None:
        return "stop_sequence", stats.stop_sequence
    return STOP_REASONS.get(stats.finish_reason, "end_turn"), None


def content_blocks(events) -> list[dict]:
    """The turn's events as Anthropic's content blocks, neighbours of one kind merged."""
    blocks: list[dict] = []
    for event in events:
        if isinstance(event, Reasoning):
            if blocks and blocks[-1]["type"] == "thinking":
                blocks[-1]["thinking"] += event.text
            else:
                blocks.append({"type": "thinking", "thinking": event.text, "signature": ""})
        elif isinstance(event, Answer | ToolCallError):  # a broken call stays text, never dropped
            text = event.text if isinstance(event, Answer) else event.raw
            if blocks and blocks[-1]["type"] == "text":
                blocks[-1]["text"] += text
            else:
                blocks.append({"type": "text", "text": text})
        elif isinstance(event, ToolCall):
            blocks.append({"type": "tool_use", "id": _tool_id(event), "name": event.name, "input": event.arguments})
    return blocks


def _tool_id(call: ToolCall) -> str:
    return call.id if call.id.startswith("toolu_") else f"toolu_{call.id.removeprefix('call_')}"


def add_routes(app, models, settings) -> None:
    """`/v1/messages` and `/v1/messages/count_tokens` on the server's app (`models`: the server's `Registry`,
    which hands out each request's model)."""

    @app.post("/v1/messages", responses=BUSY)
    async def messages(body: MessagesRequest, request: Request):
        scheduler = (await models.get(body.model)).scheduler
        turn = await asyncio.to_thread(plan_messages, scheduler.turns, body)
        ticket = scheduler.submit(turn)
        message = {
            "id": f"msg_{uuid.uuid4().hex}",
            "type": "message",
            "role": "assistant",
            "model": body.model,
        }
        if body.stream:
            stream = _message_stream(scheduler, ticket, message, settings.keepalive_s)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        events, _, stats = await gather(scheduler, ticket, request)
        reason, sequence = stop_reason(stats)
        return {
            **message,
            "content": content_blocks(events),
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": usage(stats),
        }

    @app.post("/v1/messages/count_tokens")
    async def messages_count_tokens(body: CountTokensRequest):
        scheduler = (await models.get(body.model)).scheduler
        return {"input_tokens": await asyncio.to_thread(count_tokens, scheduler.turns, body)}


async def _message_stream(
    scheduler: Scheduler, ticket: Ticket, message: dict, keepalive_s: float
) -> AsyncIterator[str]:
    def event(kind: str, **payload) -> str:
        return sse({"type": kind, **payload}, event=kind)

    opened: str | None = None  # the type of the content block now open
    index = -1

    def stop() -> list[str]:
        nonlocal opened
        if opened is None:
            return []
        frames = [event("content_block_stop", index=index)]
        if opened == "thinking":  # a thinking block ends with its (here empty) signature
            frames.insert(
                0, event("content_block_delta", index=index, delta={"type": "signature_delta", "signature": ""})
            )
        opened = None
        return frames

    def start(kind: str, block: dict) -> list[str]:
        nonlocal opened, index
        frames = stop()
        index += 1
        opened = kind
        return [*frames, event("content_block_start", index=index, content_block=block)]

    try:
        head = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
        prompt = len(ticket.turn.prompt_ids)  # the cache's share is known once the turn starts: message_delta
        head["usage"] = {"input_tokens": prompt, "output_tokens": 0, "cache_read_input_tokens": 0}
        yield event("message_start", message=head)
        yield event("ping")
        async for update in updates(ticket, keepalive_s):
            if update is None:  # a long prefill: keep the client's read timeout from firing
                yield event("ping")
                continue
            if isinstance(update, Failed):
                yield event("error", error={"type": "api_error", "message": update.error})
                return
            if isinstance(update, Finished):
                for frame in stop():
                    yield frame
                reason, sequence = stop_reason(update.stats)
                yield event(
                    "message_delta",
                    delta={"stop_reason": reason, "stop_sequence": sequence},
                    usage=usage(update.stats),
                )
                yield event("message_stop")
                return
            for item in update.events:
                if isinstance(item, Reasoning):
                    if opened != "thinking":
                        for frame in start("thinking", {"type": "thinking", "thinking": "", "signature": ""}):
                            yield frame
                    yield event(
                        "content_block_delta", index=index, delta={"type": "thinking_delta", "thinking": item.text}
                    )
                elif isinstance(item, Answer | ToolCallError):
                    if opened != "text":
                        for frame in start("text", {"type": "text", "text": ""}):
                            yield frame
                    text = item.text if isinstance(item, Answer) else item.raw
                    yield event("content_block_delta", index=index, delta={"type": "text_delta", "text": text})
                elif isinstance(item, ToolCall):
                    block = {"type": "tool_use", "id": _tool_id(item), "name": item.name, "input": {}}
                    for frame in start("tool_use", block):
                        yield frame
                    delta = {"type": "input_json_delta", "partial_json": json.dumps(item.arguments)}
                    yield event("content_block_delta", index=index, delta=delta)
    finally:
        scheduler.done(ticket)
