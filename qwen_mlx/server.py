"""`qwen-mlx serve`: a local endpoint for LM-Studio-style clients and coding agents, right about Qwen3.

This module owns the app (`create_app`), the OpenAI Chat Completions and Completions routes, `GET /v1/models`,
`GET /health`, the API key and body cap (`Guard`), and binding. The other protocols' routes are added by
their modules over the same models: `responses_api` (OpenAI Responses), `anthropic_api` (Anthropic
Messages), `ollama_api` (Ollama); what they share is `wire`. Every route asks the `registry.Registry` for
the model its request names (loaded just in time, one model or several) and talks to that model's
`Scheduler`. The handlers only validate, plan and format: every token comes from a `Scheduler`'s MLX
thread, which batches concurrent requests of every protocol.

Design decisions:
- Thinking: reasoning goes out in `reasoning_content` (or `reasoning`, or inline `<think>` text, per
  `--reasoning-field`); incoming assistant turns may carry `reasoning_content`, `reasoning` or
  `thinking`, and it reaches the template (multi-step tool use in thinking mode needs it). Switched by
  `chat_template_kwargs.enable_thinking`, then top-level `enable_thinking`, then `reasoning_effort`
  (`none` is off; the others are `turn.EFFORT_BUDGETS`, shared by every protocol).
- Errors are each protocol's shape (OpenAI's `{"error": {"message", "type", "param", "code"}}` here), with
  the status a client expects (400 bad JSON or values and context overflow, 401, 404, 413, 429); nothing a
  request sends reaches a traceback. `/openapi.json` documents these statuses, each in its protocol's
  error shape (`document_errors`), in place of FastAPI's 422.
- A prompt is planned off the event loop (the tokenizer lets go of the GIL), so `/health` and the streams
  carry on while a long one is tokenized; after a request with a big body the freed heap goes back to the
  system (`ReturnsMemory`).
- Model names: the served id, its folder and `--model` argument, and `--alias` glob patterns (agents ask
  for `claude-*` and `gpt-*`); anything else is a 404 that says how to alias it, or, with several models,
  where they are listed. `/v1/models` and LM Studio's `/api/v0/models` list every servable model, loaded
  (`state: loaded`) or not; a model's `context_length` comes from its config, before it ever loads.
- Safe by default: loopback only unless `--api-key` is set; the key is checked on every route but
  `/health` and `/` (Bearer or `x-api-key`); request bodies are capped; CORS is off unless origins are given.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import json
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import anthropic_api, ollama_api, responses_api
from .checkpoint import read_config
from .errors import ContextLengthExceeded, Overloaded, QwenMLXError
from .parser import Answer, Reasoning, ToolCall, ToolCallError
from .protocol import BUSY, ChatCompletionRequest, CompletionRequest, ErrorBody, NamedToolChoice
from .registry import Holds, Registry, ServedModel, shape_facts
from .sampling import Sampling
from .scheduler import Failed, Finished, Scheduler, Ticket
from .turn import EFFORT_BUDGETS, TurnOptions, TurnPlan, Turns
from .wire import (
    KEEPALIVE,
    KEEPALIVE_S,
    APIError,
    error_body,
    error_response,
    gather,
    logprobs_json,
    protocol_of,
    sse,
    updates,
)

# Answered without the API key: they say only that a server is up (clients probe `/` before they log in).
OPEN_PATHS = ("/health", "/")
REASONING_FIELDS = ("reasoning_content", "reasoning", "think")
DEFAULT_MAX_BODY = 16 << 20
BIG_BODY = 1 << 20  # a request body over this many bytes is followed by `release_memory`


class Guard:
    """ASGI middleware: the API key and the body cap, before any route runs (plain ASGI, so streaming
    responses and disconnect detection pass through untouched). Its body read is bounded in time by the
    connection below it: `transport.Connection` closes a request not read whole within `--read-timeout`,
    and the read here then ends with `http.disconnect`."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = headers.get("x-api-key") or ""
            auth = headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                given = auth[7:].strip()
            if not secrets.compare_digest(given.encode(), self.api_key.encode()):
                message = "Incorrect API key provided" if given else "Missing API key: send Authorization: Bearer KEY"
                path = scope["path"]
                refused = error_response(401, message, "authentication_error", code="invalid_api_key", path=path)
                return await refused(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await self._too_large(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_body:
                    return await self._too_large(scope, receive, send)
                if not message.get("more_body"):
                    break
            body, replayed = b"".join(chunks), False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)

    async def _too_large(self, scope, receive, send):
        message = f"the request body is larger than {self.max_body} bytes"
        await error_response(413, message, code="request_too_large", path=scope["path"])(scope, receive, send)


@dataclass
class Settings:
    model_id: str
    aliases: Sequence[str] = ()  # other names of the served model: its folder, its --model argument
    reasoning_field: str = "reasoning_content"
    patterns: Sequence[str] = ()  # --alias: glob patterns of names agents ask for (`claude-*`, `gpt-5*`)
    keepalive_s: float = KEEPALIVE_S  # a stream's keep-alive after this long without a token

    def serves(self, name: str) -> bool:
        """Whether a request naming `name` gets the served model."""
        return name == self.model_id or name in self.aliases or any(fnmatchcase(name, p) for p in self.patterns)


def _effort(body: ChatCompletionRequest) -> tuple[bool, int | None]:
    """(enable_thinking, thinking budget) from the request's switches, most specific first."""
    enable = None
    if body.chat_template_kwargs is not None and body.chat_template_kwargs.enable_thinking is not None:
        enable = body.chat_template_kwargs.enable_thinking
    elif body.enable_thinking is not None:
        enable = body.enable_thinking
    elif body.reasoning_effort is not None:
        enable = body.reasoning_effort != "none"
    budget = body.thinking_budget
    if budget is None and body.reasoning_effort not in (None, "none"):
        budget = EFFORT_BUDGETS[body.reasoning_effort]
    return (True if enable is None else enable), budget


def _template_message(message) -> dict:
    """An OpenAI message as the Qwen3 template reads it: reasoning in `reasoning_content`, `developer` as
    `system`, tool-call arguments as given (the template prints strings as they are)."""
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
    out["content"] = message.content
    reasoning = message.reasoning_content or message.reasoning or message.thinking
    if reasoning:
        out["reasoning_content"] = reasoning
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.name:
        out["name"] = message.name
    return out


def _sampling(body) -> Sampling:
    bias = None
    if body.logit_bias:
        try:
            bias = {int(token): float(value) for token, value in body.logit_bias.items()}
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids (whole numbers)", param="logit_bias") from None
    return Sampling(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=0 if body.top_k == -1 else body.top_k,
        min_p=body.min_p,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        logit_bias=bias,
        seed=body.seed,
    )


def plan_chat(turns: Turns, body: ChatCompletionRequest) -> TurnPlan:
    """A chat completion request as the one turn pipeline's options (runs off the event loop: templates
    and tokenizers are CPU work)."""
    enable_thinking, budget = _effort(body)
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        choice = choice.function.name
    extra = body.chat_template_kwargs.model_dump(exclude={"enable_thinking"}) if body.chat_template_kwargs else {}
    options = TurnOptions(
        tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
        tool_choice=choice,
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=body.response_format.model_dump(by_alias=True) if body.response_format else None,
        enable_thinking=enable_thinking,
        thinking_budget=budget,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        sampling=_sampling(body),
        stop=[body.stop] if isinstance(body.stop, str) else body.stop or (),
        template_kwargs=extra,
        top_logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        speculative=_speculative(body),
    )
    return turns.plan([_template_message(m) for m in body.messages], options)


def _speculative(body) -> tuple[str, int | None] | None:
    """The request's `speculative` extension as the turn's (drafter, k)."""
    return (body.speculative.draft, body.speculative.k) if body.speculative else None


def plan_completion(turns: Turns, body: CompletionRequest, prompt) -> TurnPlan:
    options = TurnOptions(
        max_tokens=body.max_tokens,
        sampling=_sampling(body),
        stop=[body.stop] if isinstance(body.stop, str) else body.stop or (),
        top_logprobs=body.logprobs,
        speculative=_speculative(body),
    )
    return turns.plan_text(prompt, options)


def usage(stats) -> dict:
    counts = {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": stats.reasoning_tokens},
    }
    if stats.draft_tokens:  # qwen-mlx's extension: what speculative decoding saved
        counts["speculative"] = {
            "draft_tokens": stats.draft_tokens,
            "accepted_tokens": stats.accepted_tokens,
            "target_passes": stats.target_passes,
        }
    return counts


def tool_call_json(call: ToolCall, index: int | None = None) -> dict:
    # Unescaped, as the model wrote it: a client sends it back, and the template prints it as it comes.
    arguments = json.dumps(call.arguments, ensure_ascii=False)
    out = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}
    return out if index is None else {"index": index, **out}


