"""OpenAI's Responses API on `qwen-mlx serve`: `POST /v1/responses` (SSE when `stream`), `GET` and
`DELETE /v1/responses/{id}`, so Codex CLI and the `openai` SDK's `client.responses` run on a local Qwen3.

A request becomes the one turn pipeline's messages and options (`plan_response`), and the turn's events
become Responses' output items: `reasoning` (Qwen3's thinking, as `reasoning_text` content), `message`
(`output_text`), and `function_call`.

Design decisions:
- Items to messages: `message` items keep their role (`developer` is `system`; the leading system and
  developer messages, after `instructions`, are joined into the one system prompt Qwen3 was trained on);
  a `reasoning` item (its `content` text, else its `summary` text), the assistant `message` and the
  `function_call` items after it are one assistant turn (`reasoning_content`, `content`, `tool_calls`);
  each `function_call_output` is a `tool` message. Images, files and audio are refused with a clear 400
  (Qwen3 reads text only); input items that have no place in a text prompt (`item_reference`, hosted
  tools' calls) are left out with a log line.
- Tools in Responses' flat shape become Chat Completions' nested one. A `namespace` tool's functions are
  flattened into the list under their own names (qualified `namespace__name` only when two collide) and
  a call to one comes back with its `namespace`. Hosted and other tools (`web_search`, `file_search`,
  `computer_use_preview`, `local_shell`, `custom`, MCP, ...) cannot run here: they are left out of the
  prompt with a log line, never a 400; so is a `tool_choice` that forces one.
- `reasoning.effort`: `none` turns thinking off; `minimal` / `low` / `medium` are thinking budgets of
  256 / 1024 / 8192 tokens; `high`, `xhigh` and `max` are unbounded (as `reasoning_effort` on Chat
  Completions). `reasoning.summary` is accepted: the thinking comes back whole as `reasoning_text`
  content, and `summary` stays empty (nothing here writes summaries); `encrypted_content` is never set.
  `text.format` (`json_schema`, `json_object`) is `response_format`, enforced after the model has thought.
- State: `store` (default true) keeps the response and the conversation's input items in an in-memory
  LRU of `STORE_SIZE` (256) responses per server, for `previous_response_id`, `GET` and `DELETE`; it is
  lost when the server stops. A continuation is the stored input items, then the stored output, then
  the new input; `instructions` are not carried over (OpenAI's rule). The KV cache needs no bookkeeping
  here: the rendered prompt repeats, and the scheduler's prefix cache finds it.
- Agents send what a local server cannot honour (`include`, `prompt_cache_key`, `service_tier`,
  `truncation`, `background`, `client_metadata`, `text.verbosity`, ...): accepted, echoed where the
  `Response` object has a place for them, and ignored, never a 400. `conversation` is refused: it names
  server-side state this server does not keep (use `previous_response_id`).
- Usage as Responses counts it: `input_tokens` is the whole prompt, `input_tokens_details.cached_tokens`
  the part the prefix cache already held; `output_tokens` includes `reasoning_tokens`. A reply cut at
  `max_output_tokens` (or the context) is `status: "incomplete"`, reason `max_output_tokens`.
- Streaming follows Responses' event sequence (`response.created`, `response.in_progress`, per item
  `output_item.added` ... `output_item.done`, then `response.completed` or `response.incomplete`), every
  event with its `event:` line and a `sequence_number` from 0; an SSE comment keeps the connection alive
  while a long prompt is prefilled. The whole response is built by the same item builder with its events
  dropped, so both give the same output.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
import uuid
from collections import Counter, OrderedDict
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
from .wire import KEEPALIVE, APIError, gather, sse, updates

log = logging.getLogger("qwen_mlx.serve")

STORE_SIZE = 256
# reasoning.effort -> thinking budget in tokens (None: unbounded); "none" turns thinking off.
TEXT_PARTS = ("input_text", "output_text", "text")
MEDIA_PARTS = ("input_image", "input_file", "input_audio")
ROLES = ("user", "system", "developer", "assistant")


class Part(BaseModel):
    """A content part; only the text of the text types is read, the rest is kept as sent."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None
    refusal: str | None = None


