"""The chat app: the conversation, the input, the status bar, and the commands and keys that drive them.

Design decisions:
- Every model call goes through `EngineThread` (one long-lived thread); handlers here only send it jobs and
  draw what it posts back, so the UI answers keys while a turn is generating.
- Esc stops a turn at once from the UI's side: the answer is finished with the text already shown and the
  engine's later updates for that turn are dropped; the engine stops at its next token.
- A named chat (after /save, or --resume) is saved after every turn; the store makes each save one
  transaction, so a crash leaves the previous version.
- Another app on the same store may have saved a newer version under this chat's name: the store then keeps
  both and saves this one under a new name, and the app says so in the conversation (from then on this chat
  is that name), so no save of either app disappears unseen.
- `/model` opens a picker (`picker.py`); a choice there and `/model NAME` take one path, `_choose`, which
  asks first when the fit estimate says the model will not fit. The main screen's widgets are found through
  `main_screen`, since the app's own queries see only the top screen and the engine's messages can arrive
  while a picker is open.
"""

from __future__ import annotations

import itertools
import shlex
import time
from dataclasses import dataclass, replace

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message as TextualMessage
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Static

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.memory import Estimate

from . import commands
from .backends import Backend, LocalBackend
from .conversation import Conversation, Message
from .engine_thread import EngineThread, TurnRequest
from .picker import (
    ENDPOINT_COLUMNS,
    LOCAL_COLUMNS,
    Choice,
    ConfirmLoad,
    ModelPicker,
    endpoint_choices,
    fit_warning,
    is_current,
    local_choices,
    local_fit,
    too_big,
)
from .store import Store
from .widgets import (
    AssistantMessage,
    ChatInput,
    Notice,
    Status,
    StatusBar,
    ThinkingPanel,
    UserMessage,
    Welcome,
    welcome_text,
)

KEYS = [
    ("Enter", "send"),
    ("Ctrl+J", "new line (Shift+Enter or Alt+Enter too, where the terminal sends them)"),
    ("Up / Down", "earlier messages (on the first / last line)"),
    ("Tab", "complete a /command or a saved chat's name"),
    ("Esc", "stop the answer, keeping what is written"),
    ("Ctrl+T", "end the thinking now; the model answers from what it has thought"),
    ("Ctrl+R", "regenerate the last answer"),
    ("Ctrl+O", "open or fold the last thinking panel (click any panel's title, or focus it and press Enter)"),
    ("Ctrl+Q", "quit"),
]


@dataclass
class Source:
    """Where answers come from: a local model or an OpenAI-compatible endpoint."""

    model: str | None = None
    quantize: int | None = None
    draft: str | None = None  # speculative decoding for a local model: "lookup" or a draft model
    num_draft_tokens: int | None = None
    endpoint: str | None = None
    api_key: str | None = None
    # `chat --distributed`: how the model is split ("pp over 2 ranks"). The endpoint is then the ranks' own,
    # gone with the app, so the model is what is shown and saved.
    distributed: str | None = None

    @property
    def label(self) -> str:
        if self.distributed and self.model:
            return self.model
        return self.endpoint or self.model or "demo"


