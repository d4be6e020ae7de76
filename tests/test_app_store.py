"""The chat store on real SQLite files: round trips, replacement, names, refusals, crash safety, exports."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qwen_mlx.app import store as store_module
from qwen_mlx.app.conversation import Conversation, Message
from qwen_mlx.app.store import SCHEMA_VERSION, Store
from qwen_mlx.errors import QwenMLXError


def chat(name: str | None = "work", turns: int = 2, **settings) -> Conversation:
    messages = []
    for i in range(turns):
        messages.append(Message("user", f"question {i}"))
        messages.append(
            Message(
                "assistant",
                f"answer {i}",
                reasoning=f"let me think about {i}…\nsecond line",
                reasoning_tokens=40 + i,
                thought_s=1.25 + i,
                stopped=i == turns - 1,
            )
        )
    return Conversation(name=name, model="Qwen/Qwen3-0.6B", messages=messages, **settings)


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "chats.sqlite3") as s:
        yield s


def test_round_trip_keeps_every_field(store: Store) -> None:
    original = chat(system="Be brief.", thinking=False, budget=512, temperature=0.7)
    original.messages.append(Message("user", "ünïcode ✓ and 'quotes' and \"more\"\n\nand a blank line"))
    store.save(original)
    assert store.load("work") == original


def test_round_trip_keeps_none_budget_and_temperature(store: Store) -> None:
    original = chat(budget=None, temperature=None)
    store.save(original)
    loaded = store.load("work")
    assert loaded.budget is None and loaded.temperature is None and loaded.thinking is True
    assert loaded == original


def test_round_trip_of_an_empty_chat(store: Store) -> None:
    store.save(Conversation(name="empty"))
    assert store.load("empty") == Conversation(name="empty")


def test_survives_reopening(tmp_path: Path) -> None:
    with Store(tmp_path / "chats.sqlite3") as s:
        s.save(chat())
    with Store(tmp_path / "chats.sqlite3") as s:
        assert s.load("work") == chat()


def test_default_path_follows_the_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_MLX_DATA", str(tmp_path / "nested" / "data"))
    with Store() as s:
        assert s.path == tmp_path / "nested" / "data" / "chats.sqlite3"
        s.save(chat())
    assert s.path.is_file()


def test_saving_again_replaces_the_chat(store: Store) -> None:
    store.save(chat(turns=3, temperature=0.5))
    shorter = chat(turns=1, system="New system prompt.")
    store.save(shorter)
    assert store.load("work") == shorter
    assert len(store.load("work").messages) == 2
    assert store.names() == ["work"]


def test_names_most_recently_saved_first(store: Store) -> None:
    assert store.names() == []
    for name in ["a", "b", "c"]:
        store.save(chat(name))
    assert store.names() == ["c", "b", "a"]
    store.save(chat("a"))
    assert store.names() == ["a", "c", "b"]


def test_delete(store: Store) -> None:
    store.save(chat("a"))
    store.save(chat("b"))
    store.delete("a")
    assert store.names() == ["b"]
    with pytest.raises(QwenMLXError, match="no saved chat named 'a'; saved chats: 'b'"):
        store.load("a")
    with pytest.raises(QwenMLXError, match="no saved chat named 'a'"):
        store.delete("a")
    # The messages went with it: saving the name again starts from nothing.
    store.save(Conversation(name="a"))
    assert store.load("a").messages == []


def test_load_of_a_missing_name_lists_saved_names(store: Store) -> None:
    with pytest.raises(QwenMLXError, match="^no saved chat named 'nope'; there are no saved chats yet$"):
        store.load("nope")
    for i in range(7):
        store.save(chat(f"chat{i}"))
    with pytest.raises(QwenMLXError) as e:
        store.load("nope")
    message = str(e.value)
    assert message == (
        "no saved chat named 'nope'; saved chats: 'chat6', 'chat5', 'chat4', 'chat3', 'chat2' and 2 more"
    )
    assert "\n" not in message


@pytest.mark.parametrize(
    ("name", "why"),
    [
        (None, "needs a name"),
        ("", "needs a name"),
        ("   ", "needs a name"),
        ("x" * 101, "at most 100"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("a\nb", "control character"),
        ("tab\there", "control character"),
        ("nul\x00", "control character"),
    ],
)
def test_bad_names_are_refused(store: Store, name: str | None, why: str) -> None:
    with pytest.raises(QwenMLXError, match=why):
        store.save(chat(name))
    assert store.names() == []


def test_long_and_unusual_names_are_fine(store: Store) -> None:
    for name in ["x" * 100, "plans: 2026 (draft) ✓", "..", "日本語のチャット"]:
        store.save(chat(name))
        assert store.load(name).name == name


def test_two_stores_on_one_file(store: Store) -> None:
    with Store(store.path) as other:
        store.save(chat("a"))
        other.save(chat("b", turns=1))
        store.save(chat("a", turns=3))
        assert other.load("a") == chat("a", turns=3)
        assert store.load("b") == chat("b", turns=1)
        assert store.names() == other.names() == ["a", "b"]


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    Store(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(QwenMLXError, match="was written by a newer qwen-mlx .*; upgrade qwen-mlx$"):
        Store(path)


def test_schema_is_versioned_and_crash_safe(store: Store) -> None:
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 1
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


@pytest.mark.parametrize("content", [b"this is not a database, it is a text file\n" * 100, b"\x00" * 10 + b"x" * 5000])
def test_a_corrupt_file_gives_one_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "chats.sqlite3"
    path.write_bytes(content)
    with pytest.raises(QwenMLXError) as e:
        Store(path)
    message = str(e.value)
    assert str(path) in message and "not a readable chat database" in message and "\n" not in message
    assert path.read_bytes() == content  # left as it was, for the user to look at


def test_a_failure_mid_save_keeps_the_previous_version(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    before = chat(turns=3, temperature=0.2)
    store.save(before)
    rows = 0
    real_row = store_module._message_row

    def failing_row(*args):
        nonlocal rows
        rows += 1
        if rows > 2:  # the settings row is updated, the old messages deleted and two new ones written by now
            raise RuntimeError("simulated failure mid-save")
        return real_row(*args)

    monkeypatch.setattr(store_module, "_message_row", failing_row)
    with pytest.raises(RuntimeError, match="mid-save"):
        store.save(chat(turns=2, temperature=0.9, system="changed"))
    assert rows == 3
    assert store.load("work") == before
    monkeypatch.undo()
    # The connection is usable afterwards, and a reopened file agrees.
    store.save(chat("other"))
    with Store(store.path) as again:
        assert again.load("work") == before
        assert again.names() == ["other", "work"]


def test_a_bad_value_mid_save_keeps_the_previous_version(store: Store) -> None:
    before = chat()
    store.save(before)
    broken = chat(turns=3)
    broken.messages[3].content = object()  # sqlite3 cannot bind it: fails after three rows went in
    with pytest.raises(QwenMLXError, match="could not save chat 'work'"):
        store.save(broken)
    assert store.load("work") == before


def test_a_process_killed_mid_save_keeps_the_previous_version(store: Store) -> None:
    before = chat(turns=2)
    store.save(before)
    # A real crash: the process exits inside the transaction, with no rollback and no cleanup.
    script = textwrap.dedent(
        f"""
        import os
        from qwen_mlx.app import store as store_module
        from qwen_mlx.app.conversation import Conversation, Message

        real_row = store_module._message_row
        def row(conversation_id, position, message):
            if position == 90:
                os._exit(3)
            return real_row(conversation_id, position, message)
        store_module._message_row = row
        s = store_module.Store({str(store.path)!r})
        s.save(Conversation(name="work", model="other", messages=[Message("user", "x" * 100_000)] * 100))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    # The dying save had spilled uncommitted pages into the write-ahead log; recovery must ignore them.
    assert Path(f"{store.path}-wal").stat().st_size > 1_000_000
    assert store.load("work") == before
    with Store(store.path) as again:
        assert again.load("work") == before


