"""Ollama's native API on `qwen-mlx serve`, so Ollama clients (the `ollama` libraries, Open WebUI, editors
and agents that speak Ollama) run on a local Qwen3 through the same scheduler and turn pipeline as the
OpenAI routes.

Routes: `POST /api/chat` and `POST /api/generate` (NDJSON streaming by default, one object with
`stream: false`), `GET /api/tags`, `POST /api/show`, `GET /api/ps`, `GET /api/version`, and `GET`/`HEAD /`
("Ollama is running", what clients probe). A request becomes the one turn pipeline's messages and
`TurnOptions`; the turn's events become Ollama's `message` (`content`, `thinking`, `tool_calls`) or
`response`/`thinking`.

Design decisions:
- Thinking: `think` true/false switches Qwen3's thinking on or off; absent is the model's default (on).
  The levels Ollama takes for other models (`"low"`, `"medium"`, `"high"`) turn it on with the thinking
  budgets `reasoning_effort` has on Chat Completions. The reasoning goes in `thinking`, never in the
  content; a `thinking` field sent back on an assistant message reaches the template as
  `reasoning_content` (multi-step tool use in thinking mode needs it).
- Tools are OpenAI-style function definitions, as Ollama takes them; calls come back as Ollama's
  `tool_calls`, arguments as JSON objects (not strings), with an `id` a `tool` message may name in
  `tool_call_id`. A turn that ends in a tool call is `done_reason: "stop"`, as Ollama reports it. A
  `<tool_call>` block that does not parse stays in the content, never dropped.
- `format`: `"json"` is `response_format` `json_object`, a JSON schema object is `json_schema`; both are
  enforced by the turn's guide, after the thinking.
- `options`: `temperature`, `top_p`, `top_k`, `min_p`, `seed` (negative: unseeded), `stop`,
  `repeat_penalty` (the repetition penalty; 0 is off), `presence_penalty`, `frequency_penalty`, `num_predict` (the
  max tokens; negative or absent: no cap but the context) and `num_ctx`, which may lower the context for
  the request but never raise it past the model's (a prompt over it is a 400, as the OpenAI routes refuse
  an overflow: nothing is silently truncated). Options Ollama has for its own runner (`num_gpu`,
  `num_thread`, `mirostat`, ...) are accepted and ignored; so is `keep_alive` on a turn (models unload by
  the server's `--ttl` and memory budget, `registry`). `logprobs` and `top_logprobs` add Ollama's per-token `logprobs`.
- `/api/generate` with `raw: true` sends the prompt as plain text (as `/v1/completions` does); otherwise
  the prompt (and `system`) is a one-user-message chat through the checkpoint's template. An empty prompt
  (or a chat with no messages) is Ollama's "load the model" call: it loads it, `done_reason: "load"`;
  with `keep_alive: 0` it unloads it if no request is using it, `"unload"`. What a text-only Qwen3 on this
  server cannot do is a clear 400:
  `images`, `suffix` (fill-in-the-middle), `template` overrides, a `context` from another server, and
  `format` with `raw`.
- Model names as Ollama clients send them: the served id or an alias, with or without a `:tag`
  (`demo`, `demo:latest`, `demo:8b`), or an id's name without its tag (`qwen3` for `qwen3:8b`); anything
  else is Ollama's 404 `model 'x' not found`. Replies echo the name the client sent, as Ollama does;
  `/api/tags` lists every served model with a tag (`demo:latest`), loaded or not, as Ollama lists them;
  `/api/ps` the loaded ones, with qwen-mlx's `id`, `in_flight` and `idle_seconds` beside Ollama's fields.
- Numbers as Ollama reports them: durations in nanoseconds (`prompt_eval_duration` is the time to the
  first token, queueing included; `load_duration` the time spent before the model got the turn, i.e.
  template, tokenizer, and loading the model when this request loaded it), `prompt_eval_count` the prompt
  tokens evaluated (as Ollama counts them: the prefix cache's part is left out, so a conversation that
  continues reports only its new tokens), `eval_count` the generated tokens. `/api/show` describes the
  checkpoint in Ollama's terms (`general.architecture` `qwen3`, or `qwen3moe` for the mixture-of-experts models as
  Ollama names them; `format` `safetensors`; the quantization as `Q4`, `Q8`, ... for MLX's affine
  quantization, else the weights' float type) and returns the checkpoint's Jinja chat template.
- `/api/version` answers `OLLAMA_VERSION`, a recent Ollama release, so clients that check for features
  by version (thinking, tools, structured outputs) use them.
- Bodies are read as JSON whatever their Content-Type (`JsonBodies`), as Ollama reads them: its docs'
  `curl ... -d '{...}'` examples send a form type.
- Errors are Ollama's `{"error": "message"}` (the server's handlers shape every error under `/api/` so);
  an error after a stream started is its last line, `{"error": ...}`, which Ollama's clients raise.
  Streams send nothing while a long prompt is prefilled: an NDJSON line must be a whole object, and
  Ollama's clients read without a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator
from pydantic_core import PydanticCustomError

from .errors import ContextLengthExceeded, QwenMLXError
from .parser import Answer, Reasoning, ToolCall, ToolCallError
from .protocol import BUSY, Body
from .sampling import Sampling
from .scheduler import Failed, Finished, Scheduler, Ticket
from .turn import EFFORT_BUDGETS, TurnOptions, TurnPlan, Turns
from .wire import APIError, gather, logprobs_json, updates

OLLAMA_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"
DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop"}
CAPABILITIES = ["completion", "tools", "thinking"]
POST_ROUTES = ("/api/chat", "/api/generate", "/api/show")
ZERO_DURATION = re.compile(r"[+-]?0*(\.0*)?(ns|us|µs|ms|s|m|h)?")


class ErrorBody(BaseModel):
    """Ollama's error, as every status but 200 answers it here (documented in `/openapi.json`)."""

    error: str


