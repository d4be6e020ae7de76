"""The chat app's widgets: messages, the thinking panel, the input editor and the status bar.

Answers and reasoning stream through `Markdown.get_stream`: a fragment is appended and only the document's
last block is re-parsed, and fragments that arrive while one is being drawn are joined into one append, so
a long answer never re-renders from the top per token.

One block can still be long: a 1,500-line code fence is re-highlighted whole on every append by Textual's
`MarkdownFence` (141 ms per append at 1,500 lines on a CI core, growing with the block). `StreamingFence`
highlights only the lines added since the last append and reuses the rest; a construct that spans the seam
(a triple-quoted string) may be coloured wrongly while streaming, so the finished answer is drawn once more
in full. Measured by bench/bench_chat_ui.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.message import Message
from textual.widgets import Collapsible, Markdown, Static, TextArea
from textual.widgets._markdown import MarkdownFence  # not exported; StreamingFence subclasses it

from .conversation import Message as ChatMessage

GIB = 1 << 30
THINKING_TITLE = "Thinking…"
NEWLINE_KEYS = ("shift+enter", "alt+enter")  # Ctrl+J is a binding, so the footer shows it


def thought_title(seconds: float | None, tokens: int, stopped: bool = False) -> str:
    """The folded panel's title, e.g. "Thought for 4.2 s · 312 tokens"."""
    took = f"Thought for {seconds:.1f} s" if seconds is not None else "Thought"
    title = f"{took} · {tokens} token{'s' if tokens != 1 else ''}"
    return title + " (stopped)" if stopped else title


class StreamingFence(MarkdownFence):
    """A code fence that, while its text only grows, highlights just the lines added since the last time."""

    _last: tuple[tuple, str, Content] | None = None  # (settings, complete lines highlighted, their Content)

    @classmethod
    def highlight(cls, code: str, language: str, ansi: bool = False, dark: bool = False) -> Content:
        settings = (language, ansi, dark)
        done = code[: code.rfind("\n") + 1]  # complete lines; the last, unfinished line is highlighted apart
        head: Content | None = None
        if cls._last is not None and cls._last[0] == settings and done.startswith(cls._last[1]) and cls._last[1]:
            _, known, head = cls._last
            added = done[len(known) :]
            if added:
                head = head + "\n" + super().highlight(added, language, ansi, dark)  # drops its last newline
        elif done:
            head = super().highlight(done, language, ansi, dark)
        if done:
            StreamingFence._last = (settings, done, head)
        tail = code[len(done) :]
        if head is None:
            return super().highlight(tail, language, ansi, dark)
        return head + "\n" + super().highlight(tail, language, ansi, dark) if tail else head


class StreamingMarkdown(Markdown):
    """Markdown whose code fences highlight incrementally while they stream (see the module docstring)."""

    BLOCKS = {**Markdown.BLOCKS, "fence": StreamingFence, "code_block": StreamingFence}


class UserMessage(Static):
    DEFAULT_CSS = """
    UserMessage {
        margin: 1 0 0 8;
        padding: 0 1;
        background: $primary-background;
        border-left: wide $primary;
    }
    """

    def __init__(self, text: str) -> None:
        super().__init__(text, markup=False)


class Notice(Static):
    """A line from the app in the conversation: an error, or what a command did."""

    DEFAULT_CSS = """
    Notice { margin: 1 0 0 0; padding: 0 1; color: $text-muted; }
    Notice.error { color: $text-error; background: $error-muted; }
    """

    def __init__(self, text: str, error: bool = False) -> None:
        super().__init__(text, markup=False, classes="error" if error else "")


class Welcome(Static):
    """What an empty chat shows first: the model, what to type, the keys (and, on the demo, its prompts)."""

    DEFAULT_CSS = """
    Welcome { margin: 1 0 0 0; padding: 0 1; color: $text-muted; }
    """

    def __init__(self, text: str) -> None:
        super().__init__(text, markup=False)


