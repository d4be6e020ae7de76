"""Steers one Qwen3 turn from inside the decode step: thinking budget, `tool_choice`, `response_format`.

`TurnGuide` is an mlx-lm logits processor (`(tokens, logits) -> logits`), so it works the same in a
single generation and in the endpoint's continuous batch, where nothing can be injected between steps:
forcing a token means masking every other one. It reads the token ids it is given (the prompt, then one
more token per step) and keeps its own state, so its decisions are exact to the token.

Design decisions:
- Phases follow Qwen3's format: a turn may open `<think>`, think, close `</think>`, then answer. Anything
  that constrains the answer (JSON, a forced tool call) starts after `</think>` and the blank line after it,
  so the model still thinks freely first; thinking itself is never constrained.
- Thinking budget: after `budget` thought tokens the Qwen3 README's early-stop text (ending `</think>\\n\\n`)
  is forced in, one token a step, and the model answers from what it thought so far.
- `tool_choice`: "none" bans `<tool_call>` in the answer; "required" or a named function forces
  `<tool_call>\\n`, then the call's JSON is constrained to the tools' schemas (name and arguments), then
  `\\n</tool_call>`. Without `parallel_tool_calls` the turn ends after the first call.
- Penalties (repetition, presence, frequency) see the generated tokens only, as OpenAI's and vLLM's do.
Written here because no library knows Qwen3's turn format; the JSON grammar itself is `constrain`'s.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import mlx.core as mx

from .parser import SpecialIds
from .sampling import LogitsProcessor
from .tokenizer import Tokenizer

START, THINKING, CLOSING, ANSWER, TOOL_JSON, DONE = range(6)


def tool_call_schema(tools: Sequence[dict], name: str | None = None) -> dict:
    """The JSON schema of one `<tool_call>` body for these OpenAI tools (only `name`'s when given)."""
    options = []
    for tool in tools:
        function = tool.get("function", tool)
        if name is not None and function.get("name") != name:
            continue
        parameters = function.get("parameters") or {"type": "object"}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def _grammar(response_format: dict):
    """`constrain`'s grammar, imported only when a request asks for one (the grammar library is heavy)."""
    from .constrain import response_format_grammar

    return response_format_grammar(response_format)


class TurnGuide:
    """A logits processor for one turn; make a new one per request."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        prompt_ids: Sequence[int],
        *,
        budget: int | None = None,
        budget_ids: Sequence[int] = (),
        tool_choice: str | None = None,  # None/"auto", "none", "required", or a function name
        tools: Sequence[dict] = (),
        parallel_tool_calls: bool = True,
        response_format: dict | None = None,
        penalties: Sequence[LogitsProcessor] = (),
    ):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.special = SpecialIds.of(tokenizer)
        self.end_id = tokenizer.end_token_ids[0]
        self.prompt_len = len(prompt_ids)
        self.budget = budget
        self.budget_ids = list(budget_ids)
        self.penalties = list(penalties)
        self.parallel_tool_calls = parallel_tool_calls
        self.ban_tools = tool_choice == "none"
        self.tool_grammar = None
        self.single_call = not parallel_tool_calls
        if tool_choice not in (None, "auto", "none"):
            named = None if tool_choice == "required" else tool_choice
            self.single_call = self.single_call or named is not None
            schema = tool_call_schema(tools, named)
            self.tool_grammar = _grammar(
                {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}
            )
        self.json_grammar = _grammar(response_format) if response_format else None
        self.newline_ids = tokenizer.encode("\n")
        self.blank_ids = tokenizer.encode("\n\n")
        self.phase = self._phase_of(prompt_ids)
        self.thought = 0
        self.budget_spent = False
        self.queue: deque[int] = deque()
        self.constraint = None  # constrain.JsonConstraint while one is active
        self.seen = 0
        if self.phase == ANSWER:  # the template closed an empty think block: the answer starts now
            self._enter_answer()
        self._ids = None  # made on first use: MLX arrays belong to the thread (stream) that runs them

    @property
    def active(self) -> bool:
        """Whether this guide can change anything (else the caller may leave it out)."""
        return (
            bool(self.budget is not None or self.tool_grammar or self.json_grammar or self.ban_tools or self.penalties)
            or not self.parallel_tool_calls
        )

    def _phase_of(self, prompt_ids: Sequence[int]) -> int:
        """Where the template left the turn: inside `<think>`, after a closed block, or before either."""
        im_start = self.tokenizer.token_id("<|im_start|>")
        for token in reversed(prompt_ids):
            if token == self.special.think_start:
                return THINKING
            if token == self.special.think_end:
                return ANSWER
            if token == im_start:
                break
        return START

    @property
    def _constrains_answer(self) -> bool:
        return self.tool_grammar is not None or self.json_grammar is not None

    def _enter_answer(self) -> None:
        self.phase = ANSWER
        if self.tool_grammar is not None:
            self.queue.extend([self.special.tool_call_start, *self.newline_ids])
            self.phase = TOOL_JSON
        elif self.json_grammar is not None:
            self.constraint = self._constraint(self.json_grammar)

    def _observe(self, token: int) -> None:
        special = self.special
        if self.phase == START:
            if token == special.think_start:
                self.phase = THINKING
                self.constraint = None  # the answer's constraint starts afresh after thinking
                return
            self.phase = ANSWER
            if token == special.tool_call_start and self.tool_grammar is not None:
                self.queue.extend(self.newline_ids)
                self.phase = TOOL_JSON
        if self.phase == THINKING:
            if token == special.think_end:
                self.phase = CLOSING
                if not self.queue and self._constrains_answer:
                    self.queue.extend(self.blank_ids)
                return
            self.thought += 1
            if self.budget is not None and not self.budget_spent and self.thought >= self.budget:
                self.budget_spent = True
                self.queue.extend(self.budget_ids)
            return
        if self.phase == ANSWER and token == special.tool_call_end and self.single_call:
            self.phase = DONE

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._ids is None:
            self._ids = mx.arange(self.vocab_size)
        tokens = tokens.reshape(-1)
        if self.seen == 0:
            self.seen = tokens.size  # the prompt
        elif tokens.size > self.seen:
            for token in tokens[self.seen :].tolist():
                self._observe(token)
            self.seen = tokens.size
        if self.penalties and tokens.size > self.prompt_len:
            generated = tokens[self.prompt_len :]
            for penalty in self.penalties:
                logits = penalty(generated, logits)

        if self.queue:
            return self._only([self.queue.popleft()], logits)
        if self.phase == CLOSING:
            self._enter_answer()
            if self.queue:
                return self._only([self.queue.popleft()], logits)
        if self.phase == DONE:
            return self._only([self.end_id], logits)
        if self.phase == START and self._constrains_answer:
            # The model may still open <think>; otherwise its first token is already the answer's.
            if self.tool_grammar is not None:
                return self._only([self.special.think_start, self.special.tool_call_start], logits)
            if self.constraint is None:
                self.constraint = self._constraint(self.json_grammar)
            masked = self.constraint(tokens, logits)
            return mx.where(self._ids == self.special.think_start, logits, masked)
        if self.phase == TOOL_JSON:
            if self.constraint is None:
                self.constraint = self._constraint(self.tool_grammar)
            masked = self.constraint(tokens, logits)
            if not self.constraint.done:
                return masked
            self.constraint = None
            self.phase = DONE if self.single_call else ANSWER
            self.tool_grammar = None  # the forced call is made; later calls, if any, are the model's own
            self.queue.extend([*self.newline_ids, self.special.tool_call_end])
            return self._only([self.queue.popleft()], logits)
        if self.phase == ANSWER:
            if self.constraint is not None:
                return self.constraint(tokens, logits)
            if self.ban_tools:
                return mx.where(self._ids == self.special.tool_call_start, -mx.inf, logits)
        return logits

    def _constraint(self, grammar):
        from .constrain import JsonConstraint

        return JsonConstraint(self.tokenizer, grammar, self.vocab_size)

    def _only(self, allowed: list[int], logits: mx.array) -> mx.array:
        mask = self._ids == allowed[0]
        for token in allowed[1:]:
            mask = mask | (self._ids == token)
        return mx.where(mask, logits, -mx.inf)