class OllamaOptions(Body):
    """The runtime options this server honours; the rest of Ollama's options are ignored."""

    temperature: float | None = Field(default=None, ge=0, le=100)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(default=None, ge=0, le=1)
    num_predict: int | None = None
    num_ctx: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    repeat_penalty: float | None = Field(default=None, ge=0, le=10)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)


class OllamaFunctionCall(Body):
    name: str = Field(min_length=1)
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class OllamaToolCall(Body):
    id: str | None = None
    function: OllamaFunctionCall


class OllamaMessage(Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    thinking: str | None = None
    images: list[Any] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class OllamaFunction(Body):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class OllamaTool(Body):
    type: Literal["function"] = "function"
    function: OllamaFunction


class _Request(Body):
    model: str = Field(min_length=1)
    stream: bool = True
    think: bool | Literal["low", "medium", "high"] | None = None
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    keep_alive: float | str | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    # One readable line for the unions (pydantic would name each branch it tried).
    @field_validator("think", mode="before")
    @classmethod
    def _check_think(cls, value):
        if (
            value is None
            or isinstance(value, bool)
            or (isinstance(value, str) and value in ("low", "medium", "high", "true", "false"))
        ):
            return value
        raise PydanticCustomError("think", 'think must be true, false, "low", "medium" or "high"')

    @field_validator("format", mode="before")
    @classmethod
    def _check_format(cls, value):
        if value is None or value in ("", "json") or isinstance(value, dict):
            return value
        raise PydanticCustomError("format", 'format must be "json" or a JSON schema object')


class OllamaChatRequest(_Request):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[OllamaTool] | None = None


class OllamaGenerateRequest(_Request):
    prompt: str | None = None
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[Any] | None = None


class OllamaShowRequest(Body):
    model: str | None = None
    name: str | None = None  # what older clients send
    verbose: bool = False


# --- names ----------------------------------------------------------------------------------------------


def _tag(name: str) -> tuple[str, str | None]:
    """(name, tag) of an Ollama model name; a ':' inside a path is no tag."""
    base, sep, tag = name.rpartition(":")
    if sep and base and tag and "/" not in tag:
        return base, tag
    return name, None


def listed_name(model_id: str) -> str:
    """The served id as Ollama lists models: always with a tag."""
    return model_id if _tag(model_id)[1] else f"{model_id}:latest"


def resolver(models):
    """`resolve(name)`: the served model an Ollama client names `name` (the server's names and `--alias`
    patterns, with or without a `:tag`, or an id's name without its tag), else a 404."""

    def resolve(name: str | None):
        if not name:
            raise APIError(400, "model is required", param="model")
        base, tag = _tag(name)
        found = models.find(name) or (models.find(base) if tag else None)
        if found is None and not tag:
            tagged = (m for m in models.models if any(_tag(n)[1] and _tag(n)[0] == name for n in (m.name, *m.names)))
            found = next(tagged, None)
        if found is None:
            raise APIError(404, f"model '{name}' not found", param="model", code="model_not_found")
        return found

    return resolve


# --- requests -> turn plans -----------------------------------------------------------------------------


def _think(think) -> tuple[bool, int | None]:
    """(enable_thinking, thinking budget) from `think`."""
    if think is None or think is True:
        return True, None
    if think is False:
        return False, None
    return True, EFFORT_BUDGETS[think]


def _response_format(format) -> dict | None:
    if not format:
        return None
    if format == "json":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "format", "schema": format}}


