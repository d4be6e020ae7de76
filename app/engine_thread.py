"""The chat app's one long-lived MLX thread: it loads the backend and runs every turn.

MLX arrays belong to the thread that evaluates them, so loading, prefill and decoding all happen here, in
order, one job at a time. The UI thread never waits on it: the thread sends `post_message` updates,
batched to about 12 a second (a widget update per token would swamp the UI at 100+ tokens/s on Metal),
plus one immediately when the answer starts so the thinking panel folds on time.

Updates are also paced by the UI: the next one is sent only after the app has drawn the last (`drawn`), and
text gathers in between. Drawing a long code block costs more per update as it grows (Textual re-highlights
the whole fence), and without pacing the updates queue up ahead of the user's keys
(bench/bench_chat_ui.py measures it: a 1,500-line code answer).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
from textual.app import App
from textual.message import Message

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.parser import Answer, Reasoning, ToolCall, ToolCallError
from qwen_mlx.turn import ChatStats, Done

from .backends import Backend

UPDATE_INTERVAL_S = 1 / 12


@dataclass(frozen=True)
class TurnRequest:
    turn: int  # the app's id for this turn; updates for a turn the app gave up on are ignored there
    messages: list[dict]
    thinking: bool
    budget: int | None
    temperature: float | None


class EngineThread(threading.Thread):
    """Jobs in through methods called from the UI thread; results out as messages posted to the app."""

    class Loaded(Message):
        def __init__(self, backend: Backend) -> None:
            super().__init__()
            self.backend = backend

    class Progress(Message):
        """A line about slow loading work, for the status bar."""

        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    class LoadFailed(Message):
        def __init__(self, what: str, error: str) -> None:
            super().__init__()
            self.what = what
            self.error = error

    class Update(Message):
        """New text for a turn since the last update; `thought_s` is set once the answer has started."""

        def __init__(self, turn: int, reasoning: str, answer: str, reasoning_chunks: int, thought_s: float | None):
            super().__init__()
            self.turn = turn
            self.reasoning = reasoning
            self.answer = answer
            self.reasoning_chunks = reasoning_chunks  # so far: about one per token until the exact count arrives
            self.thought_s = thought_s

    class Finished(Message):
        def __init__(self, turn: int, stats: ChatStats | None, error: str | None, thought_s: float | None):
            super().__init__()
            self.turn = turn
            self.stats = stats
            self.error = error
            self.thought_s = thought_s

    def __init__(self, app: App) -> None:
        super().__init__(name="qwen-mlx-engine", daemon=True)
        self.app = app
        self.backend: Backend | None = None
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._cancelled: set[int] = set()
        self._drawn = threading.Event()  # the app has drawn the last update
        self._drawn.set()
        self.paced = True  # wait for `drawn` between updates (a benchmark turns it off to compare)

    def run(self) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                job()
        finally:
            # MLX asks a thread to destroy its own streams before it ends; left to the interpreter's teardown,
            # they can abort the process after a clean quit (ml-explore/mlx#4506, mlx-vlm#1945).
            mx.clear_streams()

    def shutdown(self) -> None:
        self._jobs.put(None)

    def load(self, what: str, factory: Callable[[Callable[[str], None]], Backend]) -> None:
        """Make a backend (a model to load, an endpoint to reach) and make it the current one if that works.

        `factory(progress)` may report slow steps through `progress(text)`.
        """

        def job() -> None:
            try:
                backend = factory(lambda text: self.app.post_message(self.Progress(text)))
            except QwenMLXError as error:
                self.app.post_message(self.LoadFailed(what, str(error)))
            except Exception as error:  # a loader bug must still leave the app running
                self.app.post_message(self.LoadFailed(what, f"{type(error).__name__}: {error}"))
            else:
                self.backend = backend
                self.app.post_message(self.Loaded(backend))

        self._jobs.put(job)

    def generate(self, request: TurnRequest) -> None:
        self._jobs.put(lambda: self._generate(request))

    def cancel(self, turn: int) -> None:
        """Stop a turn at its next token (or before it starts)."""
        self._cancelled.add(turn)

    def drawn(self) -> None:
        """Called by the app when it has drawn an update: the next may be sent."""
        self._drawn.set()

    def end_thinking(self) -> bool:
        return self.backend is not None and self.backend.end_thinking()

    def _generate(self, request: TurnRequest) -> None:
        turn = request.turn
        stats: ChatStats | None = None
        error: str | None = None
        reasoning, answer = [], []
        chunks = 0
        first_reasoning_at = answer_at = None
        last_post = 0.0

        def thought() -> float | None:
            if first_reasoning_at is None:
                return None
            return (answer_at or time.perf_counter()) - first_reasoning_at

        def post(now: bool = False) -> None:
            """Send the gathered text; unless `now`, only once the app has drawn the last update."""
            nonlocal last_post
            if not (reasoning or answer) or (self.paced and not now and not self._drawn.is_set()):
                return
            self._drawn.clear()
            self.app.post_message(
                self.Update(turn, "".join(reasoning), "".join(answer), chunks, thought() if answer_at else None)
            )
            reasoning.clear()
            answer.clear()
            last_post = time.perf_counter()

        self._drawn.set()

        if self.backend is None or turn in self._cancelled:
            error = None if turn in self._cancelled else "no model is loaded: /model NAME loads one"
            self.app.post_message(self.Finished(turn, None, error, None))
            return
        events = None
        try:
            events = self.backend.stream(
                request.messages, thinking=request.thinking, budget=request.budget, temperature=request.temperature
            )
            for event in events:
                if turn in self._cancelled:
                    break
                now = time.perf_counter()
                if isinstance(event, Reasoning):
                    first_reasoning_at = first_reasoning_at or now
                    reasoning.append(event.text)
                    chunks += 1
                elif isinstance(event, Answer):
                    if answer_at is None:
                        answer_at = now
                        answer.append(event.text)
                        post(now=True)  # the panel folds when the answer starts
                        continue
                    answer.append(event.text)
                elif isinstance(event, ToolCall):  # the app offers no tools; show one if a model calls anyway
                    answer.append(f"\n\n`tool call: {event.name}({event.arguments})`\n")
                elif isinstance(event, ToolCallError):
                    answer.append(event.raw)
                elif isinstance(event, Done):
                    stats = event.stats
                if now - last_post >= UPDATE_INTERVAL_S:
                    post()
        except QwenMLXError as failure:
            error = str(failure)
        except Exception as failure:  # a model that fails mid-stream: a notice, never a dead app
            error = f"generation failed: {type(failure).__name__}: {failure}"
        finally:
            if events is not None and hasattr(events, "close"):
                try:
                    events.close()
                except Exception as failure:
                    error = error or f"stopping failed: {type(failure).__name__}: {failure}"
        post(now=True)
        self._cancelled.discard(turn)
        self.app.post_message(self.Finished(turn, stats, error, thought()))