class InputItem(BaseModel):
    """An input item: the fields of `message`, `reasoning`, `function_call` and `function_call_output`
    (others are kept as sent and left out of the prompt)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str | None = None  # None: a message (Responses' "easy" input message)
    id: str | None = None
    role: str | None = None
    content: str | list[Part] | None = None
    summary: list[Part] | None = None
    call_id: str | None = None
    name: str | None = None
    namespace: str | None = None
    arguments: str | dict[str, Any] | None = None
    output: str | list[Part] | None = None


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    name: str | None = Field(default=None, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    tools: list[ToolSpec] | None = None  # a namespace's functions


class ToolChoiceSpec(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    name: str | None = None
    namespace: str | None = None
    mode: Literal["auto", "required"] | None = None  # allowed_tools
    tools: list[dict[str, Any]] | None = None  # allowed_tools


class ReasoningConfig(Body):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: str | None = None
    generate_summary: str | None = None


class TextFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(Body):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(Body):
    model: str | None = None
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["auto", "none", "required"] | ToolChoiceSpec | None = None
    parallel_tool_calls: bool | None = None
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    include: list[str] | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: str | None = None


ToolSpec.model_rebuild()


class Stored:
    """A stored response and the conversation's input items before its output."""

    def __init__(self, response: dict, items: list[InputItem]):
        self.response, self.items = response, items

    def conversation(self) -> list[InputItem]:
        """The items a continuation starts from: the input, then this response's output."""
        return [*self.items, *(InputItem.model_validate(item) for item in self.response["output"])]


class ResponseStore:
    """The last `size` stored responses, least recently used out first."""

    def __init__(self, size: int = STORE_SIZE):
        self.size = size
        self._responses: OrderedDict[str, Stored] = OrderedDict()

    def put(self, stored: Stored) -> None:
        self._responses[stored.response["id"]] = stored
        self._responses.move_to_end(stored.response["id"])
        while len(self._responses) > self.size:
            self._responses.popitem(last=False)

    def get(self, response_id: str) -> Stored | None:
        stored = self._responses.get(response_id)
        if stored is not None:
            self._responses.move_to_end(response_id)
        return stored

    def pop(self, response_id: str) -> Stored | None:
        return self._responses.pop(response_id, None)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text(content: str | list[Part] | None, where: str) -> str:
    """The text of a string or a list of text parts; media parts are refused (text-only model)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type in TEXT_PARTS:
            texts.append(part.text or "")
        elif part.type == "refusal":
            texts.append(part.refusal or "")
        elif part.type in MEDIA_PARTS:
            message = f"{where}.content[{j}]: {part.type} parts are not supported: this model reads text only"
            raise APIError(400, message, param=f"{where}.content")
        else:
            raise APIError(400, f"{where}.content[{j}]: a {part.type!r} part is not allowed here", param=where)
    return "".join(texts)


def _reasoning_text(item: InputItem) -> str:
    """A reasoning item's text: its reasoning_text content, else its summary."""
    if isinstance(item.content, str):
        return item.content
    content = [p.text or "" for p in item.content or [] if p.type in ("reasoning_text", "text")]
    if content:
        return "".join(content)
    return "\n\n".join(p.text or "" for p in item.summary or [] if p.type == "summary_text")