def _stops(stop) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or ())


def _sampling(o: OllamaOptions) -> Sampling:
    top_k = o.top_k
    if top_k is not None and top_k < 0:
        top_k = 0  # off, as Ollama's runner reads a negative top_k
    return Sampling(
        temperature=o.temperature,
        top_p=o.top_p,
        top_k=top_k,
        min_p=o.min_p,
        presence_penalty=o.presence_penalty or 0.0,
        frequency_penalty=o.frequency_penalty or 0.0,
        repetition_penalty=o.repeat_penalty if o.repeat_penalty else 1.0,  # 0: off, as in Ollama
        seed=o.seed if o.seed is not None and o.seed >= 0 else None,
    )


def _max_tokens(o: OllamaOptions) -> int | None:
    if o.num_predict is None or o.num_predict < 0:  # -1: no limit; -2: fill the context
        return None
    if o.num_predict == 0:
        raise APIError(400, "options.num_predict must be at least 1 (or -1 for no limit)", param="options.num_predict")
    return o.num_predict


def turn_options(body: _Request, tools: list[dict] | None = None) -> TurnOptions:
    o = body.options or OllamaOptions()
    enable_thinking, budget = _think(body.think)
    return TurnOptions(
        tools=tools,
        response_format=_response_format(body.format),
        enable_thinking=enable_thinking,
        thinking_budget=budget,
        max_tokens=_max_tokens(o),
        sampling=_sampling(o),
        stop=_stops(o.stop),
        top_logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )


def _fit_num_ctx(plan: TurnPlan, body: _Request, context_length: int) -> TurnPlan:
    """`options.num_ctx` lowers the context for this request (never raises it past the model's)."""
    num_ctx = body.options.num_ctx if body.options else None
    if num_ctx is None or num_ctx >= context_length:
        return plan
    room = num_ctx - len(plan.prompt_ids)
    if room <= 0:
        raise ContextLengthExceeded(
            f"the prompt is {len(plan.prompt_ids)} tokens but options.num_ctx is {num_ctx}: shorten the "
            f"conversation or raise num_ctx (the model's context is {context_length})",
            param="options.num_ctx",
        )
    plan.max_tokens = min(plan.max_tokens, room)
    return plan


def _text_only(images, where: str) -> None:
    if images:
        raise APIError(400, f"{where}: images are not supported: this model reads text only", param=where)


def template_messages(messages: list[OllamaMessage]) -> list[dict]:
    """Ollama's messages as the Qwen3 template reads them (OpenAI's fields: `reasoning_content`, ...)."""
    out = []
    for i, message in enumerate(messages):
        _text_only(message.images, f"messages.{i}.images")
        turn: dict[str, Any] = {"role": message.role, "content": message.content or ""}
        if message.thinking:
            turn["reasoning_content"] = message.thinking
        if message.tool_calls:
            calls = []
            for call in message.tool_calls:
                function = {"name": call.function.name, "arguments": call.function.arguments}
                calls.append({"type": "function", "function": function} | ({"id": call.id} if call.id else {}))
            turn["tool_calls"] = calls
        if message.tool_name:
            turn["name"] = message.tool_name
        if message.tool_call_id:
            turn["tool_call_id"] = message.tool_call_id
        out.append(turn)
    return out


