"""Qwen3 conversations: messages in, a stream of typed events out, with the KV cache kept between turns.

Everything Qwen3-specific about a conversation is decided here, once; the CLI, the endpoint and the chat
app are shells over `ChatSession.stream`.

Design decisions:
- The prompt is the checkpoint's own template (`Tokenizer.apply_chat_template`), never a hand-made format.
- Prompt reuse by longest common token prefix: the template strips earlier turns' thinking, so turn 2's
  prompt diverges from the cache right after turn 1's `<|im_start|>assistant\\n`; the cache is trimmed
  back to that point instead of being thrown away, and `cached_tokens` says how much was reused.
- Thinking mode follows the template argument `enable_thinking`, then the latest `/think` or `/no_think`
  in a user or system message (the model honours them; we use them to pick sampling defaults).
- Thinking budget: after `thinking_budget` reasoning tokens the early-stop text from the Qwen3 README is
  forced in (ending with `</think>`), and the model answers from what it has thought so far.
- A prompt that does not fit the model's context is an error, never a silent truncation; `max_tokens` is
  capped to the room that is left (finish reason `length` when reached).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import mlx.nn as nn

from .engine import Generation, Stats, cache_length, make_cache, trim_cache
from .errors import QwenMLXError
from .parser import Answer, Event, Reasoning, ReplyParser, SpecialIds, ToolCall, ToolCallError, thinking_already_open
from .sampling import Sampling
from .tokenizer import Tokenizer, read_generation_config

# The Qwen3 README's early-stop text for a thinking budget (QWEN3.md).
THINKING_BUDGET_TEXT = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking "
    "directly now.\n</think>\n\n"
)
SOFT_SWITCH = re.compile(r"/(no_think|think)\b")


@dataclass
class ChatStats(Stats):
    """One turn's numbers: the engine's, plus token counts as OpenAI reports them and the mode used.

    `finish_reason` is "stop", "length" or "tool_calls"; `prefill_tokens` = `prompt_tokens` - `cached_tokens`.
    """

    prompt_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    thinking: bool = True  # the mode the turn ran in, soft switches applied


@dataclass(frozen=True)
class Done:
    """The last event of every turn."""

    stats: ChatStats


ChatEvent = Event | Done


@dataclass
class Reply:
    """A whole turn, gathered from its events (what a non-streaming caller wants)."""

    reasoning: str = ""
    answer: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[ToolCallError] = field(default_factory=list)
    stats: ChatStats = field(default_factory=ChatStats)

    @classmethod
    def gather(cls, events: Iterator[ChatEvent]) -> Reply:
        reply = cls()
        for event in events:
            if isinstance(event, Reasoning):
                reply.reasoning += event.text
            elif isinstance(event, Answer):
                reply.answer += event.text
            elif isinstance(event, ToolCall):
                reply.tool_calls.append(event)
            elif isinstance(event, ToolCallError):
                reply.errors.append(event)
            elif isinstance(event, Done):
                reply.stats = event.stats
        return reply


def _text_of(content) -> str:
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
                raise QwenMLXError("only text message content is supported (this model reads no images or audio)")
        return "".join(parts)
    raise QwenMLXError(f"message content must be a string or a list of text parts, not {type(content).__name__}")


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """Check roles and turn contents into strings, keeping `reasoning_content`, `tool_calls` and the rest."""
    if not messages:
        raise QwenMLXError("messages is empty: send at least one user message")
    normalized = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise QwenMLXError(f"messages[{i}] must be an object with a role and content")
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise QwenMLXError(f"messages[{i}] has role {role!r}: use system, user, assistant or tool")
        normalized.append({**message, "content": _text_of(message.get("content"))})
    return normalized


def thinking_mode(messages: Sequence[dict], enable_thinking: bool = True) -> bool:
    """Whether the model will think: off when the template is told so, else the latest soft switch wins."""
    if not enable_thinking:
        return False
    for message in reversed(messages):
        if message["role"] in ("user", "system"):
            switches = SOFT_SWITCH.findall(message["content"])
            if switches:
                return switches[-1] == "think"
    return True


def context_length(args) -> int:
    """The longest sequence the model supports: `max_position_embeddings`, or YaRN's extended length."""
    length = args.max_position_embeddings
    scaling = args.rope_scaling or {}
    if scaling.get("factor") and scaling.get("original_max_position_embeddings"):
        length = max(length, int(scaling["factor"] * scaling["original_max_position_embeddings"]))
    return length


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation with one model: keeps the KV cache of the last turn to reuse its common prefix."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        kv_bits: int | None = None,
        generation_config: dict | None = None,
        prefill_step_size: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.kv_bits = kv_bits
        path = getattr(model, "path", None)
        self.generation_config = (
            generation_config if generation_config is not None else (read_generation_config(path) if path else {})
        )
        self.context_length = context_length(model.args)
        self.prefill_step_size = prefill_step_size
        self.special = SpecialIds.of(tokenizer)
        self.budget_ids = tokenizer.encode(THINKING_BUDGET_TEXT)
        self._streaming = False
        self.reset()

    @classmethod
    def load(cls, model: str, *, quantize: int | None = None, revision: str | None = None, **options) -> ChatSession:
        """Load a model folder or Hub repo id (or `demo`) with its own tokenizer and generation settings."""
        from .loader import load

        loaded = load(model, quantize=quantize, revision=revision)
        return cls(loaded, Tokenizer.load(loaded.path), **options)

    def reset(self) -> None:
        """Forget the cached conversation."""
        self.cache = make_cache(self.model, self.kv_bits)
        self.cached_ids: list[int] = []  # the tokens whose keys and values are in the cache, in order

    def render(
        self, messages: Sequence[dict], tools: list[dict] | None = None, enable_thinking: bool = True
    ) -> list[int]:
        """The prompt token ids for these messages, through the checkpoint's template."""
        text = self.tokenizer.apply_chat_template(
            normalize_messages(messages), tools=tools, enable_thinking=enable_thinking, add_generation_prompt=True
        )
        return self.tokenizer.encode(text)

    def stream(
        self,
        messages: Sequence[dict],
        *,
        tools: list[dict] | None = None,
        enable_thinking: bool = True,
        thinking_budget: int | None = None,
        max_tokens: int | None = None,
        sampling: Sampling | None = None,
        stop: Sequence[str] = (),
        on_prefill: Callable[[int, int], None] | None = None,
        end_thinking: Callable[[], bool] | None = None,
    ) -> Iterator[ChatEvent]:
        """Generate the assistant's next turn; yields Reasoning/Answer/ToolCall/ToolCallError, then Done.

        `end_thinking`, asked after every reasoning token, ends the thinking there when it returns True: the
        budget's early-stop text is forced in at once (the chat app's "stop thinking" key, applied live).
        One turn at a time: the session has one cache, so a second stream must wait until this one ends.
        """
        if self._streaming:
            raise QwenMLXError("this session is still streaming a turn: read it to the end or close it first")
        if thinking_budget is not None and thinking_budget < 0:
            raise QwenMLXError(f"thinking_budget={thinking_budget} is invalid: it must be >= 0")
        messages = normalize_messages(messages)
        thinking = thinking_mode(messages, enable_thinking)
        prompt_ids = self.render(messages, tools, enable_thinking)
        room = self.context_length - len(prompt_ids)
        if room <= 0:
            raise QwenMLXError(
                f"the prompt is {len(prompt_ids)} tokens but the model's context is {self.context_length}: "
                "shorten the conversation"
            )
        max_tokens = room if max_tokens is None else min(max_tokens, room)
        settings = (sampling or Sampling()).resolve(self.generation_config, thinking)

        # Reuse the longest cached prefix; at least one token must be fed to get logits.
        reused = min(common_prefix(self.cached_ids, prompt_ids), len(prompt_ids) - 1)
        generation = Generation(  # checks its arguments before the cache is touched
            self.model,
            prompt_ids[reused:],
            self.cache,
            sampler=settings.sampler(self.model.args.vocab_size),
            logits_processors=settings.logits_processors(self.model.args.vocab_size),
            max_tokens=max_tokens,
            end_ids=self.tokenizer.end_token_ids,
            on_prefill=on_prefill,
            **({"prefill_step_size": self.prefill_step_size} if self.prefill_step_size else {}),
        )
        parser = ReplyParser(self.special, thinking_already_open(prompt_ids, self.special), stop)
        detokenizer = self.tokenizer.detokenizer()
        budget_spent = False
        end_ids = set(self.tokenizer.end_token_ids)
        self._streaming = True
        trim_cache(self.cache, reused)
        self.cached_ids = self.cached_ids[:reused]
        try:
            for token in generation:
                if token in end_ids:
                    continue
                yield from parser.feed(token, detokenizer.add(token))
                if parser.stopped:
                    break
                if (
                    not budget_spent
                    and parser.in_thinking
                    and (
                        (thinking_budget is not None and parser.thought_tokens >= thinking_budget)
                        or (end_thinking is not None and end_thinking())
                    )
                ):
                    budget_spent = True
                    generation.inject(self.budget_ids)
            yield from parser.finish()
        except GeneratorExit:  # the caller stopped reading: the cache is between two steps, keep it
            self._remember(prompt_ids + generation.tokens)
            raise
        except BaseException:  # failed inside a step: layers may disagree, so start the next turn afresh
            self.reset()
            raise
        finally:
            self._streaming = False
        self._remember(prompt_ids + generation.tokens)
        stats = generation.stats
        finish = "stop" if parser.stopped else (stats.finish_reason or "stop")
        if finish == "stop" and parser.tool_calls:
            finish = "tool_calls"
        yield Done(
            ChatStats(
                **{**asdict(stats), "finish_reason": finish},
                prompt_tokens=len(prompt_ids),
                cached_tokens=reused,
                reasoning_tokens=parser.reasoning_tokens,
                thinking=thinking,
            )
        )

    def _remember(self, fed: list[int]) -> None:
        """Record which tokens the cache holds: the first `offset` of everything fed, in order."""
        if len({layer_cache.offset for layer_cache in self.cache}) != 1:
            self.reset()
            return
        self.cached_ids = fed[: cache_length(self.cache)]

    def complete(self, messages: Sequence[dict], **options) -> Reply:
        """`stream` gathered into one `Reply`."""
        return Reply.gather(self.stream(messages, **options))