class Tools:
    """The request's tools as the template reads them, and the way back from a prompt name to a call's
    `name` and `namespace`."""

    def __init__(self, tools: list[ToolSpec] | None):
        self.functions: list[dict] = []
        self.origin: dict[str, tuple[str | None, str]] = {}  # prompt name -> (namespace, name)
        self.prompt_name: dict[tuple[str | None, str], str] = {}
        found: list[tuple[ToolSpec, str | None, str]] = []  # (function, its namespace, where it was given)
        for i, tool in enumerate(tools or []):
            if tool.type == "function":
                found.append((tool, None, f"tools[{i}]"))
            elif tool.type == "namespace":
                if not tool.name:
                    raise APIError(400, f"tools[{i}]: a namespace tool needs a name", param=f"tools[{i}].name")
                for j, function in enumerate(tool.tools or []):
                    if function.type == "function":
                        found.append((function, tool.name, f"tools[{i}].tools[{j}]"))
                    else:
                        log.info("leaving out the %s tool %s.%s: it cannot run here", function.type, tool.name,
                                 function.name)  # fmt: skip
            else:
                log.info("leaving out the %s tool %s: it cannot run here", tool.type, tool.name or "")
        for tool, _, where in found:
            if not tool.name:
                raise APIError(400, f"{where}: a function tool needs a name", param=f"{where}.name")
        given = Counter(tool.name for tool, _, _ in found)
        for tool, namespace, where in found:
            name = f"{namespace}__{tool.name}" if namespace and given[tool.name] > 1 else tool.name
            if name in self.origin:
                raise APIError(400, f"{where}: the tool name {name!r} is given twice", param=f"{where}.name")
            self.functions.append(function_tool(name, tool.description, tool.parameters))
            self.origin[name] = (namespace, tool.name)
            self.prompt_name[(namespace, tool.name)] = name

    def name_in_prompt(self, name: str, namespace: str | None) -> str:
        return self.prompt_name.get((namespace, name)) or self.prompt_name.get((None, name)) or name

    def call_item(self, call: ToolCall) -> dict:
        namespace, name = self.origin.get(call.name, (None, call.name))
        item = {
            "id": _new_id("fc"),
            "type": "function_call",
            "status": "completed",
            "call_id": call.id,
            "name": name,
            "arguments": json.dumps(call.arguments, ensure_ascii=False),
        }
        if namespace:
            item["namespace"] = namespace
        return item

    def choice(self, choice: str | ToolChoiceSpec | None) -> str | None:
        """The guide's tool_choice; `allowed_tools` also narrows `functions` to the tools it names."""
        if choice is None or isinstance(choice, str):
            return choice
        if choice.type == "function":
            if not choice.name:
                raise APIError(400, 'tool_choice: {"type": "function"} needs the function\'s name', param="tool_choice")
            return self.name_in_prompt(choice.name, choice.namespace)
        if choice.type == "allowed_tools":
            allowed = {
                self.name_in_prompt(t["name"], t.get("namespace"))
                for t in choice.tools or []
                if t.get("type") == "function" and isinstance(t.get("name"), str)
            }
            self.functions = [f for f in self.functions if f["function"]["name"] in allowed]
            return choice.mode or "auto"
        log.info("tool_choice names a %s tool, which cannot run here: the model decides", choice.type)
        return None