def plan_chat(turns: Turns, body: OllamaChatRequest) -> TurnPlan:
    """A `/api/chat` request as the one turn pipeline's plan (CPU work: run it off the event loop)."""
    messages = template_messages(body.messages)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    plan = turns.plan(messages, turn_options(body, tools))
    return _fit_num_ctx(plan, body, turns.context_length)


def plan_generate(turns: Turns, body: OllamaGenerateRequest) -> TurnPlan:
    """A `/api/generate` request: raw text, or one user message through the template."""
    options = turn_options(body)
    if body.raw:
        if body.format:
            raise APIError(400, "format needs the chat template: leave raw off to use it", param="format")
        plan = turns.plan_text(body.prompt or "", options)
    else:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        plan = turns.plan([*messages, {"role": "user", "content": body.prompt or ""}], options)
    return _fit_num_ctx(plan, body, turns.context_length)


def _check_generate(body: OllamaGenerateRequest) -> None:
    _text_only(body.images, "images")
    if body.suffix:
        raise APIError(400, "suffix is not supported: this model does not fill in the middle", param="suffix")
    if body.template:
        raise APIError(400, "template overrides are not supported: the checkpoint's chat template is used",
                       param="template")  # fmt: skip
    if body.context:
        raise APIError(400, "context is not supported: send the conversation to /api/chat", param="context")


# --- events -> Ollama's JSON ----------------------------------------------------------------------------


def created_at() -> str:
    """Now as RFC 3339 UTC, as Ollama writes it."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ns(seconds: float) -> int:
    return max(1, int(seconds * 1e9))


class Clock:
    """When a request came, when its turn was submitted and when it finished: Ollama's durations."""

    def __init__(self):
        self.received = time.perf_counter()
        self.submitted = self.received

    def metrics(self, stats) -> dict:
        now = time.perf_counter()
        first = min(stats.ttft_s, now - self.submitted)
        return {
            "total_duration": _ns(now - self.received),
            "load_duration": _ns(self.submitted - self.received),
            "prompt_eval_count": stats.prompt_tokens - stats.cached_tokens,  # what was evaluated, as Ollama counts
            "prompt_eval_duration": _ns(first),
            "eval_count": stats.completion_tokens,
            "eval_duration": _ns(now - self.submitted - first),
        }


def _done_reason(stats) -> str:
    return DONE_REASONS.get(stats.finish_reason, "stop")


def tool_call_json(call: ToolCall) -> dict:
    return {"id": call.id, "function": {"name": call.name, "arguments": call.arguments}}


def _parts(events) -> tuple[str, str, list[dict]]:
    """(thinking, content, tool calls) of a turn's events; a broken call stays content, never dropped."""
    thinking, content, calls = "", "", []
    for event in events:
        if isinstance(event, Reasoning):
            thinking += event.text
        elif isinstance(event, Answer):
            content += event.text
        elif isinstance(event, ToolCallError):
            content += event.raw
        elif isinstance(event, ToolCall):
            calls.append(tool_call_json(event))
    return thinking, content, calls


def _chat_message(thinking: str, content: str, calls: list[dict]) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if thinking:
        message["thinking"] = thinking
    if calls:
        message["tool_calls"] = calls
    return message


def _generate_fields(thinking: str, content: str) -> dict:
    return {"response": content, **({"thinking": thinking} if thinking else {})}


