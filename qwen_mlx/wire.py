"""What every protocol's routes share: errors in the shape the client's protocol expects, reading a turn
whole or as it comes (with keep-alives while a long prompt is prefilled), and the SSE frame.

The server speaks several protocols (OpenAI's Chat Completions, Completions and Responses, Anthropic's
Messages, Ollama's API) over the same models (`registry`); each protocol's module turns requests into turn plans and
events into its own JSON, and uses this module for the rest.

Design decisions:
- One error type (`APIError`) for every route; its shape follows the request's path (`error_body`), so a
  handler, the body cap and the API-key check answer an Anthropic client in Anthropic's shape and an Ollama
  client in Ollama's without knowing which protocol they serve.
- A client that leaves frees its slot: `gather` looks at the connection every `DISCONNECT_POLL_S` whether
  tokens come or not; a stream finds out when its write fails (Starlette then closes the generator).
- `updates` yields `None` after `keepalive_s` without a token (a long prefill), so a stream can send its
  protocol's keep-alive (an SSE comment, Anthropic's `ping`) and no client times out waiting.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from .scheduler import Failed, Finished, Scheduler, Step, Ticket

DISCONNECT_POLL_S = 0.5
KEEPALIVE_S = 10.0
KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: clients ignore it, and their read timeout starts again

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


class APIError(Exception):
    """An error answered in the shape of the request's protocol, with this HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def protocol_of(path: str) -> str:
    """'anthropic', 'ollama' or 'openai': whose error shape a request on `path` gets."""
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/api/") and not path.startswith("/api/v0/"):
        return "ollama"
    return "openai"


def error_body(
    message: str, type: str = "invalid_request_error", param=None, code=None, *, status: int = 400, path: str = ""
) -> dict:
    protocol = protocol_of(path)
    if protocol == "anthropic":
        kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    if protocol == "ollama":
        return {"error": message}
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int, message: str, type: str = "invalid_request_error", param=None, code=None, *, path: str = ""
) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code, status=status, path=path), status_code=status)


def logprobs_json(entries) -> list[dict]:
    """Token log-probabilities (`TurnReader.logprob`'s entries) as OpenAI's and Ollama's `logprobs` list."""
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": e.bytes,
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, lp, b in e.top],
        }
        for e in entries
    ]


def sse(payload: dict, event: str | None = None) -> str:
    """One Server-Sent Event: `data:` with the JSON, after an `event:` line when the protocol names events."""
    data = f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
    return f"event: {event}\n{data}" if event else data


async def updates(ticket: Ticket, keepalive_s: float = KEEPALIVE_S) -> AsyncIterator[Step | Finished | Failed | None]:
    """The ticket's updates as they come, and `None` after each `keepalive_s` without one; ends after
    `Finished` or `Failed`."""
    while True:
        try:
            update = await asyncio.wait_for(ticket.updates.get(), keepalive_s)
        except asyncio.TimeoutError:
            yield None
            continue
        if update is None:
            return
        yield update
        if isinstance(update, Finished | Failed):
            return


async def gather(scheduler: Scheduler, ticket: Ticket, request: Request):
    """A whole non-streamed turn: (events, logprob entries, stats); frees the slot if the client leaves."""
    events, entries = [], []
    checked = time.monotonic()
    try:
        while True:
            try:
                update = await asyncio.wait_for(ticket.updates.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                update = None
            if update is None or time.monotonic() - checked > DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    raise APIError(499, "the client closed the request")
                if update is None:
                    continue
            if isinstance(update, Step):
                events.extend(update.events)
                entries.extend(update.logprobs or [])
            elif isinstance(update, Failed):
                raise APIError(500, update.error, "server_error")
            elif isinstance(update, Finished):
                return events, entries, update.stats
    finally:
        scheduler.done(ticket)