class ReasoningOut:
    """Puts reasoning where the client wants it: its own field, or inline `<think>` text in the content."""

    def __init__(self, field: str):
        self.field = field
        self.open = False

    def reasoning(self, text: str) -> dict:
        if self.field != "think":
            return {self.field: text}
        prefix = "" if self.open else "<think>\n"
        self.open = True
        return {"content": prefix + text}

    def close(self) -> dict:
        if self.field == "think" and self.open:
            self.open = False
            return {"content": "\n</think>\n\n"}
        return {}


def release_memory() -> None:
    """Hand the heap a big request left free back to the system: glibc keeps freed memory for reuse (a 15 MiB
    prompt's copies stayed as 100 MiB of resident memory); `malloc_trim` returns it. Elsewhere, nothing to do."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc only: macOS's and musl's libc have none
    except (AttributeError, OSError, TypeError):
        return
    trim(0)


class ReturnsMemory:
    """ASGI middleware: after a request whose body was over `BIG_BODY` bytes, `release_memory` (off the
    event loop: trimming a large heap takes milliseconds)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = 0

        async def counted():
            nonlocal size
            message = await receive()
            size += len(message.get("body", b""))
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            if size > BIG_BODY:
                await asyncio.to_thread(release_memory)


def single_model(scheduler: Scheduler, settings: Settings, make_scheduler=None, **options) -> Registry:
    """The registry of a server of one model, `scheduler`'s (started), named as `settings` says;
    `make_scheduler(model)` loads it again after `ttl` unloaded it (`Registry`'s options)."""
    path = scheduler.loaded.path if scheduler.loaded is not None else None
    memory, _ = shape_facts(path)
    model = ServedModel(settings.model_id, str(path), path, names=tuple(settings.aliases),
                        patterns=tuple(settings.patterns), memory=memory, context_length=scheduler.context_length,
                        scheduler=scheduler, loaded_at=time.monotonic())  # fmt: skip
    return Registry([model], make_scheduler, **options)


