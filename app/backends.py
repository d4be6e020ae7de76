"""Where the chat app's answers come from: the local engine, or any OpenAI-compatible endpoint.

Both backends speak the engine's event vocabulary (`Reasoning`, `Answer`, `ToolCall`, then `Done` with
`ChatStats`), so the app has one code path. Every method is called on the app's single worker thread: MLX
arrays belong to the thread that evaluates them, and one long-lived thread keeps the model, its KV cache
and its streams together.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import mlx.core as mx

from qwen_mlx.chat import ChatSession
from qwen_mlx.loader import DEMO_NAMES
from qwen_mlx.memory import MemoryWarning
from qwen_mlx.sampling import Sampling
from qwen_mlx.turn import ChatEvent


class Backend(Protocol):
    label: str  # shown in the status bar
    context_limit: int | None  # tokens; None when unknown (an endpoint)
    notices: list[str]  # things to tell the user once, gathered while loading (a model that will not fit)

    def stream(
        self, messages: list[dict], *, thinking: bool, budget: int | None, temperature: float | None
    ) -> Iterator[ChatEvent]:
        """One assistant turn; closing the iterator early stops generation at once."""
        ...

    def end_thinking(self) -> bool:
        """Ask the running turn to stop thinking now; False when this backend cannot (said to the user)."""
        ...

    def memory(self) -> int | None:
        """Bytes the model holds now; None when unknown."""
        ...

    def prompt_tokens(self, messages: list[dict]) -> int | None:
        """The prompt's length in tokens (tokenizer only, no model call); None when unknown."""
        ...


class LocalBackend:
    """`ChatSession` on this machine: the KV cache is kept between turns, thinking can be ended live."""

    def __init__(self, session: ChatSession, label: str, notices: list[str] | None = None):
        self.session = session
        self.label = label
        self.context_limit = session.context_length
        self.notices = notices or []

    @classmethod
    def load(
        cls,
        model: str,
        *,
        quantize: int | None = None,
        revision: str | None = None,
        draft: str | None = None,
        num_draft_tokens: int | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> LocalBackend:
        """Load a model folder, a Hub repo id, `demo` or `demo-coder`; raises QwenMLXError with one readable line.

        `progress` hears about slow first-time work (training the demo model takes about a minute).
        """
        if model in DEMO_NAMES and not Path(model).exists() and progress is not None:
            from qwen_mlx.demo import ensure_demo, ensure_demo_coder

            (ensure_demo if model == "demo" else ensure_demo_coder)(log=progress)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MemoryWarning)
            speculation = {"num_draft_tokens": num_draft_tokens} if num_draft_tokens else {}
            session = ChatSession.load(model, quantize=quantize, revision=revision, draft=draft, **speculation)
        notices = [str(w.message) for w in caught if issubclass(w.category, MemoryWarning)]
        return cls(session, model, notices)

    def stream(
        self, messages: list[dict], *, thinking: bool, budget: int | None, temperature: float | None
    ) -> Iterator[ChatEvent]:
        sampling = Sampling(temperature=temperature) if temperature is not None else None
        return self.session.stream(messages, enable_thinking=thinking, thinking_budget=budget, sampling=sampling)

    def end_thinking(self) -> bool:
        self.session.end_thinking()
        return True

    def memory(self) -> int | None:
        return mx.get_active_memory()

    def prompt_tokens(self, messages: list[dict]) -> int | None:
        return len(self.session.render(messages)) if messages else 0