def _line(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n"


async def _stream(
    scheduler: Scheduler, ticket: Ticket, model: str, clock: Clock, chat: bool, want_logprobs: bool
) -> AsyncIterator[str]:
    """The turn as NDJSON: one object per event, then the `done` one with the numbers."""

    def line(thinking: str = "", content: str = "", calls=(), logprobs=None, **done) -> str:
        body = _chat_message(thinking, content, list(calls)) if chat else None
        fields = {"message": body} if chat else _generate_fields(thinking, content)
        extra = {"logprobs": logprobs_json(logprobs)} if want_logprobs and logprobs else {}
        return _line({"model": model, "created_at": created_at(), **fields, **extra, "done": False} | done)

    try:
        async for update in updates(ticket):
            if update is None:  # a long prefill: an NDJSON line must be a whole object, so nothing
                continue
            if isinstance(update, Failed):
                yield _line({"error": update.error})
                return
            if isinstance(update, Finished):
                stats = update.stats
                yield line(done=True, done_reason=_done_reason(stats), **clock.metrics(stats))
                return
            logprobs = update.logprobs
            for event in update.events:
                thinking, content, calls = _parts([event])
                yield line(thinking, content, calls, logprobs)
                logprobs = None
            if logprobs:
                yield line(logprobs=logprobs)
    finally:
        scheduler.done(ticket)


def _keep_alive_zero(keep_alive) -> bool:
    if isinstance(keep_alive, int | float):
        return keep_alive == 0
    text = keep_alive.strip() if isinstance(keep_alive, str) else ""
    return bool(text) and ZERO_DURATION.fullmatch(text) is not None


# --- the model, described as Ollama describes models ----------------------------------------------------


def _weights(model) -> tuple[int, int, str]:
    """(parameter count, bytes in memory, the float type of the unquantized weights); a quantized
    weight counts the values it packs."""
    from mlx.utils import tree_flatten

    bits = {path: m.bits for path, m in model.named_modules() if "scales" in m and hasattr(m, "bits")}
    count = size = 0
    dtype = ""
    for name, array in tree_flatten(model.parameters()):
        size += array.nbytes
        path, _, leaf = name.rpartition(".")
        if path in bits:
            if leaf == "weight":
                count += array.size * 32 // bits[path]
            continue  # scales and biases
        count += array.size
        dtype = dtype or str(array.dtype).rpartition(".")[2]
    return count, size, dtype


def _human(count: int) -> str:
    """A parameter count as Ollama writes it: 8.2B, 596.05M."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            value = count / scale
            return f"{value:.1f}{unit}" if unit in ("T", "B") else f"{value:.2f}{unit}"
    return str(count)


def _quantization(config: dict, dtype: str) -> str:
    """MLX's affine quantization as `Q<bits>`, else the weights' float type as Ollama writes it."""
    block = config.get("quantization") or config.get("quantization_config")
    if isinstance(block, dict) and "bits" in block:
        return f"Q{block['bits']}"
    return {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(dtype, dtype.upper() or "unknown")


class Listing:
    """What `/api/tags` says of a model, from its folder alone (a model not loaded is listed too)."""

    def __init__(self, name: str, path: Path, config: dict, parameters: int, dtype: str, memory: int = 0):
        self.name = listed_name(name)
        self.architecture = "qwen3moe" if config.get("model_type") == "qwen3_moe" else "qwen3"
        self.path, self.config, self.parameters = Path(path), config, parameters
        files = sorted(self.path.glob("*.safetensors"))
        self.size = sum(f.stat().st_size for f in files) or memory
        stamp = max((f.stat().st_mtime for f in files), default=time.time())
        self.modified_at = datetime.fromtimestamp(stamp, timezone.utc).isoformat().replace("+00:00", "Z")
        fingerprint = json.dumps(config, sort_keys=True, default=str)
        fingerprint += "".join(f"{f.name}{f.stat().st_size}" for f in files)
        self.digest = hashlib.sha256(fingerprint.encode()).hexdigest()
        self.details = {
            "parent_model": "",
            "format": "safetensors",
            "family": self.architecture,
            "families": [self.architecture],
            "parameter_size": _human(parameters),
            "quantization_level": _quantization(config, dtype),
        }

    @classmethod
    def of_folder(cls, name: str, folder: Path) -> Listing:
        """From config.json and the safetensors headers (`models.read_model`): nothing loads."""
        from .checkpoint import read_config
        from .models import read_model

        info = read_model(folder)
        dtype = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(info.bits, info.bits)
        return cls(name, folder, read_config(folder), info.parameters, dtype)

    def listing(self) -> dict:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": self.modified_at,
            "size": self.size,
            "digest": self.digest,
            "details": self.details,
        }


class Description(Listing):
    """What `/api/tags`, `/api/show` and `/api/ps` say about a loaded model, worked out once."""

    def __init__(self, scheduler: Scheduler, name: str):
        loaded = scheduler.loaded
        parameters, self.memory, dtype = _weights(loaded.model)
        super().__init__(name, loaded.path, loaded.config, parameters, dtype, self.memory)
        self.context_length = scheduler.context_length
        tokenizer = scheduler.tokenizer
        self.template = tokenizer.chat_template
        defaults = Sampling().resolve(loaded.generation_config, True)
        stops = [tokenizer.decode([i]) for i in tokenizer.end_token_ids]
        lines = [f"stop {json.dumps(s)}" for s in stops]
        lines += [f"{k} {getattr(defaults, k)}" for k in ("temperature", "top_k", "top_p", "min_p")]
        self.parameters_text = "\n".join(lines)

    def model_info(self) -> dict:
        c, a = self.config, self.architecture
        info: dict[str, Any] = {
            "general.architecture": a,
            "general.basename": self.name.partition(":")[0],
            "general.parameter_count": self.parameters,
            f"{a}.context_length": self.context_length,
            f"{a}.embedding_length": c.get("hidden_size"),
            f"{a}.block_count": c.get("num_hidden_layers"),
            f"{a}.feed_forward_length": c.get("intermediate_size"),
            f"{a}.attention.head_count": c.get("num_attention_heads"),
            f"{a}.attention.head_count_kv": c.get("num_key_value_heads"),
            f"{a}.attention.key_length": c.get("head_dim"),
            f"{a}.attention.value_length": c.get("head_dim"),
            f"{a}.attention.layer_norm_rms_epsilon": c.get("rms_norm_eps"),
            f"{a}.rope.freq_base": c.get("rope_theta"),
        }
        if a == "qwen3moe":
            info[f"{a}.expert_count"] = c.get("num_experts")
            info[f"{a}.expert_used_count"] = c.get("num_experts_per_tok")
            info[f"{a}.expert_feed_forward_length"] = c.get("moe_intermediate_size")
        return {k: v for k, v in info.items() if v is not None}

    def modelfile(self) -> str:
        params = "\n".join(f"PARAMETER {line}" for line in self.parameters_text.splitlines())
        return (
            "# Modelfile generated by qwen-mlx: the checkpoint as served (nothing here is read back)\n"
            f"FROM {self.path}\n"
            f'TEMPLATE """{self.template}"""\n'
            f"{params}\n"
        )


class JsonBodies:
    """ASGI middleware: Ollama's POST bodies are JSON whatever their Content-Type says (Ollama reads them so,
    and its docs' `curl -d '{...}'` sends a form type, which FastAPI would not parse)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in POST_ROUTES:
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        return await self.app(scope, receive, send)


# --- routes ---------------------------------------------------------------------------------------------


def add_routes(app, models, settings) -> None:
    """Ollama's routes on the server's app (`models`: the server's `Registry`, which hands out each request's
    model; Ollama's names resolve by Ollama's rules here)."""
    app.add_middleware(JsonBodies)
    resolve = resolver(models)
    described: dict[int, Description] = {}  # by the id of the scheduler a model is loaded with

    async def description(model) -> Description:
        scheduler = model.scheduler
        if id(scheduler) not in described:
            live = {id(m.scheduler) for m in models.loaded()}
            for gone in set(described) - live:  # an unloaded model's description goes with it
                del described[gone]
            described[id(scheduler)] = await asyncio.to_thread(Description, scheduler, model.name)
        return described[id(scheduler)]

    async def loading(body: _Request, model, chat: bool) -> dict:
        """Ollama's load call (no messages, no prompt): loads the model, or with `keep_alive: 0` unloads it."""
        if _keep_alive_zero(body.keep_alive):
            await models.unload(model)
            reason = "unload"
        else:
            await models.acquire(model)
            reason = "load"
        fields = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
        return {"model": body.model, "created_at": created_at(), **fields, "done": True, "done_reason": reason}

    async def run(body: _Request, model, request: Request, plan, chat: bool):
        clock = Clock()
        scheduler = (await models.acquire(model)).scheduler
        try:
            turn = await asyncio.to_thread(plan, scheduler.turns, body)
        except QwenMLXError as e:  # the guide names OpenAI's field; the client sent `format`
            if not str(e).startswith("response_format") and not (e.param or "").startswith("response_format"):
                raise
            message = str(e).replace("response_format.json_schema.schema", "format")
            raise APIError(400, message.replace("response_format", "format"), param="format") from None
        ticket = scheduler.submit(turn)
        clock.submitted = time.perf_counter()
        if body.stream:
            stream = _stream(scheduler, ticket, body.model, clock, chat, body.logprobs)
            return StreamingResponse(stream, media_type=NDJSON, headers={"Cache-Control": "no-cache"})
        events, entries, stats = await gather(scheduler, ticket, request)
        thinking, content, calls = _parts(events)
        fields = {"message": _chat_message(thinking, content, calls)} if chat else _generate_fields(thinking, content)
        out = {"model": body.model, "created_at": created_at(), **fields}
        if body.logprobs:
            out["logprobs"] = logprobs_json(entries)
        return out | {"done": True, "done_reason": _done_reason(stats), **clock.metrics(stats)}

    @app.post("/api/chat", responses=BUSY)
    async def ollama_chat(body: OllamaChatRequest, request: Request):
        model = resolve(body.model)
        if not body.messages:
            return await loading(body, model, chat=True)
        return await run(body, model, request, plan_chat, chat=True)

    @app.post("/api/generate", responses=BUSY)
    async def ollama_generate(body: OllamaGenerateRequest, request: Request):
        model = resolve(body.model)
        _check_generate(body)
        if not body.prompt:
            return await loading(body, model, chat=False)
        return await run(body, model, request, plan_generate, chat=False)

    @app.get("/api/tags")
    async def ollama_tags() -> dict:
        listed = []
        for model in models.models:
            if model.scheduler is not None:
                listed.append((await description(model)).listing())
            elif model.folder is not None:
                with contextlib.suppress(QwenMLXError, OSError):  # unreadable: `qwen-mlx list` says why
                    listed.append((await asyncio.to_thread(Listing.of_folder, model.name, model.folder)).listing())
        return {"models": listed}

    @app.post("/api/show")
    async def ollama_show(body: OllamaShowRequest) -> dict:
        d = await description(await models.acquire(resolve(body.model or body.name)))
        return {
            "license": "",
            "modelfile": d.modelfile(),
            "parameters": d.parameters_text,
            "template": d.template,
            "details": d.details,
            "model_info": d.model_info(),
            "capabilities": CAPABILITIES,
            "modified_at": d.modified_at,
        }

    @app.get("/api/ps")
    async def ollama_ps() -> dict:
        """The loaded models, with Ollama's fields and qwen-mlx's: the served id, requests in flight, seconds
        idle."""
        now = datetime.now(timezone.utc)
        forever = (now + timedelta(days=365 * 100)).isoformat().replace("+00:00", "Z")
        out = []
        for model in models.loaded():
            scheduler = model.scheduler
            d = await description(model)
            idle = model.idle_s()
            expires = forever
            if models.ttl is not None:
                expires = (now + timedelta(seconds=max(0.0, models.ttl - idle))).isoformat().replace("+00:00", "Z")
            size = model.memory or d.memory
            extra = {"id": model.name, "in_flight": scheduler.in_flight, "idle_seconds": round(idle, 1)}
            out.append(d.listing() | {"expires_at": expires, "size": size, "size_vram": size,
                                      "context_length": d.context_length} | extra)  # fmt: skip
        return {"models": out}

    @app.get("/api/version")
    async def ollama_version() -> dict:
        return {"version": OLLAMA_VERSION}

    @app.api_route("/", methods=["GET", "HEAD"], response_class=PlainTextResponse, include_in_schema=False)
    async def ollama_root() -> str:
        return "Ollama is running"