def create_app(models: Registry | Scheduler, settings: Settings, *, api_key: str | None = None,
               cors_origins: Sequence[str] = (), max_body: int = DEFAULT_MAX_BODY) -> FastAPI:  # fmt: skip
    """The app over `models` (a `Registry`, or one started `Scheduler`, which serves `settings.model_id`)."""
    registry = models if isinstance(models, Registry) else single_model(models, settings)
    app = FastAPI(
        title="qwen-mlx",
        version=_version(),
        description="A local OpenAI-compatible endpoint for Qwen3 on MLX.",
        lifespan=registry.lifespan,
    )
    app.add_middleware(Holds, registry=registry)  # innermost: it sees the request's whole answer go out
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)
    app.add_middleware(ReturnsMemory)  # outermost: it sees the body as it arrives, and runs once all is done

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code, path=request.url.path)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, e: Overloaded):
        return error_response(429, str(e), "rate_limit_error", code="server_busy", path=request.url.path)

    @app.exception_handler(QwenMLXError)
    async def _bad_request(request: Request, e: QwenMLXError):
        code = "context_length_exceeded" if isinstance(e, ContextLengthExceeded) else None
        return error_response(400, str(e), param=e.param, code=code, path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        if any(error.get("type") == "json_invalid" for error in errors):
            return error_response(400, "the request body is not valid JSON", code="invalid_json", path=request.url.path)
        # The deepest error: of a union's members, the one that matched furthest says what is wrong.
        first = max(errors, key=lambda error: len(error.get("loc", ())), default={})
        where = [str(p) for p in first.get("loc", ()) if p != "body" and not _union_member(p)]
        param = ".".join(where) or None
        message = first.get("msg", "invalid request")
        return error_response(400, f"{param}: {message}" if param else message, param=param, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            where = request.url.path
            return error_response(404, f"no route {request.method} {where}", code="unknown_url", path=where)
        if e.status_code == 400:  # FastAPI's own body parsing gave up: bad UTF-8, nesting too deep
            return error_response(400, "the request body is not valid JSON", code="invalid_json", path=request.url.path)
        response = error_response(e.status_code, str(e.detail), path=request.url.path)
        response.headers.update(e.headers or {})  # a 405 says which methods are allowed (Allow)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error", path=request.url.path)

    def check_speculative(body, scheduler: Scheduler) -> None:
        if body.speculative and body.speculative.draft == "model" and scheduler.draft is None:
            raise APIError(400, "this server has no draft model: start it with --draft-model M, or ask for "
                           '{"draft": "lookup"}', param="speculative.draft")  # fmt: skip

    @app.get("/health")
    async def health() -> dict:
        named = registry.models[0].name if registry.single else None
        loaded = [m.name for m in registry.loaded()]
        return {"status": "ok", "model": named, "in_flight": registry.in_flight, "loaded": loaded}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(m) for m in registry.models]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        return _model_card(registry.named(model))

    @app.get("/api/v0/models")
    async def lmstudio_models() -> dict:
        """LM Studio's native model list, which LM Studio clients read for the state and context."""
        return {"object": "list", "data": [await asyncio.to_thread(_lmstudio_card, m) for m in registry.models]}

    @app.get("/api/v0/models/{model:path}")
    async def lmstudio_model(model: str) -> dict:
        return await asyncio.to_thread(_lmstudio_card, registry.named(model))

    @app.post("/v1/chat/completions", responses=BUSY)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        served = await registry.get(body.model)
        scheduler = served.scheduler
        check_speculative(body, scheduler)
        turn = await asyncio.to_thread(plan_chat, scheduler.turns, body)
        ticket = scheduler.submit(turn)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _chat_stream(scheduler, ticket, meta, settings, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _chat_whole(scheduler, ticket, request, meta, settings.reasoning_field)

    @app.post("/v1/completions", responses=BUSY)
    async def completions(body: CompletionRequest, request: Request):
        served = await registry.get(body.model)
        scheduler = served.scheduler
        check_speculative(body, scheduler)
        prompts = [body.prompt] if isinstance(body.prompt, str) or _is_ids(body.prompt) else list(body.prompt)
        if not prompts or len(prompts) > 16:
            raise APIError(400, "prompt must be a string, a list of token ids, or 1 to 16 strings", param="prompt")
        turns = [await asyncio.to_thread(plan_completion, scheduler.turns, body, p) for p in prompts]
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}
        if body.stream:
            if len(turns) > 1:
                raise APIError(400, "stream one prompt at a time", param="prompt")
            ticket = scheduler.submit(turns[0])
            echo = _echo(scheduler, turns[0], body.echo)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _completion_stream(scheduler, ticket, meta, echo, include_usage, settings.keepalive_s)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        tickets = []
        try:
            for turn in turns:
                tickets.append(scheduler.submit(turn))
        except Overloaded:
            for ticket in tickets:
                scheduler.done(ticket)
            raise
        results = await asyncio.gather(*(gather(scheduler, t, request) for t in tickets))
        choices, total = [], None
        for index, ((events, entries, stats), turn) in enumerate(zip(results, turns, strict=True)):
            text = _echo(scheduler, turn, body.echo) + "".join(e.text for e in events if isinstance(e, Answer))
            choices.append(
                {
                    "index": index,
                    "text": text,
                    "finish_reason": stats.finish_reason,
                    "logprobs": _legacy_logprobs(entries) if body.logprobs is not None else None,
                }
            )
            total = usage(stats) if total is None else _add_usage(total, usage(stats))
        return {**meta, "object": "text_completion", "choices": choices, "usage": total}

    # The other protocols, over the same models and the same turn pipeline.
    anthropic_api.add_routes(app, registry, settings)
    ollama_api.add_routes(app, registry, settings)
    responses_api.add_routes(app, registry, settings)

    def openapi() -> dict:
        if app.openapi_schema is None:
            routes = app.routes
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=routes)
            app.openapi_schema = document_errors(schema)
        return app.openapi_schema

    app.openapi = openapi
    return app


