"""Snapshots of the chat app (pytest-textual-snapshot): a saved conversation with its thinking panel folded,
then opened. The conversation is the demo model's real answer, with the timing fixed so the picture is
stable; the cursor does not blink and the memory figure is fixed. Update after a deliberate change with
`pytest --snapshot-update`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from qwen_mlx.app.app import ChatApp, Source
from qwen_mlx.app.conversation import Conversation, Message
from qwen_mlx.app.store import Store
from qwen_mlx.app.widgets import ChatInput

SIZE = (90, 28)
CONVERSATION = Conversation(
    model="demo",
    messages=[
        Message("user", "Write hello world in Python."),
        Message(
            "assistant",
            'Here it is:\n\n```python\nprint("Hello, world!")\n```\n\nRun it with `python hello.py`.',
            reasoning="One print call is enough.",
            reasoning_tokens=7,
            thought_s=0.4,
        ),
    ],
)


@pytest.fixture
def app(demo_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ChatApp:
    monkeypatch.setenv("QWEN_MLX_CACHE", str(demo_model_path.parent))  # so the model is called "demo"
    return ChatApp(Source(model="demo"), conversation=CONVERSATION, store=Store(tmp_path / "chats.sqlite3"))


async def settle(pilot) -> None:
    app: ChatApp = pilot.app
    start = time.monotonic()
    # Loaded: the backend is there and the app has handled the engine's Loaded message (status drawn).
    while (app.engine.backend is None or app.status.state) and time.monotonic() - start < 60:
        await asyncio.sleep(0.05)
    assert app.engine.backend is not None and not app.status.state
    app.query_one(ChatInput).cursor_blink = False
    # MLX's memory count is process-wide, so earlier tests change it: frozen at the source, so a status
    # refresh that lands after this (the context count of the loaded chat) shows the same figure.
    app.engine.backend.memory = lambda: 42 << 20
    app.status.memory = 42 << 20
    app._refresh_status()
    await pilot.pause()


def test_folded_panel(app, snap_compare):
    assert snap_compare(app, terminal_size=SIZE, run_before=settle)


def test_open_panel(app, snap_compare):
    async def open_panel(pilot) -> None:
        await settle(pilot)
        await pilot.press("ctrl+o")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=open_panel)
