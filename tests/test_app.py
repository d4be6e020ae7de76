"""The chat app end to end: Textual's Pilot driving the real app on the demo model (real tokenizer, template,
engine thread), and on a real `qwen-mlx serve` for the endpoint backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from textual.pilot import Pilot

from qwen_mlx.app.app import ChatApp, Source
from qwen_mlx.app.conversation import Conversation
from qwen_mlx.app.store import Store
from qwen_mlx.app.widgets import AssistantMessage, ChatInput, Notice, StatusBar, ThinkingPanel, Welcome
from qwen_mlx.chat import ChatSession
from qwen_mlx.format import THINKING_BUDGET_TEXT

SIZE = (100, 40)


async def wait_until(condition: Callable[[], bool], timeout: float = 60, what: str = "") -> None:
    """Let the app run until `condition()` holds; fail after `timeout` seconds."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.02)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "chats.sqlite3")


@pytest.fixture
def make_app(demo_model_path: Path, store: Store) -> Callable[..., ChatApp]:
    def make(source: Source | None = None, **options) -> ChatApp:
        return ChatApp(source or Source(model=str(demo_model_path)), store=store, **options)

    return make


async def ready(app: ChatApp) -> None:
    await wait_until(lambda: app.engine.backend is not None or app.query(Notice), what="the model to load")
    assert app.engine.backend is not None, [str(n.render()) for n in app.query(Notice)]


async def send(pilot: Pilot, text: str) -> None:
    """Type `text` and press Enter; returns once the app is idle again (after a whole answer)."""
    pilot.app.query_one(ChatInput).load_text(text)
    await pilot.press("enter")


def press_soon(pilot: Pilot, *keys: str) -> asyncio.Task:
    """Press keys without waiting for the app to go idle: it never is while an answer streams."""
    return asyncio.create_task(pilot.press(*keys))


def start(pilot: Pilot, text: str) -> asyncio.Task:
    """Type `text` and press Enter, returning while the answer streams."""
    pilot.app.query_one(ChatInput).load_text(text)
    return press_soon(pilot, "enter")


async def ask(pilot: Pilot, text: str) -> None:
    """Send a message and wait for the whole answer."""
    app: ChatApp = pilot.app
    before = len(app.conversation.messages)
    await send(pilot, text)
    await wait_until(lambda: len(app.conversation.messages) == before + 2, what=f"the answer to {text!r}")
    await pilot.pause()


def status_line(app: ChatApp) -> str:
    return str(app.query_one(StatusBar).render())


def errors(app: ChatApp) -> list[str]:
    return [str(n.render()) for n in app.query(Notice) if n.has_class("error")]


@pytest.fixture(scope="module")
def engine_answer(demo_model_path: Path) -> Callable[[str], tuple[str, str]]:
    """(reasoning, answer) from the engine itself for one user message: what the app must show."""
    session = ChatSession.load(str(demo_model_path))

    def answer(text: str) -> tuple[str, str]:
        reply = session.complete([{"role": "user", "content": text}])
        session.reset()
        return reply.reasoning.strip(), reply.answer.strip()

    return answer


async def test_an_empty_chat_says_what_to_type_and_which_keys_matter(demo_model_path, store, monkeypatch):
    monkeypatch.setenv("QWEN_MLX_CACHE", str(demo_model_path.parent))  # so `demo` names the built model
    app = ChatApp(Source(model="demo"), store=store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app)
        text = str(app.query_one(Welcome).render())
        assert "demo" in text and "/help" in text and "Ctrl+Q quits" in text
        assert "What is 2 + 3?" in text and "What's the weather" not in text  # the demo's prompts, no tool ones
        await ask(pilot, "What is 2 + 3?")
        await send(pilot, "/clear")
        await pilot.pause()
        assert len(app.query(Welcome)) == 1 and not app.query(AssistantMessage)