ERROR_STATUSES = {
    400: "Bad JSON, a field of the wrong type or out of range, or a prompt longer than the context",
    401: "A missing or wrong API key (a server started with --api-key)",
    404: "No such model, stored response or route",
    413: "The request body is over the server's cap (--max-body-mb)",
    429: BUSY[429]["description"],
    500: "An internal error, or the model asked for failed to load",
    503: "No room to load the model asked for: the memory budget is full of models answering requests",
}


def document_errors(schema: dict) -> dict:
    """`/openapi.json` with the statuses really sent, each in its protocol's error shape, in place of FastAPI's
    422 (validation errors are 400s here): 400 and 413 where a body is read, 401 behind the key, 404 where a
    model or id is named, 429 where a route says it queues a turn (`BUSY`), 503 where a body names a model
    (loading it may find no room), 500 anywhere."""
    shapes = {
        "openai": ("OpenAI", ErrorBody),
        "anthropic": ("Anthropic", anthropic_api.ErrorBody),
        "ollama": ("Ollama", ollama_api.ErrorBody),
    }
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    refs = {}
    for protocol, (prefix, model) in shapes.items():
        shape = model.model_json_schema(ref_template=f"#/components/schemas/{prefix}{{model}}")
        for inner, definition in shape.pop("$defs", {}).items():
            components[prefix + inner] = definition
        components[f"{prefix}Error"] = shape | {"title": f"{prefix}Error"}
        refs[protocol] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{prefix}Error"}}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            statuses = {500} | {int(s) for s in responses if s.isdigit() and int(s) >= 400}
            if path not in OPEN_PATHS:
                statuses.add(401)
            if method == "post":
                statuses |= {400, 404, 413, 503}
            if "{" in path:
                statuses.add(404)
            for status in sorted(statuses):
                entry = responses.setdefault(str(status), {})
                entry.setdefault("description", ERROR_STATUSES[status])
                entry["content"] = refs[protocol_of(path)]
            operation["responses"] = dict(sorted(responses.items()))
    return schema