class ChatApp(App):
    TITLE = "qwen-mlx chat"
    CSS_PATH = "chat.tcss"
    BINDINGS = [
        Binding("escape", "stop", "Stop", priority=True),
        Binding("ctrl+t", "end_thinking", "End thinking", priority=True),
        Binding("ctrl+r", "regenerate", "Regenerate", priority=True),
        Binding("ctrl+o", "toggle_thinking", "Thinking panel", priority=True),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    class ModelChecked(TextualMessage):
        """`/model NAME`'s fit estimate, made on a worker thread (None when unknown)."""

        def __init__(self, source: Source, fit: Estimate | None) -> None:
            super().__init__()
            self.source = source
            self.fit = fit

    def __init__(
        self,
        source: Source,
        *,
        conversation: Conversation | None = None,
        store: Store | None = None,
        panels_open: bool = True,
    ) -> None:
        super().__init__()
        self.source = source
        self.conversation = conversation or Conversation(model=source.label)
        self._store = store
        self._owns_store = store is None
        self.panels_open = panels_open
        self.status = Status(
            thinking=self.conversation.thinking,
            budget=self.conversation.budget,
            temperature=self.conversation.temperature,
        )
        self.engine = EngineThread(self)
        self.turn = 0  # id of the turn being generated; 0 when idle
        self._turn_ids = itertools.count(1)
        self._view: AssistantMessage | None = None
        self._shown: dict[str, str] = {}  # what the current turn has drawn so far: "reasoning", "answer"
        self._thought_s: float | None = None

    # -- building -----------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="log")
        yield Static("", id="hint")
        yield ChatInput(id="input")
        yield StatusBar(id="status")
        yield Footer()

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store()
        return self._store

    @property
    def main_screen(self) -> Screen:
        """The chat's own screen, under any picker or question on top."""
        return self.screen_stack[0]

    @property
    def log_view(self) -> VerticalScroll:
        return self.main_screen.query_one("#log", VerticalScroll)

    async def on_mount(self) -> None:
        self.log_view.anchor()
        self.engine.start()
        await self._show_conversation()
        self._load(self.source)
        self.query_one(ChatInput).focus()

    def on_unmount(self) -> None:
        if self.turn:
            self.engine.cancel(self.turn)
        self.engine.shutdown()
        self.engine.join(timeout=10)  # MLX must not be mid-step when the interpreter exits
        if self._store is not None and self._owns_store:
            self._store.close()

    def _load(self, source: Source) -> None:
        self.status.state = f"loading {source.label}…"
        self._refresh_status()
        if source.endpoint:
            from .endpoint import EndpointBackend

            self.engine.load(
                source.label, lambda progress: EndpointBackend.connect(source.endpoint, source.api_key, source.model)
            )
        else:
            model = source.model or "demo"
            self.engine.load(
                source.label,
                lambda progress: LocalBackend.load(
                    model,
                    quantize=source.quantize,
                    draft=source.draft,
                    num_draft_tokens=source.num_draft_tokens,
                    progress=progress,
                ),
            )

    async def _show_conversation(self) -> None:
        """Draw the whole conversation afresh (start, /load, /clear): past thinking starts folded."""
        await self.log_view.remove_children()
        widgets = [
            UserMessage(m.content) if m.role == "user" else AssistantMessage(m, panels_open=self.panels_open)
            for m in self.conversation.messages
        ]
        if widgets:
            await self.log_view.mount_all(widgets)
        else:
            await self.log_view.mount(Welcome(welcome_text(self.source.label, self._demo_prompts())))
        self.log_view.scroll_end(animate=False)

    def _answered_nothing(self, stats) -> bool:
        last = self.conversation.messages[-1] if self.conversation.messages else None
        if stats is None or last is None or last.role != "assistant" or stats.finish_reason == "tool_calls":
            return False
        return not last.content.strip()

    def _demo_prompts(self) -> list[str]:
        """The first questions of a demo model's scripts (what it can answer), when one is served."""
        model = self.source.model or "demo"
        if self.source.endpoint or model not in ("demo", "demo-coder"):
            return []
        from qwen_mlx.demo import CODER_SCRIPTS, SCRIPTS

        scripts = SCRIPTS if model == "demo" else CODER_SCRIPTS
        prompts = [s["messages"][0]["content"] for s in scripts if not s.get("tools") and "enable_thinking" not in s]
        return list(dict.fromkeys(prompts))

    async def say(self, text: str, error: bool = False) -> None:
        await self.log_view.mount(Notice(text, error))

    def _count_context(self) -> None:
        """The status bar's context use for a conversation that was loaded rather than generated."""
        backend = self.engine.backend
        try:
            used = backend.prompt_tokens(self.conversation.prompt_messages()) if backend else None
        except Exception:  # a template that refuses this history: leave the count alone
            used = None
        if used is not None:  # an endpoint's tokenizer is not ours: its count comes with the next turn
            self.status.context_used = used

    def _refresh_status(self) -> None:
        c = self.conversation
        self.status.thinking, self.status.budget, self.status.temperature = c.thinking, c.budget, c.temperature
        self.main_screen.query_one(StatusBar).show(self.status)

    # -- the engine's messages ----------------------------------------------------------------------------

    @on(EngineThread.Loaded)
    async def _loaded(self, message: EngineThread.Loaded) -> None:
        backend: Backend = message.backend
        shown = f"{self.source.model} · {self.source.distributed}" if self.source.distributed else backend.label
        self.status = replace(self.status, model=shown, context_limit=backend.context_limit, state="")
        self.status.memory = self._memory(backend)
        self.conversation.model = self.source.label  # a model name or an endpoint URL: what --resume reopens
        for notice in backend.notices:
            await self.say(notice, error=True)
        self._count_context()
        self._refresh_status()

    @on(EngineThread.Progress)
    def _progress(self, message: EngineThread.Progress) -> None:
        if self.status.state.startswith("loading"):
            self.status.state = f"loading {self.source.label}: {' '.join(message.text.split())[:60]}"
            self._refresh_status()

    @on(EngineThread.LoadFailed)
    async def _load_failed(self, message: EngineThread.LoadFailed) -> None:
        self.status.state = ""
        if self.engine.backend is None:
            self.status.model = "no model"
        self._refresh_status()
        await self.say(f"could not load {message.what}: {message.error}", error=True)

    @on(EngineThread.Update)
    async def _update(self, message: EngineThread.Update) -> None:
        try:
            await self._draw(message)
        finally:
            self.engine.drawn()

    async def _draw(self, message: EngineThread.Update) -> None:
        view = self._view
        if message.turn != self.turn or view is None:
            return  # a stopped turn's last words
        if message.reasoning:
            self.status.state = "thinking…"
            self._shown["reasoning"] += message.reasoning
            await view.add_reasoning(message.reasoning)
        if message.answer:
            if message.thought_s is not None:
                self._thought_s = message.thought_s
            self.status.state = "answering…"
            view.fold(message.thought_s, message.reasoning_chunks)
            self._shown["answer"] += message.answer
            await view.add_answer(message.answer)
        self._refresh_status()

    @on(EngineThread.Finished)
    async def _finished(self, message: EngineThread.Finished) -> None:
        if message.turn != self.turn:
            return
        stats = message.stats
        reasoning_tokens = stats.reasoning_tokens if stats else None
        await self._end_turn(stopped=False, thought_s=message.thought_s, reasoning_tokens=reasoning_tokens)
        if stats is not None:
            self.status.context_used = stats.prompt_tokens + stats.completion_tokens
            self.status.ttft_s = stats.ttft_s
            self.status.tokens_per_s = stats.generation_tps
        self.status.memory = self._memory(self.engine.backend)
        self._refresh_status()
        for note in getattr(stats, "notes", None) or ():  # asked-for behaviour this model lacks (2507 models)
            await self.say(note)
        if message.error:
            await self.say(message.error, error=True)
        elif self._answered_nothing(stats):
            hint = "; the demo model knows only the conversations listed at the top" if self._demo_prompts() else ""
            await self.say(f"The model gave no answer ({stats.finish_reason}){hint}.")
        await self._autosave()

    async def _end_turn(self, *, stopped: bool, thought_s: float | None, reasoning_tokens: int | None) -> None:
        """Record the answer as drawn, then finish its widget."""
        view, shown = self._view, self._shown
        self.turn = 0
        self._view = None
        self.status.state = ""
        if view is None:
            return
        thought = thought_s if thought_s is not None else self._thought_s
        thought = round(thought, 2) if thought is not None else None  # the title shows what is saved
        if reasoning_tokens is None:  # stopped: count what was shown
            reasoning_tokens = len(self._shown_tokens(shown["reasoning"])) if shown["reasoning"] else 0
        self.conversation.messages.append(
            Message(
                "assistant",
                shown["answer"].strip(),
                reasoning=shown["reasoning"].strip(),
                reasoning_tokens=reasoning_tokens or 0,
                thought_s=thought if thought is not None else 0.0,
                stopped=stopped,
            )
        )
        await view.finish(thought, reasoning_tokens, stopped)

    def _shown_tokens(self, text: str) -> list[int]:
        backend = self.engine.backend
        if isinstance(backend, LocalBackend):
            return backend.session.tokenizer.encode(text)
        return text.split()  # an endpoint's tokenizer is not ours: words are the honest estimate

    @staticmethod
    def _memory(backend: Backend | None) -> int | None:
        try:
            return backend.memory() if backend is not None else None
        except Exception:
            return None

    # -- sending ------------------------------------------------------------------------------------------

    @on(ChatInput.Submitted)
    async def _submitted(self, message: ChatInput.Submitted) -> None:
        chat_input = self.query_one(ChatInput)
        text = message.text.strip()
        chat_input.remember(text)
        if text.startswith("/"):
            chat_input.clear()
            await self._command(text)
            return
        if self.turn:
            self.notify("Still answering: Esc stops it.", severity="warning")
            return
        chat_input.clear()
        self.conversation.messages.append(Message("user", text))
        await self.log_view.mount(UserMessage(text))
        await self._start_turn()

    async def _start_turn(self) -> None:
        if self.engine.backend is None and not self.status.state.startswith("loading"):
            await self.say("no model is loaded: /model NAME loads one", error=True)
            return
        self.turn = next(self._turn_ids)  # before any await: Esc may come while the view mounts
        self._view = AssistantMessage(panels_open=self.panels_open)
        self._shown = {"reasoning": "", "answer": ""}
        self._thought_s = None
        self.log_view.anchor()  # sending a message follows the stream again
        await self.log_view.mount(self._view)
        self.status.state = "waiting…"
        self._refresh_status()
        c = self.conversation
        self.engine.generate(
            TurnRequest(self.turn, c.prompt_messages(), c.thinking, c.budget if c.thinking else None, c.temperature)
        )

    # -- keys ---------------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action in ("stop", "end_thinking"):
            return bool(self.turn)  # Esc means "stop" only while answering; elsewhere widgets keep it
        if action in ("regenerate", "toggle_thinking"):
            return not isinstance(self.screen, ModalScreen)  # the chat is under a picker: its keys wait
        return True

    async def action_stop(self) -> None:
        if not self.turn:
            return
        self.engine.cancel(self.turn)
        await self._end_turn(stopped=True, thought_s=None, reasoning_tokens=None)
        self._count_context()  # no stats for a stopped turn: count what the conversation now holds
        self._refresh_status()
        await self._autosave()

    def action_end_thinking(self) -> None:
        if self._view is not None and self._view.folded:
            self.notify("The answer has already started.")
        elif not self.engine.end_thinking():
            self.notify("This backend cannot end thinking live: /budget N limits it for the next turns.")

    async def action_regenerate(self) -> None:
        if self.turn:
            self.notify("Still answering: Esc stops it first.", severity="warning")
            return
        messages = self.conversation.messages
        if not messages or messages[-1].role != "assistant":
            self.notify("There is no answer to regenerate yet.")
            return
        messages.pop()
        answers = self.log_view.query(AssistantMessage)
        if answers:
            await answers.last().remove()
        await self._start_turn()

    def action_toggle_thinking(self) -> None:
        panels = self.log_view.query(ThinkingPanel)
        if panels:
            panel = panels.last()
            panel.collapsed = not panel.collapsed
            if not panel.collapsed:
                panel.scroll_visible()

    # -- commands -----------------------------------------------------------------------------------------

    @on(ChatInput.Completing)
    def _complete(self) -> None:
        chat_input = self.query_one(ChatInput)
        names = self.store.names() if chat_input.text.startswith("/load ") else None
        options = commands.complete(chat_input.text, names)
        hint = self.query_one("#hint", Static)
        if not options:
            hint.update("no completion")
            return
        common = options[0]
        for option in options[1:]:
            while not option.startswith(common):
                common = common[:-1]
        if len(options) == 1:
            common += " "
        chat_input.load_text(common)
        chat_input.move_cursor(chat_input.document.end)
        hint.update("   ".join(options) if len(options) > 1 else "")

    @on(ChatInput.Changed)
    def _hint(self, event: ChatInput.Changed) -> None:
        text = event.text_area.text
        if not self.query("#hint"):
            return  # closing
        hint = self.query_one("#hint", Static)
        if text.startswith("/") and " " not in text and "\n" not in text:
            options = commands.complete(text)
            hint.update(
                "   ".join(f"{commands.COMMANDS[o].usage} — {commands.COMMANDS[o].help}" for o in options[:4])
                if options
                else "unknown command: /help lists them"
            )
        else:
            hint.update("")

    async def _command(self, line: str) -> None:
        try:
            command = commands.parse(line)
            await self._run(command)
        except QwenMLXError as error:
            await self.say(str(error), error=True)
        self._refresh_status()

    async def _run(self, command: commands.Command) -> None:
        c, name, value = self.conversation, command.name, command.value
        if name == "/help":
            from textual.widgets import Markdown

            await self.log_view.mount(Markdown(commands.help_markdown(KEYS), classes="help"))
        elif name in ("/think", "/no_think"):
            c.thinking = name == "/think"
            self.notify("Thinking on for the next turns." if c.thinking else "Thinking off for the next turns.")
        elif name == "/budget":
            c.budget = value
            self.notify(f"Thinking budget: {value} tokens." if value is not None else "No thinking budget.")
        elif name == "/temp":
            c.temperature = value
            self.notify(f"Temperature {value:g}." if value is not None else "The model's own temperature.")
        elif name == "/system":
            c.system = value or ""
            await self.say(f"system prompt: {c.system}" if c.system else "system prompt cleared")
        elif name == "/clear":
            self._refuse_while_answering()
            self.conversation = Conversation(
                model=c.model, system=c.system, thinking=c.thinking, budget=c.budget, temperature=c.temperature
            )
            self.status.context_used = 0
            await self._show_conversation()
        elif name == "/save":
            saved = self.store.save(c, value or c.name or time.strftime("chat-%Y%m%d-%H%M%S"))
            if saved.note:
                await self.say(saved.note)
            exported = self.store.export_markdown(c)
            resume = shlex.quote(c.name)  # a name with a space, like "shared (2)", is one shell word
            await self.say(f"saved as {c.name!r} (qwen-mlx chat --resume {resume}); Markdown: {exported}")
        elif name == "/load":
            self._refuse_while_answering()
            self.conversation = self.store.load(value)
            self._count_context()
            await self._show_conversation()
            await self.say(f"loaded {value!r}: {len(self.conversation.messages)} messages")
        elif name == "/model":
            self._refuse_while_answering()
            if value is None:
                self._open_picker()
            else:
                self._check_fit(Source(model=value))

    # -- choosing a model ---------------------------------------------------------------------------------

    def _open_picker(self) -> None:
        source = self.source
        if source.distributed:
            raise QwenMLXError(
                f"{source.model} is split over the ranks ({source.distributed}): to change it, quit and start "
                "qwen-mlx chat --distributed with another --model"
            )
        backend = self.engine.backend
        described = self._describe_model() if backend is not None else "none loaded yet"
        if source.endpoint:
            url, key = source.endpoint, source.api_key
            held = getattr(backend, "model", None)  # the endpoint's model id

            def current(choice: Choice) -> bool:
                return choice.name == held

            picker = ModelPicker(
                f"Models at {url} · now: {described}", ENDPOINT_COLUMNS, lambda: endpoint_choices(url, key), current
            )
        else:
            held = backend.label if isinstance(backend, LocalBackend) else None  # what it was loaded as

            def current(choice: Choice) -> bool:
                return held is not None and is_current(choice, held)

            picker = ModelPicker(f"Local models · now: {described}", LOCAL_COLUMNS, local_choices, current)

        def chosen(choice: Choice | None) -> None:
            if choice is None:
                return
            if current(choice):
                self.notify(f"{choice.name} is the model already loaded.")
                return
            if source.endpoint:
                self._choose(Source(endpoint=source.endpoint, api_key=source.api_key, model=choice.name), None)
            else:
                self._choose(Source(model=choice.name), choice.fit)

        self.push_screen(picker, chosen)

    @work(thread=True, exclusive=True, group="model-fit")
    def _check_fit(self, source: Source) -> None:
        """`/model NAME`: estimate the fit off the UI thread (headers, the Hub cache), then `_choose`."""
        try:
            fit = local_fit(source.model)
        except Exception:  # unknown fit: the load itself says what is wrong
            fit = None
        self.post_message(self.ModelChecked(source, fit))

    @on(ModelChecked)
    def _model_checked(self, message: ModelChecked) -> None:
        self._choose(message.source, message.fit)

    def _choose(self, source: Source, fit: Estimate | None) -> None:
        """Load `source`, first asking when its fit estimate says it will not fit."""
        if not too_big(fit):
            self._switch(source)
            return

        def answered(load: bool | None) -> None:
            if load:
                self._switch(source)
            else:
                self.notify(f"Kept {self.source.label}; {source.label} was not loaded.")

        self.push_screen(ConfirmLoad(fit_warning(source.label, fit)), answered)

    def _switch(self, source: Source) -> None:
        if self.turn:  # a message sent while the choice was being made
            self.notify(f"Still answering: {source.label} was not loaded. Esc stops the answer.", severity="warning")
            return
        self.source = source
        self._load(source)

    def _refuse_while_answering(self) -> None:
        if self.turn:
            raise QwenMLXError("still answering: Esc stops it first")

    def _describe_model(self) -> str:
        backend = self.engine.backend
        if backend is None:
            return "no model is loaded: /model NAME loads a local one"
        limit = f"{backend.context_limit:,} tokens of context" if backend.context_limit else "context unknown"
        return f"{backend.label} ({limit})"

    async def _autosave(self) -> None:
        if self.conversation.name is None:
            return
        try:
            saved = self.store.save(self.conversation)
        except QwenMLXError as error:
            await self.say(f"could not save: {error}", error=True)
            return
        if saved.note:
            await self.say(f"{saved.note} (qwen-mlx chat --resume {shlex.quote(saved.name)})")