async def test_thinking_folds_when_the_answer_starts(make_app, engine_answer):
    app = make_app()
    seen: dict[str, object] = {}
    async with app.run_test(size=SIZE) as pilot:
        await ready(app)
        sending = start(pilot, "What is 2 + 3?")
        view = await _current_view(app)
        # The first moment the answer has text: the panel must already be folded and priced.
        await wait_until(lambda: view.answer.source or app.turn == 0, what="the answer to start")
        seen["collapsed"], seen["title"] = view.panel.collapsed, str(view.panel.title)
        await sending
        # Enter's press can return while the answer still streams: the stats are read once it is saved.
        await wait_until(lambda: app.conversation.messages[-1].role == "assistant", what="the answer to end")
        await pilot.pause()
        panel = app.query_one(ThinkingPanel)
        message = app.conversation.messages[-1]
        assert seen["collapsed"] is True
        assert str(seen["title"]).startswith("Thought for ") and "token" in str(seen["title"])
        assert panel.collapsed
        assert panel.title == f"Thought for {message.thought_s:.1f} s · {message.reasoning_tokens} tokens"
        assert message.reasoning_tokens > 0
        assert (message.reasoning, message.content) == engine_answer("What is 2 + 3?")
        assert view.answer.source.strip() == message.content
        assert panel.text.source.strip() == message.reasoning
        assert "think" in status_line(app) and "tok/s" in status_line(app) and "TTFT" in status_line(app)
        # Any panel opens again from the keyboard, and folds again.
        await pilot.press("ctrl+o")
        assert not panel.collapsed
        await pilot.press("ctrl+o")
        assert panel.collapsed
        # ... and with the mouse, on its title.
        await pilot.click(panel.query_one("CollapsibleTitle"))
        assert not panel.collapsed


async def _current_view(app: ChatApp) -> AssistantMessage:
    """The answer being streamed, once the message sent with `start` has reached the app."""
    await wait_until(lambda: app.conversation.messages[-1:] and app.conversation.messages[-1].role == "user")
    await wait_until(lambda: app._view is not None or app.conversation.messages[-1].role == "assistant")
    return app._view or app.query(AssistantMessage).last()


async def start_thinking(pilot: Pilot, text: str) -> tuple[asyncio.Task, AssistantMessage]:
    """Send `text` and return once its thinking panel shows some text, while the turn goes on."""
    sending = start(pilot, text)
    view = await _current_view(pilot.app)
    await wait_until(lambda: view.panel is not None and view.panel.text.source, what="some thinking")
    return sending, view


async def test_no_think_has_no_panel(make_app, engine_answer):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(app)
        await send(pilot, "/no_think")
        await pilot.pause()
        assert "no_think" in status_line(app)
        await ask(pilot, "What is the capital of France?")
        assert not app.query(ThinkingPanel)
        assert app.conversation.messages[-1].content == "The capital of France is **Paris**."
        assert app.conversation.messages[-1].reasoning == ""
        await send(pilot, "/think")
        await pilot.pause()
        assert "no_think" not in status_line(app)


async def test_escape_stops_and_keeps_the_partial_text(make_app, engine_answer):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(app)
        sending, view = await start_thinking(pilot, "Is 91 a prime number?")
        await press_soon(pilot, "escape")
        await sending
        assert app.turn == 0  # stopped at once, from the UI's side
        message = app.conversation.messages[-1]
        full_reasoning, full_answer = engine_answer("Is 91 a prime number?")
        assert message.stopped and message.role == "assistant"
        assert message.reasoning and full_reasoning.startswith(message.reasoning)
        assert full_answer.startswith(message.content)
        assert len(message.reasoning) + len(message.content) < len(full_reasoning) + len(full_answer)
        assert "(stopped)" in str(app.query_one(ThinkingPanel).title)
        assert app.status.context_used > 10  # the question and the partial reply, not "ctx 0"
        shown = view.panel.text.source
        await pilot.pause(0.5)  # the engine's later words for the stopped turn are dropped
        assert view.panel.text.source == shown
        # The engine is ready for the next turn (the demo only knows its scripts, so in a fresh chat).
        await send(pilot, "/clear")
        await ask(pilot, "What is 2 + 3?")
        assert app.conversation.messages[-1].content == engine_answer("What is 2 + 3?")[1]