# pydantic names the member of a union that failed among the fields (`tool_choice.literal['none',...]`,
# `messages.0.content.str`, `tool_choice.NamedToolChoice`): the client's field path leaves them out.
UNION_MEMBER_NAMES = {"str", "int", "float", "bool", "none", "list", "dict"}


def _union_member(part) -> bool:
    return isinstance(part, str) and ("[" in part or part[:1].isupper() or part in UNION_MEMBER_NAMES)


def _version() -> str:
    from . import __version__

    return __version__


def _model_card(model: ServedModel) -> dict:
    # `context_length` is not in OpenAI's card; clients (our chat app among them) read it as vLLM's and
    # OpenRouter's cards give it, to show how full the context is.
    card = {"id": model.name, "object": "model", "created": 0, "owned_by": "qwen-mlx"}
    return card | ({"context_length": model.context_length} if model.context_length else {})


def _lmstudio_card(model: ServedModel) -> dict:
    scheduler = model.scheduler
    if scheduler is not None:
        config = scheduler.loaded.config
    else:
        try:
            config = read_config(model.folder) if model.folder is not None else {}
        except QwenMLXError:
            config = {}
    block = config.get("quantization") or {}
    card = {
        "id": model.name,
        "object": "model",
        "type": "llm",
        "publisher": "qwen-mlx",
        "arch": config.get("model_type", "qwen3"),
        "compatibility_type": "mlx",
        "quantization": f"{block['bits']}bit" if "bits" in block else str(config.get("torch_dtype", "bf16")),
        "state": "loaded" if scheduler is not None else "not-loaded",
        "max_context_length": model.context_length or 0,
    }
    return card | ({"loaded_context_length": scheduler.context_length} if scheduler is not None else {})


def _is_ids(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)


def _echo(scheduler: Scheduler, turn: TurnPlan, echo: bool) -> str:
    return scheduler.tokenizer.decode(turn.prompt_ids) if echo else ""


def _add_usage(a: dict, b: dict) -> dict:
    out = {k: a[k] + b[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    out["prompt_tokens_details"] = {"cached_tokens": a["prompt_tokens_details"]["cached_tokens"]
                                    + b["prompt_tokens_details"]["cached_tokens"]}  # fmt: skip
    out["completion_tokens_details"] = {"reasoning_tokens": 0}
    return out


def _legacy_logprobs(entries) -> dict:
    entries = entries or []
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t: lp for t, lp, _ in e.top} for e in entries],
        "text_offset": offsets,
    }