def welcome_text(model: str, demo_prompts: list[str]) -> str:
    lines = [
        f"Chatting with {model}. Type a message and press Enter; /help lists the commands.",
        "Esc stops an answer, Ctrl+T ends the thinking, Ctrl+O folds it, Ctrl+Q quits.",
    ]
    if demo_prompts:
        lines.append("The demo model knows a few conversations only; try: " + " · ".join(demo_prompts))
    return "\n".join(lines)


class ThinkingPanel(Collapsible):
    """The reasoning of one answer: "Thinking…" while it streams, then folded and titled with its cost."""

    DEFAULT_CSS = """
    ThinkingPanel { margin: 0; padding: 0; border: none; background: transparent; }
    ThinkingPanel Contents { padding: 0 0 0 2; }
    ThinkingPanel Markdown { color: $text-muted; margin: 0; padding: 0; }
    ThinkingPanel CollapsibleTitle { color: $text-muted; }
    """

    def __init__(self, reasoning: str = "", *, title: str = THINKING_TITLE, collapsed: bool = False) -> None:
        self.text = Markdown(reasoning)
        super().__init__(self.text, title=title, collapsed=collapsed)

    def _watch_collapsed(self, collapsed: bool) -> None:
        # Collapsible scrolls itself into view on every change; folding by itself as the answer starts must not
        # pull the view down from where the user scrolled, so only opening a panel scrolls to it.
        self._update_collapsed(collapsed)
        self.post_message(self.Collapsed(self) if collapsed else self.Expanded(self))
        if self.is_mounted and not collapsed:
            self.call_after_refresh(self.scroll_visible)


class AssistantMessage(Vertical):
    """One answer: an optional thinking panel above the answer's Markdown, either streaming or finished."""

    DEFAULT_CSS = """
    AssistantMessage { height: auto; margin: 1 0 0 0; }
    AssistantMessage > Markdown { margin: 0; padding: 0 1; }
    AssistantMessage.stopped > Markdown { border-left: wide $warning; }
    """

    def __init__(self, message: ChatMessage | None = None, *, panels_open: bool = True) -> None:
        """A finished `message` (from a saved chat: its panel starts folded), or an empty one to stream into."""
        super().__init__()
        self.panels_open = panels_open
        self.panel: ThinkingPanel | None = None
        self.answer = StreamingMarkdown(message.content if message else "")
        self._answer_stream = None
        self._reasoning_stream = None
        self.folded = message is not None
        if message and message.reasoning:
            title = thought_title(message.thought_s, message.reasoning_tokens, message.stopped)
            self.panel = ThinkingPanel(message.reasoning, title=title, collapsed=True)
        if message and message.stopped:
            self.add_class("stopped")

    def compose(self):
        if self.panel is not None:
            yield self.panel
        yield self.answer

    async def add_reasoning(self, text: str) -> None:
        if self.panel is None:
            self.panel = ThinkingPanel(collapsed=not self.panels_open)
            await self.mount(self.panel, before=self.answer)
        if self._reasoning_stream is None:
            self._reasoning_stream = Markdown.get_stream(self.panel.text)
        await self._reasoning_stream.write(text)

    async def add_answer(self, text: str) -> None:
        if self._answer_stream is None:
            self._answer_stream = Markdown.get_stream(self.answer)
        await self._answer_stream.write(text)

    def fold(self, seconds: float | None, tokens: int) -> None:
        """The answer has started: fold the reasoning and say what it cost."""
        if self.panel is not None and not self.folded:
            self.panel.collapsed = True
            self.panel.title = thought_title(seconds, tokens)
        self.folded = True

    async def finish(self, seconds: float | None, tokens: int | None, stopped: bool) -> None:
        """Drain the streams, then give the panel its exact token count."""
        for stream in (self._reasoning_stream, self._answer_stream):
            if stream is not None:
                await stream.stop()
        if self._answer_stream is not None and "```" in self.answer.source:
            await self.answer.update(self.answer.source)  # exact colours for what was highlighted in pieces
        self._reasoning_stream = self._answer_stream = None
        if self.panel is not None:
            self.panel.collapsed = True
            self.panel.title = thought_title(seconds, tokens or 0, stopped)
        self.folded = True
        if stopped:
            self.add_class("stopped")