async def test_end_thinking_now_forces_the_answer(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(app)
        sending, _ = await start_thinking(pilot, "Is 91 a prime number?")
        await press_soon(pilot, "ctrl+t")
        await sending
        await wait_until(lambda: app.turn == 0, what="the turn to end")
        message = app.conversation.messages[-1]
        assert message.reasoning.endswith(THINKING_BUDGET_TEXT.split("</think>")[0].strip())
        assert message.content and not message.stopped


async def test_regenerate_replaces_the_last_answer(make_app, engine_answer):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(app)
        await ask(pilot, "What is 2 + 3?")
        first = app.conversation.messages[-1]
        await pilot.press("ctrl+r")
        await wait_until(lambda: app.conversation.messages[-1] is not first and app.turn == 0, what="a new answer")
        await pilot.pause()
        assert [m.role for m in app.conversation.messages] == ["user", "assistant"]
        assert len(app.query(AssistantMessage)) == 1
        assert app.conversation.messages[-1].content == engine_answer("What is 2 + 3?")[1]


async def test_save_then_load_restores_the_conversation(make_app, store, demo_model_path):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(app)
        await send(pilot, "/system Be brief.")
        await ask(pilot, "What is 2 + 3?")
        before = list(app.conversation.messages)
        await send(pilot, "/save sums")
        await pilot.pause()
        await send(pilot, "/clear")
        await pilot.pause()
        assert app.conversation.messages == [] and not app.query(AssistantMessage)
        app.query_one(ChatInput).load_text("/lo")
        await pilot.press("tab")  # completes the command
        assert app.query_one(ChatInput).text == "/load "
        await pilot.press("s", "tab")  # and the saved chat's name
        assert app.query_one(ChatInput).text == "/load sums "
        await pilot.press("enter")
        await wait_until(lambda: app.conversation.messages, what="the chat to load")
        await pilot.pause()
        assert app.conversation.messages == before
        assert app.conversation.system == "Be brief."
        panel = app.query_one(ThinkingPanel)
        assert panel.collapsed and panel.title.startswith("Thought for")
        # Reasoning stays out of the next prompt.
        assert all("reasoning" not in m for m in app.conversation.prompt_messages())
        assert before[-1].reasoning not in str(app.conversation.prompt_messages())
        assert "loaded 'sums': 2 messages" in str(app.query(Notice).last().render())
    assert (store.path.parent / "exports" / "sums.md").exists()
    # --resume: a new app opens the saved chat, and goes on with it.
    resumed = make_app(conversation=store.load("sums"))
    async with resumed.run_test(size=SIZE) as pilot:
        await ready(resumed)
        assert len(resumed.query(AssistantMessage)) == 1
        await ask(pilot, "What is 2 + 3?")
        assert len(store.load("sums").messages) == 4  # a named chat is saved after every turn


async def test_markdown_export_is_written_on_save(make_app, store):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(app)
        await ask(pilot, "Write hello world in Python.")
        await send(pilot, "/save hello")
        await wait_until(lambda: app.query(Notice), what="the save notice")
        notice = str(app.query(Notice).last().render())
        path = Path(notice.rsplit("Markdown: ", 1)[1])
        text = path.read_text(encoding="utf-8")
        assert 'print("Hello, world!")' in text and "One print call is enough." in text


async def test_input_history_and_commands(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(app)
        chat_input = app.query_one(ChatInput)
        await send(pilot, "/budget 16")
        await send(pilot, "/temp 0.3")
        await pilot.pause()
        assert app.conversation.budget == 16 and app.conversation.temperature == 0.3
        assert "≤16" in status_line(app) and "temp 0.3" in status_line(app)
        await send(pilot, "/temp hot")
        await send(pilot, "/frobnicate")
        await pilot.pause()
        assert any("temperature 'hot' is not a number" in e for e in errors(app))
        assert any("unknown command /frobnicate" in e for e in errors(app))
        # Up recalls earlier messages, Down comes back to the draft.
        chat_input.load_text("draft")
        await pilot.press("up")
        assert chat_input.text == "/frobnicate"
        await pilot.press("up")
        assert chat_input.text == "/temp hot"
        await pilot.press("down", "down")
        assert chat_input.text == "draft"
        # Ctrl+J is a newline, not a send.
        chat_input.load_text("two")
        chat_input.move_cursor(chat_input.document.end)
        await pilot.press("ctrl+j", "l", "i", "n", "e", "s")
        assert chat_input.text == "two\nlines" and len(app.conversation.messages) == 0
        await send(pilot, "/help")
        await pilot.pause()
        assert app.query("Markdown.help")


async def test_unknown_model_is_a_notice_not_a_crash(store):
    app = ChatApp(Source(model="/no/such/model"), store=store)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(lambda: errors(app), what="the load error")
        assert "could not load /no/such/model" in errors(app)[0]
        await send(pilot, "Hello?")
        await wait_until(lambda: len(errors(app)) == 2, what="the no-model notice")
        assert "no model is loaded" in errors(app)[1]
        assert app.is_running


async def test_unreachable_endpoint_is_a_notice(store):
    app = ChatApp(Source(endpoint="http://127.0.0.1:9/v1"), store=store)
    async with app.run_test(size=SIZE):
        await wait_until(lambda: errors(app), what="the connection error")
        assert "127.0.0.1:9" in errors(app)[0]
        assert app.is_running


async def test_a_model_failing_mid_stream_keeps_the_conversation(make_app, engine_answer):
    """Fault injection into the real model: its forward pass raises on the 10th call of a turn."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(app)
        model = app.engine.backend.session.model
        calls = {"n": 0}
        real_call = type(model).__call__

        class Failing(type(model)):
            def __call__(self, *args, **kwargs):
                calls["n"] += 1
                if calls["n"] == 10:
                    raise RuntimeError("the GPU went away")
                return real_call(self, *args, **kwargs)

        model.__class__ = Failing
        await ask(pilot, "What is 2 + 3?")
        assert any("the GPU went away" in e for e in errors(app))
        assert app.conversation.messages[-1].reasoning  # the partial turn is kept
        model.__class__ = Failing.__mro__[1]
        await send(pilot, "/clear")
        await ask(pilot, "Hi!")
        assert app.conversation.messages[-1].content == engine_answer("Hi!")[1]


async def test_endpoint_backend_shows_the_same_panel(demo_server, store, engine_answer):
    app = ChatApp(Source(endpoint=f"{demo_server}/v1", model="demo"), store=store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app)
        assert "demo" in status_line(app)
        await ask(pilot, "What is 2 + 3?")
        panel = app.query_one(ThinkingPanel)
        message = app.conversation.messages[-1]
        assert panel.collapsed
        assert panel.title == f"Thought for {message.thought_s:.1f} s · {message.reasoning_tokens} tokens"
        assert message.reasoning_tokens > 0
        assert (message.reasoning, message.content) == engine_answer("What is 2 + 3?")
        await pilot.press("ctrl+r")  # regenerating over the endpoint works the same way
        await wait_until(lambda: app.turn == 0 and len(app.conversation.messages) == 2, what="the regenerated turn")


def test_resumed_conversation_type_round_trip(store):
    """The store keeps exactly what the app builds (a plain check that needs no model)."""
    conversation = Conversation(name="x", model="demo", thinking=False, budget=8, temperature=0.5)
    store.save(conversation)
    assert store.load("x") == conversation


async def test_the_view_follows_the_stream_unless_scrolled_up(make_app):
    app = make_app()
    async with app.run_test(size=(60, 14)) as pilot:
        await ready(app)
        for _ in range(2):
            await ask(pilot, "Write hello world in Python.")
        log = app.log_view
        assert log.max_scroll_y > 0 and log.scroll_y == log.max_scroll_y  # followed to the end
        sending, _ = await start_thinking(pilot, "Is 91 a prime number?")
        log.scroll_to(y=0, animate=False, immediate=True)  # the user scrolls up while it streams
        await sending
        await wait_until(lambda: app.turn == 0, what="the turn to end")
        await pilot.pause()
        assert log.scroll_y < log.max_scroll_y  # left where the user put it
        await ask(pilot, "What is 2 + 3?")  # sending again follows the stream again
        assert log.scroll_y == log.max_scroll_y