def template_messages(instructions: str | None, items: list[InputItem], tools: Tools, first: int = 0) -> list[dict]:
    """Instructions and input items as the Qwen3 template reads them (Chat Completions' roles and fields).

    `first` is the index of the request's own first item (the ones before came from the store), for errors.
    """
    out: list[dict] = []
    system = [instructions] if instructions else []
    turn: dict[str, Any] | None = None  # the assistant turn being gathered

    def flush() -> None:
        nonlocal turn
        if turn is not None:
            out.append(turn)
            turn = None

    def assistant() -> dict[str, Any]:
        nonlocal turn
        if turn is None:
            turn = {"role": "assistant", "content": ""}
        return turn

    for i, item in enumerate(items):
        where = f"input[{i - first}]"
        kind = item.type or ("message" if item.role else None)
        if kind == "message":
            if item.role not in ROLES:
                message = f"{where}: role {item.role!r} is not one of {', '.join(ROLES)}"
                raise APIError(400, message, param=f"{where}.role")
            text = _text(item.content, where)
            if item.role == "assistant":
                if turn is not None and turn.get("tool_calls"):
                    flush()
                assistant()["content"] += text
                continue
            flush()
            role = "system" if item.role in ("system", "developer") else "user"
            if role == "system" and not out:  # still the head of the prompt: one system prompt
                system.append(text)
            else:
                out.append({"role": role, "content": text})
        elif kind == "reasoning":
            if turn is not None and (turn["content"] or turn.get("tool_calls")):
                flush()
            text = _reasoning_text(item)
            if text:
                current = assistant()
                current["reasoning_content"] = current.get("reasoning_content", "") + text
        elif kind == "function_call":
            if not item.name:
                raise APIError(400, f"{where}: a function_call item needs a name", param=f"{where}.name")
            arguments = item.arguments if item.arguments is not None else "{}"
            if isinstance(arguments, str):
                try:  # as a dict the template prints it as it prints every call
                    parsed = json.loads(arguments) if arguments.strip() else {}
                    arguments = parsed if isinstance(parsed, dict) else arguments
                except json.JSONDecodeError:
                    pass
            function = {"name": tools.name_in_prompt(item.name, item.namespace), "arguments": arguments}
            call = {"id": item.call_id, "type": "function", "function": function}
            assistant().setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            flush()
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output, where)})
        elif kind is None:
            raise APIError(400, f"{where}: an input item needs a type (or a role, for a message)", param=where)
        else:
            log.info("leaving out a %s input item: it has no place in this model's prompt", kind)
    flush()
    if system:
        out.insert(0, {"role": "system", "content": "\n\n".join(system)})
    return out


def _thinking(body: ResponsesRequest) -> tuple[bool, int | None]:
    """(enable_thinking, budget) from `reasoning.effort`."""
    effort = body.reasoning.effort if body.reasoning else None
    if effort == "none":
        return False, None
    return True, EFFORT_BUDGETS[effort] if effort else None


def _response_format(body: ResponsesRequest) -> dict | None:
    fmt = body.text.format if body.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        message = "text.format: a json_schema format needs its schema: give the JSON schema of the reply"
        raise APIError(400, message, param="text.format.schema")
    spec = {"name": fmt.name or "response", "schema": fmt.schema_}
    if fmt.strict is not None:
        spec["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": spec}


def conversation_items(store: ResponseStore, body: ResponsesRequest) -> tuple[list[InputItem], int]:
    """The conversation so far (the stored one `previous_response_id` names, then the new input), and
    the index of the first new item."""
    if body.conversation is not None:
        message = "conversation objects are not kept by this server: continue with previous_response_id"
        raise APIError(400, message, param="conversation")
    items: list[InputItem] = []
    if body.previous_response_id:
        stored = store.get(body.previous_response_id)
        if stored is None:
            message = f"Previous response with id '{body.previous_response_id}' not found."
            raise APIError(404, message, param="previous_response_id", code="previous_response_not_found")
        items = stored.conversation()
    first = len(items)
    if isinstance(body.input, str):
        items.append(InputItem(type="message", role="user", content=body.input))
    else:
        items.extend(body.input or [])
    if len(items) == first:
        raise APIError(400, "input is missing or empty: send at least one input item", param="input")
    return items, first


def plan_response(turns: Turns, body: ResponsesRequest, items: list[InputItem], first: int, tools: Tools) -> TurnPlan:
    """A Responses request as the one turn pipeline's plan (CPU work: run it off the event loop)."""
    choice = tools.choice(body.tool_choice)
    enable_thinking, budget = _thinking(body)
    functions = tools.functions or None
    options = TurnOptions(
        tools=functions,
        tool_choice=choice if functions or choice not in (None, "none") else None,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        response_format=_response_format(body),
        enable_thinking=enable_thinking,
        thinking_budget=budget,
        max_tokens=body.max_output_tokens,
        sampling=Sampling(temperature=body.temperature, top_p=body.top_p),
    )
    return turns.plan(template_messages(body.instructions, items, tools, first), options)