class ChatInput(TextArea):
    """The message editor: Enter sends, Ctrl+J (or Shift/Alt+Enter where the terminal tells them apart)
    inserts a newline, Up and Down on the first and last line recall earlier messages."""

    DEFAULT_CSS = """
    ChatInput { height: auto; max-height: 10; min-height: 3; border: tall $primary 50%; }
    ChatInput:focus { border: tall $primary; }
    """

    BINDINGS = [Binding("ctrl+j", "newline", "New line")]

    @dataclass
    class Submitted(Message):
        text: str

    class Completing(Message):
        """Tab on a slash command: the app completes it (it knows the saved chats' names)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)
        self.sent: list[str] = []
        self._recall: int | None = None  # index into history while recalling
        self._draft = ""

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            self._stop(event)
            if self.text.strip():
                self.post_message(self.Submitted(self.text))
            return
        if event.key in NEWLINE_KEYS:
            self._stop(event)
            self.insert("\n")
            return
        if event.key == "tab" and self.text.startswith("/"):
            self._stop(event)
            self.post_message(self.Completing())
            return
        if event.key == "up" and self.cursor_location[0] == 0 and self.sent:
            self._stop(event)
            self.recall(-1)
            return
        if event.key == "down" and self.cursor_location[0] == self.document.line_count - 1 and self._recall is not None:
            self._stop(event)
            self.recall(+1)
            return
        await super()._on_key(event)

    def action_newline(self) -> None:
        self.insert("\n")

    @staticmethod
    def _stop(event: events.Key) -> None:
        event.stop()
        event.prevent_default()

    def remember(self, text: str) -> None:
        if not self.sent or self.sent[-1] != text:
            self.sent.append(text)
        self._recall = None

    def recall(self, step: int) -> None:
        """Step through earlier messages; past the newest one the unsent draft comes back."""
        if self._recall is None:
            if step > 0:
                return
            self._draft = self.text
            index = len(self.sent) - 1
        else:
            index = self._recall + step
        if index < 0:
            return
        if index >= len(self.sent):
            self._recall = None
            self.load_text(self._draft)
        else:
            self._recall = index
            self.load_text(self.sent[index])
        self.move_cursor(self.document.end)


@dataclass
class Status:
    """What the status bar shows; `format_status` turns it into the line."""

    model: str = "no model"
    thinking: bool = True
    budget: int | None = None
    temperature: float | None = None
    context_used: int = 0
    context_limit: int | None = None
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    memory: int | None = None
    state: str = ""  # "loading…", "thinking…", "answering…"


def format_status(s: Status) -> str:
    mode = "think" if s.thinking else "no_think"
    if s.thinking and s.budget is not None:
        mode += f" ≤{s.budget}"
    parts = [s.model, mode]
    if s.temperature is not None:
        parts.append(f"temp {s.temperature:g}")
    limit = f"{s.context_limit:,}" if s.context_limit else "?"
    parts.append(f"ctx {s.context_used:,}/{limit}")
    if s.ttft_s is not None:
        parts.append(f"TTFT {s.ttft_s:.2f} s")
    if s.tokens_per_s is not None:
        parts.append(f"{s.tokens_per_s:.1f} tok/s")
    if s.memory is not None:
        parts.append(f"mem {s.memory / GIB:.2f} GiB")
    if s.state:
        parts.append(s.state)
    return " · ".join(parts)


class StatusBar(Static):
    DEFAULT_CSS = """
    StatusBar { height: 1; padding: 0 1; background: $panel; color: $text-muted; }
    """

    def show(self, status: Status) -> None:
        self.update(format_status(status))