def test_reloaded_prompt_messages_leave_reasoning_out(store: Store) -> None:
    store.save(chat(system="Be brief."))
    loaded = store.load("work")
    assert loaded.messages[1].reasoning.startswith("let me think")
    assert loaded.prompt_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "question 0"},
        {"role": "assistant", "content": "answer 0"},
        {"role": "user", "content": "question 1"},
        {"role": "assistant", "content": "answer 1"},
    ]


def test_markdown_export(store: Store) -> None:
    path = store.export_markdown(chat(system="Be brief.", budget=1024, temperature=0.6))
    assert path == store.path.parent / "exports" / "work.md"
    assert path.read_text(encoding="utf-8") == textwrap.dedent(
        """\
        # work

        Model: `Qwen/Qwen3-0.6B` · thinking on, budget 1024 tokens · temperature 0.6

        ## System

        Be brief.

        ## You

        question 0

        ## Qwen

        <details><summary>Thought for 1.2 s · 40 tokens</summary>

        let me think about 0…
        second line

        </details>

        answer 0

        ## You

        question 1

        ## Qwen

        <details><summary>Thought for 2.2 s · 41 tokens</summary>

        let me think about 1…
        second line

        </details>

        answer 1

        *(stopped before the end)*
        """
    )


def test_markdown_export_settings_and_no_reasoning(store: Store, tmp_path: Path) -> None:
    messages = [Message("user", "hi"), Message("assistant", "hello")]
    c = Conversation(name="quick", model="http://localhost:8080/v1", thinking=False, messages=messages)
    text = store.export_markdown(c, tmp_path / "out.md").read_text(encoding="utf-8")
    assert "Model: `http://localhost:8080/v1` · thinking off · model's default temperature" in text
    assert "<details>" not in text and "stopped" not in text and "## System" not in text
    assert text.endswith("## You\n\nhi\n\n## Qwen\n\nhello\n")


def test_markdown_export_to_a_folder_and_unnamed(store: Store, tmp_path: Path) -> None:
    assert store.export_markdown(chat(), tmp_path) == tmp_path / "work.md"
    unnamed = store.export_markdown(chat(name=None))
    assert unnamed.parent == store.path.parent / "exports"
    assert unnamed.name.startswith("chat-") and unnamed.read_text(encoding="utf-8").startswith("# chat-")


def test_markdown_export_is_atomic(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    path = store.export_markdown(chat(turns=1))
    old = path.read_text(encoding="utf-8")
    store.export_markdown(chat(turns=3))
    assert path.read_text(encoding="utf-8") != old
    assert sorted(p.name for p in path.parent.iterdir()) == ["work.md"]  # no temporary file left

    new = path.read_text(encoding="utf-8")

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.os, "replace", failing_replace)
    with pytest.raises(QwenMLXError, match="^cannot write .*work.md: No space left on device$"):
        store.export_markdown(chat(turns=1))
    monkeypatch.undo()
    assert path.read_text(encoding="utf-8") == new  # the failed export left the old file whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["work.md"]


def test_markdown_export_to_a_missing_folder_is_one_line(store: Store, tmp_path: Path) -> None:
    with pytest.raises(QwenMLXError, match="^cannot write .*nowhere.*: No such file or directory$"):
        store.export_markdown(chat(), tmp_path / "nowhere" / "x.md")