def usage(stats) -> dict:
    return {
        "input_tokens": stats.prompt_tokens,
        "input_tokens_details": {"cached_tokens": stats.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": stats.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": stats.reasoning_tokens},
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
    }


class OutputItems:
    """Builds the response's output items from the turn's events. Each step returns the stream events
    that say what changed, as (type, payload) pairs without sequence numbers; a whole response drops them."""

    def __init__(self, tools: Tools):
        self.tools = tools
        self.items: list[dict] = []
        self.open: dict | None = None  # the reasoning or message item still growing

    def _where(self) -> dict:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1}

    def _added(self, item: dict) -> list[tuple[str, dict]]:
        self.items.append(item)
        return [("response.output_item.added", {"output_index": len(self.items) - 1, "item": copy.deepcopy(item)})]

    def _start(self, kind: str) -> list[tuple[str, dict]]:
        events = self.close("completed")
        if kind == "reasoning":
            item = {"id": _new_id("rs"), "type": "reasoning", "status": "in_progress", "summary": [], "content": []}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": _new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                    "content": []}  # fmt: skip
            part = {"type": "output_text", "text": "", "annotations": []}
        events += self._added(item)
        item["content"].append(part)
        self.open = item
        events.append(("response.content_part.added", {**self._where(), "content_index": 0, "part": dict(part)}))
        return events

    def feed(self, event) -> list[tuple[str, dict]]:
        if isinstance(event, ToolCall):
            events = self.close("completed")
            item = self.tools.call_item(event)
            events += self._added({**item, "status": "in_progress", "arguments": ""})
            self.items[-1] = item
            where = self._where()
            events.append(("response.function_call_arguments.delta", {**where, "delta": item["arguments"]}))
            events.append(("response.function_call_arguments.done", {**where, "arguments": item["arguments"]}))
            events.append(("response.output_item.done", {"output_index": where["output_index"], "item": dict(item)}))
            return events
        if isinstance(event, Reasoning):
            kind, text = "reasoning", event.text
        elif isinstance(event, Answer | ToolCallError):  # a broken call stays text, never dropped
            kind, text = "message", event.text if isinstance(event, Answer) else event.raw
        else:
            return []
        if not text:
            return []
        events = [] if self.open is not None and self.open["type"] == kind else self._start(kind)
        self.open["content"][0]["text"] += text
        delta = {**self._where(), "content_index": 0, "delta": text}
        if kind == "reasoning":
            events.append(("response.reasoning_text.delta", delta))
        else:
            events.append(("response.output_text.delta", {**delta, "logprobs": []}))
        return events

    def close(self, status: str) -> list[tuple[str, dict]]:
        """Ends the growing item (`completed`, or `incomplete` when the reply was cut off)."""
        item, self.open = self.open, None
        if item is None:
            return []
        item["status"] = status
        part = item["content"][0]
        where = {**self._where(), "content_index": 0}
        if item["type"] == "reasoning":
            events = [("response.reasoning_text.done", {**where, "text": part["text"]})]
        else:
            events = [("response.output_text.done", {**where, "text": part["text"], "logprobs": []})]
        events.append(("response.content_part.done", {**where, "part": copy.deepcopy(part)}))
        done = {"output_index": where["output_index"], "item": copy.deepcopy(item)}
        events.append(("response.output_item.done", done))
        return events

    def finish(self, stats) -> tuple[str, list[tuple[str, dict]]]:
        """(the response's status, the closing events) once the turn has ended."""
        status = "incomplete" if stats.finish_reason == "length" else "completed"
        events = self.close(status)
        if status == "incomplete" and self.items and self.items[-1]["type"] == "function_call":
            self.items[-1]["status"] = "incomplete"
        return status, events


