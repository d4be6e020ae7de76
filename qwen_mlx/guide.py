"""Steers one Qwen3 turn from inside the decode step: thinking budget, "end thinking now", `tool_choice`,
`response_format`.

`TurnGuide` is an mlx-lm logits processor (`(tokens, logits) -> logits`), so it works the same in a
single generation, in the endpoint's continuous batch and on several Macs, where nothing can be injected
between steps: forcing a token means masking every other one. It is given the whole sequence so far (the
prompt, then one more token per step: the engine's and mlx-lm's convention alike) and keeps its own state,
so its decisions are exact to the token.

Design decisions:
- Phases follow Qwen3's format: a turn may open `<think>`, think, close `</think>`, then answer. Anything
  that constrains the answer (JSON, a forced tool call) starts after `</think>` and the blank line after it,
  so the model still thinks freely first; thinking itself is never constrained.
- Thinking budget, the one rule: once `budget` tokens follow `<think>` (the newline after the tag counts),
  the Qwen3 README's early-stop text (ending `</think>\\n\\n`) is forced in, one token a step, and the model
  answers from what it thought so far. Budget 0 forces it right after `<think>`.
- "End thinking now" (`end_thinking()`, from any thread: the chat app's Ctrl+T) forces the same text at
  the next step if the turn is thinking, or as soon as it starts to.
- `tool_choice`: "none" bans `<tool_call>` in the answer; "required" or a named function forces
  `<tool_call>\\n`, then the call's JSON and the newline after it are constrained to the tools' schemas
  (name and arguments; one grammar, so the token that spans the JSON's end and the newline is allowed),
  then `</tool_call>`. Without `parallel_tool_calls` the turn ends after the first call. Under a template
  that writes Qwen3-Coder's XML calls (`format.tool_call_format`, read from the tokenizer's own template
  unless given) the call is constrained to that XML instead, the form the model was trained on.
- A turn whose answer is constrained cannot end while it thinks: the end token's probability moves to
  `</think>`, so a model that would stop mid-thought closes its thinking and the call or JSON still comes.
- Penalties (repetition, presence, frequency) see the generated tokens only, as OpenAI's and vLLM's do.
- Speculative decoding scores several positions in one pass and keeps a prefix of them: `snapshot()`
  before a position and `restore()` to the last kept one undo what the rest did; `forced_next()` names
  the tokens it is about to force, which the engine drafts first; `admitted()` cuts a draft at the first
  token the grammar in force forbids (checked without feeding it), so the pass is not spent on it.
- Reading a token's value costs a wait on the device (the step that sampled it), which would stop the
  engine's pipelining; so the guide reads the sequence only while a decision can depend on it, and
  catches up on what it skipped when one can (a budget that could be reached, an end asked for).
Written here because no library knows Qwen3's turn format; the JSON grammar itself is `constrain`'s.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Sequence

import mlx.core as mx

from . import format as qwen3
from .format import SpecialIds
from .sampling import LogitsProcessor
from .tokenizer import Tokenizer

START, THINKING, CLOSING, ANSWER, TOOL_JSON, DONE = range(6)
_PHASES = {qwen3.START: START, qwen3.THINKING: THINKING, qwen3.ANSWER: ANSWER}


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
    """`constrain`'s grammar, imported only when a turn asks for one (the grammar library is heavy)."""
    from .constrain import response_format_grammar

    return response_format_grammar(response_format)


