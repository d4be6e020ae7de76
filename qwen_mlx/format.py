"""Qwen3's chat format, as facts: the budget's early-stop text, soft switches, messages, where a prompt leaves off.

Each fact lives here once, and this module imports no engine (no MLX, no tokenizer library), so the chat
layer, the guide, the parser, the demo model's training and the protocol translators all read the same
rule.

Design decisions:
- Special tokens are looked up in the checkpoint's vocabulary (`SpecialIds.of(tokenizer)`), never
  hard-coded: `<think>`, `</think>`, `<tool_call>` and `</tool_call>` are single tokens in Qwen3's vocabulary.
- Where the prompt leaves the turn (`prompt_phase`) is read from the last turn of the prompt only: inside a
  `<think>` block the template opened (Thinking-2507), after a block it closed (`enable_thinking=False`),
  or before either. Earlier turns' blocks say nothing about the new one.
- Thinking mode follows the template argument `enable_thinking`, then the latest `/think` or `/no_think` in
  a user or system message (the model honours them; the engine uses them to pick sampling defaults).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import QwenMLXError

# The Qwen3 README's early-stop text for a thinking budget (QWEN3.md): forced in once the budget is spent.
THINKING_BUDGET_TEXT = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking "
    "directly now.\n</think>\n\n"
)
SOFT_SWITCH = re.compile(r"/(no_think|think)\b")
ROLES = ("system", "user", "assistant", "tool")

# How a template writes a tool call inside `<tool_call>`: Qwen3's JSON, or Qwen3-Coder's XML.
JSON_TOOL_CALLS, XML_TOOL_CALLS = "json", "xml"

# Where a prompt leaves the assistant's turn.
START, THINKING, ANSWER = "start", "thinking", "answer"


@dataclass(frozen=True)
class SpecialIds:
    """The ids of the tokens that structure a Qwen3 reply (None where a vocabulary lacks one)."""

    think_start: int | None
    think_end: int | None
    tool_call_start: int | None
    tool_call_end: int | None
    im_start: int | None = None

    @classmethod
    def of(cls, tokenizer) -> SpecialIds:
        return cls(
            tokenizer.token_id("<think>"),
            tokenizer.token_id("</think>"),
            tokenizer.token_id("<tool_call>"),
            tokenizer.token_id("</tool_call>"),
            tokenizer.token_id("<|im_start|>"),
        )


def tool_call_format(chat_template: str) -> str:
    """`XML_TOOL_CALLS` for a template that renders Qwen3-Coder's `<function=...><parameter=...>` calls
    (keyed on what it renders, so the real Coder checkpoints and our own templates match alike)."""
    return XML_TOOL_CALLS if "<function=" in chat_template and "<parameter=" in chat_template else JSON_TOOL_CALLS


def function_tool(name: str, description: str | None, parameters: dict | None) -> dict:
    """A tool as the template reads it, in OpenAI's shape and key order (name, description, parameters):
    the order every OpenAI client sends, so a tool from any protocol renders into the same prompt."""
    spec: dict = {"name": name}
    if description:
        spec["description"] = description
    spec["parameters"] = parameters or {"type": "object", "properties": {}}
    return {"type": "function", "function": spec}


def arguments_as_objects(messages: Sequence[dict]) -> list[dict]:
    """Messages whose tool calls carry their arguments as objects, as an XML template needs (it walks them
    with `|items`); OpenAI clients send them back as JSON text. Text that is not a JSON object stays."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            message = {**message, "tool_calls": [_call_with_object(call) for call in calls]}
        out.append(message)
    return out


def _call_with_object(call):
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"] or "{}")
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**function, "arguments": arguments}} if isinstance(arguments, dict) else call


def prompt_phase(prompt_ids: Sequence[int], special: SpecialIds) -> str:
    """Where the template left the new turn: `THINKING` (it opened `<think>`), `ANSWER` (it closed an
    empty block), or `START` (the model may open one)."""
    for token in reversed(prompt_ids):
        if token == special.think_start:
            return THINKING
        if token == special.think_end:
            return ANSWER
        if token == special.im_start:
            break
    return START


def _text_of(content, i: int) -> str:
    """Message content as the template needs it: a string (OpenAI also sends None or a list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
            else:
                raise QwenMLXError(
                    "only text message content is supported (this model reads no images or audio)",
                    param=f"messages[{i}].content",
                )
        return "".join(parts)
    raise QwenMLXError(
        f"message content must be a string or a list of text parts, not {type(content).__name__}",
        param=f"messages[{i}].content",
    )


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """Check roles and turn contents into strings, keeping `reasoning_content`, `tool_calls` and the rest."""
    if not messages:
        raise QwenMLXError("messages is empty: send at least one user message", param="messages")
    normalized = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise QwenMLXError(f"messages[{i}] must be an object with a role and content", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise QwenMLXError(
                f"messages[{i}] has role {role!r}: use system, user, assistant or tool", param=f"messages[{i}].role"
            )
        normalized.append({**message, "content": _text_of(message.get("content"), i)})
    return normalized


# How a template lets a turn think: Qwen3's switch (`enable_thinking`, /think, /no_think), always
# (Thinking-2507 opens `<think>` itself), or never (Instruct-2507 has no thinking at all).
SWITCHED, ALWAYS_THINKS, NEVER_THINKS = "switched", "always", "never"


def thinking_control(phase_on: str, phase_off: str) -> str:
    """Which of the three a template is, from where its prompt leaves a turn told to think (`phase_on`)
    and told not to (`phase_off`): read from what it renders, so any checkpoint's template is placed."""
    if phase_off == THINKING:
        return ALWAYS_THINKS
    if phase_on == phase_off == START:
        return NEVER_THINKS
    return SWITCHED


def latest_switch(messages: Sequence[dict]) -> str | None:
    """The latest `/think` or `/no_think` in a user or system message ("think" or "no_think"), or None."""
    for message in reversed(messages):
        if message["role"] in ("user", "system"):
            switches = SOFT_SWITCH.findall(message["content"])
            if switches:
                return switches[-1]
    return None


def thinking_mode(messages: Sequence[dict], enable_thinking: bool = True) -> bool:
    """Whether the model will think: off when the template is told so, else the latest soft switch wins."""
    if not enable_thinking:
        return False
    return latest_switch(messages) != "no_think"