class Exchange:
    """One request's response: its id, the settings it echoes, and storing it once it is done."""

    def __init__(self, body: ResponsesRequest, model: str, items: list[InputItem], store: ResponseStore):
        self.body, self.model, self.items, self.store = body, model, items, store
        self.id = _new_id("resp")
        self.created = int(time.time())

    def response(self, status: str, output: list[dict], stats=None, error: dict | None = None) -> dict:
        body = self.body
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else None
        choice = body.tool_choice
        choice = choice.model_dump(exclude_none=True) if isinstance(choice, ToolChoiceSpec) else choice or "auto"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "background": False,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "max_tool_calls": None,
            "metadata": body.metadata or {},
            "model": self.model,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "prompt_cache_key": body.prompt_cache_key,
            "reasoning": {
                "effort": body.reasoning.effort if body.reasoning else None,
                "summary": (body.reasoning.summary or body.reasoning.generate_summary) if body.reasoning else None,
            },
            "safety_identifier": None,
            "service_tier": "default",
            "store": body.store is not False,
            "temperature": body.temperature,
            "text": {"format": fmt or {"type": "text"}, "verbosity": (body.text and body.text.verbosity) or "medium"},
            "tool_choice": choice,
            "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
            "top_logprobs": 0,
            "top_p": body.top_p,
            "truncation": body.truncation or "disabled",
            "usage": usage(stats) if stats is not None else None,
            "user": body.user,
        }

    def finish(self, status: str, output: list[dict], stats) -> dict:
        response = self.response(status, output, stats)
        if self.body.store is not False:
            self.store.put(Stored(response, self.items))
        return response


def add_routes(app, models, settings) -> None:
    """`/v1/responses` and `/v1/responses/{id}` on the server's app, with this app's response store
    (`models`: the server's `Registry`, which hands out each request's model)."""
    store = ResponseStore()

    @app.post("/v1/responses", responses=BUSY)
    async def create_response(body: ResponsesRequest, request: Request):
        served = await models.get(body.model)
        scheduler = served.scheduler
        items, first = conversation_items(store, body)
        tools = Tools(body.tools)
        turn = await asyncio.to_thread(plan_response, scheduler.turns, body, items, first, tools)
        ticket = scheduler.submit(turn)
        exchange = Exchange(body, served.name, items, store)
        if body.stream:
            stream = _response_stream(scheduler, ticket, exchange, tools, settings.keepalive_s)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        events, _, stats = await gather(scheduler, ticket, request)
        output = OutputItems(tools)
        for event in events:
            output.feed(event)
        status, _ = output.finish(stats)
        return exchange.finish(status, output.items, stats)

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str):
        stored = store.get(response_id)
        if stored is None:
            raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id")
        return stored.response

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        if store.pop(response_id) is None:
            raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id")
        return {"id": response_id, "object": "response.deleted", "deleted": True}


async def _response_stream(
    scheduler: Scheduler, ticket: Ticket, exchange: Exchange, tools: Tools, keepalive_s: float
) -> AsyncIterator[str]:
    sequence = 0

    def event(kind: str, **payload) -> str:
        nonlocal sequence
        frame = sse({"type": kind, "sequence_number": sequence, **payload}, event=kind)
        sequence += 1
        return frame

    output = OutputItems(tools)
    try:
        head = exchange.response("in_progress", [])
        yield event("response.created", response=head)
        yield event("response.in_progress", response=head)
        async for update in updates(ticket, keepalive_s):
            if update is None:  # a long prefill: keep the client's read timeout from firing
                yield KEEPALIVE
                continue
            if isinstance(update, Failed):
                yield event("error", code="server_error", message=update.error, param=None)
                error = {"code": "server_error", "message": update.error}
                yield event("response.failed", response=exchange.response("failed", output.items, error=error))
                return
            if isinstance(update, Finished):
                status, closing = output.finish(update.stats)
                for kind, payload in closing:
                    yield event(kind, **payload)
                yield event(f"response.{status}", response=exchange.finish(status, output.items, update.stats))
                return
            for item in update.events:
                for kind, payload in output.feed(item):
                    yield event(kind, **payload)
    finally:
        scheduler.done(ticket)
