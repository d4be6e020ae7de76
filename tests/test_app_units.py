"""The chat app's plain-Python parts: slash commands, the status line, panel titles, and `qwen-mlx chat`'s
argument errors (one line, exit status 1, before any terminal drawing)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qwen_mlx.app import commands
from qwen_mlx.app.conversation import Conversation, Message
from qwen_mlx.app.widgets import Status, format_status, thought_title
from qwen_mlx.errors import QwenMLXError


@pytest.mark.parametrize(
    "line, name, value",
    [
        ("/think", "/think", None),
        ("/no_think", "/no_think", None),
        ("/budget 512", "/budget", 512),
        ("/budget off", "/budget", None),
        ("/temp 0.7", "/temp", 0.7),
        ("/temp 0", "/temp", 0.0),
        ("/temp default", "/temp", None),
        ("/system You are terse.  ", "/system", "You are terse."),
        ("/system", "/system", None),
        ("/save", "/save", None),
        ("/save my chat", "/save", "my chat"),
        ("/load my chat", "/load", "my chat"),
        ("/model", "/model", None),
        ("/model mlx-community/Qwen3-4B-4bit", "/model", "mlx-community/Qwen3-4B-4bit"),
        ("/clear", "/clear", None),
        ("/help", "/help", None),
    ],
)
def test_commands_parse(line, name, value):
    assert commands.parse(line) == commands.Command(name, value)


@pytest.mark.parametrize(
    "line, message",
    [
        ("/budget", "give a budget: usage /budget N | off"),
        ("/budget -5", "budget '-5' is not a whole number of tokens"),
        ("/budget 1.5", "is not a whole number"),
        ("/temp", "give a temperature"),
        ("/temp hot", "temperature 'hot' is not a number"),
        ("/temp 3", "temperature 3 is out of range"),
        ("/temp nan", "out of range"),
        ("/load", "give the name of a saved chat"),
        ("/think hard", "/think takes no argument"),
        ("/thnik", "unknown command /thnik"),
        ("/b", "unknown command /b (did you mean /budget?)"),
    ],
)
def test_commands_refuse_bad_input(line, message):
    with pytest.raises(QwenMLXError, match=None) as error:
        commands.parse(line)
    assert message in str(error.value)


def test_completion():
    assert commands.complete("/") == list(commands.COMMANDS)
    assert commands.complete("/t") == ["/think", "/temp"]
    assert commands.complete("/no") == ["/no_think"]
    assert commands.complete("/load ", ["sums", "story"]) == ["/load sums", "/load story"]
    assert commands.complete("/load su", ["sums", "story"]) == ["/load sums"]
    assert commands.complete("/temp 0") == []


def test_help_table_keeps_a_pipe_inside_its_cell():
    """`/budget N | off` is one cell of two columns, as Textual's Markdown (markdown-it, GFM tables) reads it."""
    from markdown_it import MarkdownIt

    html = MarkdownIt("gfm-like").render(commands.help_markdown([("Esc", "stop")]))
    assert "<td><code>/budget N | off</code></td>" in html and "<td><code>/temp X | default</code></td>" in html
    rows = [row for row in html.split("<tr>") if "/budget" in row]
    assert rows[0].count("<td>") == 2


def test_status_line():
    status = Status(model="demo", context_used=1234, context_limit=40960, ttft_s=0.051, tokens_per_s=35.84)
    assert format_status(status) == "demo · think · ctx 1,234/40,960 · TTFT 0.05 s · 35.8 tok/s"
    status = Status(model="m @ host:1", thinking=True, budget=64, temperature=0.3, memory=3 << 29, state="thinking…")
    assert format_status(status) == "m @ host:1 · think ≤64 · temp 0.3 · ctx 0/? · mem 1.50 GiB · thinking…"
    assert format_status(Status(thinking=False, budget=64)).startswith("no model · no_think · ")


def test_thought_title():
    assert thought_title(4.2, 312) == "Thought for 4.2 s · 312 tokens"
    assert thought_title(0.04, 1) == "Thought for 0.0 s · 1 token"
    assert thought_title(None, 5, stopped=True) == "Thought · 5 tokens (stopped)"


def test_prompt_leaves_reasoning_out():
    conversation = Conversation(system="Be brief.")
    conversation.messages += [
        Message("user", "Hi!"),
        Message("assistant", "Hello!", reasoning="They greet me.", reasoning_tokens=4),
    ]
    assert conversation.prompt_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello!"},
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resume", "nope"], "no saved chat named 'nope'"),
        (["--endpoint", "http://127.0.0.1:9/v1", "--quantize", "4"], "--quantize applies to a local model"),
        (["--budget", "-1"], "--budget -1 is invalid"),
        (["--distributed", "pp", "--ranks", "2", "--resume", "nope"], "no saved chat named 'nope'"),
        (["--distributed", "pp", "--ranks", "2", "--endpoint", "http://127.0.0.1:9/v1"], "leave out --endpoint"),
    ],
)
def test_chat_command_bad_arguments(args, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "qwen_mlx", "chat", *args],
        capture_output=True,
        text=True,
        env={"QWEN_MLX_DATA": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_streaming_fence_draws_the_same_text_as_a_whole_highlight():
    """Highlighting only the added lines must never change the text shown, at any point of the stream."""
    from textual.widgets._markdown import MarkdownFence

    from qwen_mlx.app.widgets import StreamingFence

    code = 'import os\n\n\ndef main():\n    """Doc\n    string."""\n    print(os.getcwd())  # here\n\n' * 5
    for step in (1, 5, 23):
        StreamingFence._last = None
        for end in range(1, len(code) + 1, step):
            assert (
                StreamingFence.highlight(code[:end], "python").plain
                == MarkdownFence.highlight(code[:end], "python").plain
            )
    assert StreamingFence.highlight("x = 1", "python").plain == "x = 1"  # a new fence starts afresh


def test_a_distributed_chat_is_saved_with_its_model(tmp_path, monkeypatch):
    """`chat --distributed` talks to its ranks' private endpoint, which is gone with the app: what --resume
    reopens is the model (with --distributed again, or on one Mac), never that URL."""
    from qwen_mlx.app.app import Source
    from qwen_mlx.app.store import Store
    from qwen_mlx.cli import _resumed_model

    private = Source(model="~/models/qwen3-235b", endpoint="http://127.0.0.1:50123/v1", api_key="k",
                     distributed="pp over 2 ranks")  # fmt: skip
    assert private.label == "~/models/qwen3-235b"
    assert Source(endpoint="http://127.0.0.1:1234/v1").label == "http://127.0.0.1:1234/v1"
    monkeypatch.setenv("QWEN_MLX_DATA", str(tmp_path))
    store = Store()
    store.save(Conversation(model=private.label, name="big"))
    store.save(Conversation(model="http://127.0.0.1:1234/v1", name="lm-studio"))
    store.close()
    assert _resumed_model("big") == "~/models/qwen3-235b"
    assert _resumed_model("lm-studio") is None  # chat --distributed --resume lm-studio: the demo, not a URL