class TurnGuide:
    """A logits processor for one turn; make a new one per turn."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        prompt_ids: Sequence[int],
        *,
        budget: int | None = None,
        tool_choice: str | None = None,  # None/"auto", "none", "required", or a function name
        tools: Sequence[dict] = (),
        parallel_tool_calls: bool = True,
        response_format: dict | None = None,
        penalties: Sequence[LogitsProcessor] = (),
        tool_format: str | None = None,  # `format.JSON_TOOL_CALLS` or `XML_TOOL_CALLS`; None: the template's
    ):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.special = SpecialIds.of(tokenizer)
        self.end_id = tokenizer.end_token_ids[0]
        self.prompt_len = len(prompt_ids)
        self.budget = budget
        self.budget_ids = tokenizer.encode(qwen3.THINKING_BUDGET_TEXT)
        self.penalties = list(penalties)
        self.ban_tools = tool_choice == "none"
        self.tool_grammar = None
        self.single_call = not parallel_tool_calls
        if tool_choice not in (None, "auto", "none"):
            named = None if tool_choice == "required" else tool_choice
            self.single_call = self.single_call or named is not None
            from .constrain import tool_call_grammar, xml_tool_call_grammar  # heavy: imported when needed

            if (tool_format or qwen3.tool_call_format(tokenizer.chat_template)) == qwen3.XML_TOOL_CALLS:
                self.tool_grammar = xml_tool_call_grammar(list(tools), named)
            else:
                self.tool_grammar = tool_call_grammar(tool_call_schema(tools, named))
        self.json_grammar = _grammar(response_format) if response_format else None
        self.newline_ids = tokenizer.encode("\n")
        self.blank_ids = tokenizer.encode("\n\n")
        self.phase = _PHASES[qwen3.prompt_phase(prompt_ids, self.special)]
        self.thought = 0
        self.budget_spent = False
        self.end_requested = False
        self.queue: deque[int] = deque()
        self.constraint = None  # constrain.JsonConstraint while one is active
        self.seen = self.prompt_len  # tokens of the sequence observed so far
        if self.phase == ANSWER:  # the template closed an empty think block: the answer starts now
            self._enter_answer()
        self._ids = None  # made on first use: MLX arrays belong to the thread (stream) that runs them
        self._end_ids = None

    def end_thinking(self) -> None:
        """Stop thinking now: the early-stop text goes in at the next step (callable from any thread)."""
        self.end_requested = True

    def snapshot(self) -> dict:
        """The state after the tokens seen so far (for speculative decoding to come back to)."""
        state = dict(self.__dict__)
        state["queue"] = deque(self.queue)
        state["constraint"] = copy.copy(self.constraint)
        return state

    def restore(self, state: dict) -> None:
        """Go back to a `snapshot()`; an end of thinking asked for since is kept."""
        requested = self.end_requested
        self.__dict__.update(state)
        self.queue = deque(state["queue"])
        self.constraint = copy.copy(state["constraint"])
        self.end_requested = self.end_requested or requested

    def forced_next(self) -> list[int]:
        """Tokens this guide will force at the next steps whatever the model says (the budget's text)."""
        return list(self.queue)

    def admitted(self, last: int, drafts: list[int]) -> int:
        """How many of `drafts` (proposed to follow `last`, the token just drawn) the grammar now in force
        allows, in order: drafts stop at the first it forbids, so no pass is spent on them. Outside a
        grammar, all of them (the target's pass judges those)."""
        if self.queue or self.constraint is None or self.phase not in (TOOL_JSON, ANSWER):
            return len(drafts)
        return self.constraint.admitted(last, drafts)

    @property
    def _constrains_answer(self) -> bool:
        return self.tool_grammar is not None or self.json_grammar is not None

    def _watching(self, generated: int) -> bool:
        """Whether this step's decision can depend on the tokens (else they need not be read yet)."""
        if self.queue or self.end_requested or self.phase in (CLOSING, TOOL_JSON, DONE):
            return True
        if self._constrains_answer or self.ban_tools or self.single_call:
            return True
        # A budget can only be reached once at least that many tokens were generated.
        return self.budget is not None and not self.budget_spent and generated >= self.budget

    def _enter_answer(self) -> None:
        self.phase = ANSWER
        self.end_requested = False
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
            self.end_requested = False
            if token == special.tool_call_start and self.tool_grammar is not None:
                self.queue.extend(self.newline_ids)
                self.phase = TOOL_JSON
        if self.phase == THINKING:
            if token == special.think_end:
                self.phase = CLOSING
                self.end_requested = False
                if not self.queue and self._constrains_answer:
                    self.queue.extend(self.blank_ids)
                return
            self.thought += 1
            return
        if self.phase == ANSWER and token == special.tool_call_end and self.single_call:
            self.phase = DONE

    def _stop_thinking_if_due(self) -> None:
        if self.phase != THINKING or self.budget_spent:
            return
        if self.end_requested or (self.budget is not None and self.thought >= self.budget):
            self.budget_spent = True
            self.end_requested = False
            self.queue.extend(self.budget_ids)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._ids is None:
            self._ids = mx.arange(self.vocab_size)
        tokens = tokens.reshape(-1)
        size = tokens.size
        if self.penalties:  # (with nothing generated yet, a logit bias still applies)
            generated = tokens[self.prompt_len :]
            for penalty in self.penalties:
                logits = penalty(generated, logits)
        if size > self.seen and self._watching(size - self.prompt_len):
            for token in tokens[self.seen :].tolist():
                self._observe(token)
            self.seen = size
        self._stop_thinking_if_due()

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
            self.queue.append(self.special.tool_call_end)  # the grammar ended with the newline before it
            return self._only([self.queue.popleft()], logits)
        if self.phase == THINKING and self._constrains_answer:
            return self._close_instead_of_ending(logits)
        if self.phase == ANSWER:
            if self.constraint is not None:
                return self.constraint(tokens, logits)
            if self.ban_tools:
                return mx.where(self._ids == self.special.tool_call_start, -mx.inf, logits)
        return logits

    def _close_instead_of_ending(self, logits: mx.array) -> mx.array:
        """A turn that must answer in a form cannot end inside its thinking: the chance of ending goes to
        `</think>` instead, so the constrained answer still comes."""
        if self._end_ids is None:
            self._end_ids = mx.array(self.tokenizer.end_token_ids)
        ends = self._end_ids
        ending = mx.logsumexp(logits[..., ends], axis=-1, keepdims=True)
        close = self._ids == self.special.think_end
        logits = mx.where(close, mx.logaddexp(logits, ending), logits)
        return mx.where((self._ids[:, None] == ends[None, :]).any(axis=1), -mx.inf, logits)

    def _constraint(self, grammar):
        from .constrain import JsonConstraint

        return JsonConstraint(self.tokenizer, grammar, self.vocab_size)

    def _only(self, allowed: list[int], logits: mx.array) -> mx.array:
        mask = self._ids == allowed[0]
        for token in allowed[1:]:
            mask = mask | (self._ids == token)
        return mx.where(mask, logits, -mx.inf)
