"""The OpenAI request bodies the endpoint accepts, and its error body, as pydantic models (they also make
`/openapi.json`).

Unknown fields are ignored, as OpenAI-compatible servers do, so clients that send vendor extensions
still work; known fields are checked for type and range, and a bad one is a 400 naming it.
Qwen3 additions, in the vLLM/SGLang spelling where one exists: `chat_template_kwargs.enable_thinking`,
top-level `enable_thinking`, `thinking_budget`, `top_k`, `min_p`, `repetition_penalty`, and assistant
messages carrying `reasoning_content` (also `reasoning` or `thinking`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Body(BaseModel):
    """The base of every protocol's request bodies (OpenAI's here, Anthropic's, Ollama's): unknown fields are
    ignored, known ones are strict ("0.5" is no number, true no count: a 400)."""

    model_config = ConfigDict(extra="ignore", strict=True)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error, as every status but 200 answers it on OpenAI's routes (documented in `/openapi.json`)."""

    error: ErrorDetail


# A route that queues a turn also answers 429 when every slot and waiting place is taken (`Overloaded`).
MAX_DRAFT_TOKENS = 32  # a request's `speculative.k`: more only costs verification work
BUSY = {429: {"description": "The server is busy: every slot and waiting place is taken; try again shortly"}}


class ToolCallFunction(Body):
    name: str
    arguments: str | dict[str, Any] = "{}"


class MessageToolCall(Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    thinking: str | None = None


class FunctionSpec(Body):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Body):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(Body):
    include_usage: bool = False


class JsonSchemaFormat(Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatTemplateKwargs(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    enable_thinking: bool | None = None


class Speculative(Body):
    """qwen-mlx's extension: speculative decoding for this request (the same tokens, fewer model passes)."""

    draft: Literal["lookup", "model", "none"]  # prompt lookup, the server's --draft-model, or off
    k: int | None = Field(default=None, ge=1, le=MAX_DRAFT_TOKENS)  # tokens per pass; None: the server's


class _Sampling(Body):
    model: str | None = None
    speculative: Speculative | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=10)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(default=None)
    logit_bias: dict[str, float] | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    enable_thinking: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    thinking_budget: int | None = Field(default=None, ge=0)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None