async def _chat_whole(scheduler: Scheduler, ticket: Ticket, request: Request, meta: dict, field: str) -> dict:
    events, entries, stats = await gather(scheduler, ticket, request)
    reasoning = "".join(e.text for e in events if isinstance(e, Reasoning))
    answer = ""
    calls = []
    for e in events:
        if isinstance(e, Answer):
            answer += e.text
        elif isinstance(e, ToolCallError):  # not a valid call: kept as text, never dropped
            answer += e.raw
        elif isinstance(e, ToolCall):
            calls.append(tool_call_json(e))
    message: dict[str, Any] = {"role": "assistant", "content": answer or (None if calls else "")}
    if field == "think":
        if reasoning:
            message["content"] = f"<think>\n{reasoning}\n</think>\n\n{answer}"
    else:
        message[field] = reasoning or None
    if calls:
        message["tool_calls"] = calls
    choice = {
        "index": 0,
        "message": message,
        "logprobs": {"content": logprobs_json(entries)} if ticket.turn.top_logprobs is not None else None,
        "finish_reason": stats.finish_reason,
    }
    return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage(stats)}


async def _chat_stream(
    scheduler: Scheduler, ticket: Ticket, meta: dict, settings: Settings, include_usage: bool
) -> AsyncIterator[str]:
    out = ReasoningOut(settings.reasoning_field)
    base = {**meta, "object": "chat.completion.chunk"}

    def chunk(delta: dict, finish: str | None = None, logprobs=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**base, "choices": [choice], **({"usage": None} if include_usage else {})})

    try:
        yield chunk({"role": "assistant", "content": ""})
        calls = 0
        async for update in updates(ticket, settings.keepalive_s):
            if update is None:  # a long prefill: an SSE comment keeps the client's read timeout from firing
                yield KEEPALIVE
                continue
            if isinstance(update, Failed):
                yield sse(error_body(update.error, "server_error"))
                break
            if isinstance(update, Finished):
                closing = out.close()
                if closing:
                    yield chunk(closing)
                yield chunk({}, update.stats.finish_reason)
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage(update.stats)})
                break
            logprobs = {"content": logprobs_json(update.logprobs)} if update.logprobs else None
            for event in update.events:
                if isinstance(event, Reasoning):
                    delta = out.reasoning(event.text)
                elif isinstance(event, Answer | ToolCallError):  # a broken call stays text, never dropped
                    text = event.text if isinstance(event, Answer) else event.raw
                    delta = {"content": out.close().get("content", "") + text}
                else:
                    closing = out.close()
                    if closing:
                        yield chunk(closing)
                    head = tool_call_json(event, calls)
                    arguments = head["function"].pop("arguments")
                    yield chunk({"tool_calls": [{**head, "function": {**head["function"], "arguments": ""}}]})
                    delta = {"tool_calls": [{"index": calls, "function": {"arguments": arguments}}]}
                    calls += 1
                yield chunk(delta, logprobs=logprobs)
                logprobs = None
            if logprobs:
                yield chunk({"content": ""}, logprobs=logprobs)
        yield "data: [DONE]\n\n"
    finally:
        scheduler.done(ticket)


async def _completion_stream(
    scheduler: Scheduler, ticket: Ticket, meta: dict, echo: str, include_usage: bool, keepalive_s: float
) -> AsyncIterator[str]:
    base = {**meta, "object": "text_completion"}

    def chunk(text: str, finish: str | None = None, logprobs=None) -> str:
        return sse({**base, "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

    try:
        if echo:
            yield chunk(echo)
        async for update in updates(ticket, keepalive_s):
            if update is None:
                yield KEEPALIVE
                continue
            if isinstance(update, Failed):
                yield sse(error_body(update.error, "server_error"))
                break
            if isinstance(update, Finished):
                yield chunk("", update.stats.finish_reason)
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage(update.stats)})
                break
            text = "".join(e.text for e in update.events if isinstance(e, Answer))
            logprobs = _legacy_logprobs(update.logprobs) if update.logprobs is not None else None
            yield chunk(text, logprobs=logprobs)
        yield "data: [DONE]\n\n"
    finally:
        scheduler.done(ticket)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or one readable line saying why not (a port in use, a bad address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise QwenMLXError(f"cannot listen on {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno in (98, 48):  # EADDRINUSE on Linux, macOS
            raise QwenMLXError(f"port {port} on {host} is already in use: pick another with --port") from None
        raise QwenMLXError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
