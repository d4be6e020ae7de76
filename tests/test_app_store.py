"""The chat store on real SQLite files: round trips, replacement, names, refusals, crash safety, exports, and
several apps on one file (two stores, two processes, the app's notes)."""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_app import SIZE, ask, ready, send, wait_until

from qwen_mlx.app import store as store_module
from qwen_mlx.app.app import ChatApp, Source
from qwen_mlx.app.backends import LocalBackend
from qwen_mlx.app.conversation import Conversation, Message
from qwen_mlx.app.store import SCHEMA_VERSION, Saved, Store
from qwen_mlx.app.widgets import Notice
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.parser import Answer
from qwen_mlx.turn import ChatStats, Done


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
    c = chat(turns=3, temperature=0.5)
    assert store.save(c) == Saved("work")
    c.messages, c.system = c.messages[:2], "New system prompt."
    assert store.save(c) == Saved("work")
    assert store.load("work") == c
    assert len(store.load("work").messages) == 2
    assert store.names() == ["work"]
    # A loaded chat is the version it was loaded from: saving it again updates it too.
    loaded = store.load("work")
    loaded.messages.append(Message("user", "one more"))
    assert store.save(loaded) == Saved("work")
    assert store.load("work") == loaded and store.names() == ["work"]


def test_a_new_chat_under_a_saved_name_keeps_both(store: Store) -> None:
    """`/save work` from a chat that never was 'work' (this app's or another's) keeps the saved one."""
    first = chat(turns=3)
    store.save(first)
    second = chat(turns=1, system="Another chat.")
    saved = store.save(second)
    assert saved.name == second.name == "work (2)"
    assert saved.note == "a chat named 'work' is already saved; it is kept, and this one is now 'work (2)'"
    assert store.load("work") == first and store.load("work (2)") == second
    assert store.names() == ["work (2)", "work"]


def test_names_most_recently_saved_first(store: Store) -> None:
    assert store.names() == []
    chats = {name: chat(name) for name in ["a", "b", "c"]}
    for c in chats.values():
        store.save(c)
    assert store.names() == ["c", "b", "a"]
    store.save(chats["a"])
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
        a = chat("a")
        store.save(a)
        other.save(chat("b", turns=1))
        a.messages = chat(turns=3).messages
        store.save(a)
        assert other.load("a") == chat("a", turns=3)
        assert store.load("b") == chat("b", turns=1)
        assert store.names() == other.names() == ["a", "b"]


# --- two apps on one store: a save never replaces a version its chat has not seen ---------------------


def test_a_second_app_saving_the_same_name_keeps_the_first(store: Store) -> None:
    """A and B both `/save shared`: B's is saved as `shared (2)`, A's is intact, and each goes on with its own."""
    with Store(store.path) as other:
        a, b = chat("shared", turns=1), chat("shared", turns=2, system="B's")
        assert store.save(a) == Saved("shared")
        saved = other.save(b)
        assert saved.name == b.name == "shared (2)" and "'shared' is already saved" in saved.note
        assert other.load("shared") == a and store.load("shared (2)") == b
        # Autosaves after that: each app updates its own chat, with nothing more to say.
        a.messages.append(Message("user", "A again"))
        b.messages.append(Message("user", "B again"))
        assert store.save(a) == Saved("shared") and other.save(b) == Saved("shared (2)")
        assert other.load("shared") == a and store.load("shared (2)") == b
        assert sorted(store.names()) == ["shared", "shared (2)"]


def test_an_autosave_after_another_apps_save_goes_to_a_new_name(store: Store) -> None:
    with Store(store.path) as other:
        a = chat("shared", turns=1)
        store.save(a)
        b = other.load("shared")  # B opens A's chat and goes on with it
        b.messages.append(Message("user", "B's turn"))
        assert other.save(b) == Saved("shared")
        a.messages.append(Message("user", "A's turn"))  # A, not knowing, answers on and autosaves
        saved = store.save(a)
        assert saved == Saved(
            "shared (2)",
            "'shared' was saved by another chat since this one opened it; both are kept, and this one is now "
            "'shared (2)'",
        )
        assert a.name == "shared (2)"
        assert store.load("shared") == b and other.load("shared (2)") == a
        # From then on A is 'shared (2)', and B's next autosave still updates 'shared'.
        a.messages.append(Message("user", "A again"))
        b.messages.append(Message("user", "B again"))
        assert store.save(a) == Saved("shared (2)") and other.save(b) == Saved("shared")
        assert store.load("shared") == b and other.load("shared (2)") == a


def test_a_chat_deleted_by_another_app_is_saved_again_under_its_name(store: Store) -> None:
    with Store(store.path) as other:
        a = chat("mine")
        store.save(a)
        other.delete("mine")
        a.messages.append(Message("user", "still here"))
        assert store.save(a) == Saved("mine")  # nothing of anyone's is lost: no note
        assert other.load("mine") == a
        # Deleted, then another chat saved under the name: that one is not this chat's version.
        other.delete("mine")
        theirs = chat("mine", turns=1, system="theirs")
        other.save(theirs)
        assert store.save(a).name == "mine (2)"
        assert other.load("mine") == theirs and other.load("mine (2)") == a


@pytest.mark.parametrize(
    ("taken", "wanted", "expected"),
    [
        (["shared", "shared (2)"], "shared", "shared (3)"),
        (["shared", "shared (2)"], "shared (2)", "shared (3)"),  # a copy of a copy is the next number
        (["notes (2026)"], "notes (2026)", "notes (2027)"),
        (["v (1234567)"], "v (1234567)", "v (1234567) (2)"),  # a long number is part of the name
        (["x" * 100], "x" * 100, "x" * 96 + " (2)"),  # the longest name still fits
    ],
)
def test_the_kept_both_name_is_the_next_free_one(store: Store, taken: list[str], wanted: str, expected: str) -> None:
    for name in taken:
        store.save(chat(name))
    assert store.save(chat(wanted, turns=1)).name == expected
    assert store.load(expected) == chat(expected, turns=1)


def test_a_failed_save_leaves_the_conversation_as_it_was(store: Store) -> None:
    c = chat("work")
    store.save(c)
    before = c.saved
    c.messages[1].content = object()  # sqlite3 cannot bind it
    with pytest.raises(QwenMLXError, match="could not save chat 'other'"):
        store.save(c, "other")
    assert (c.name, c.saved) == ("work", before)  # autosave goes on saving as 'work'
    assert store.names() == ["work"]


_RACER = textwrap.dedent(
    """
    import sys, time
    from qwen_mlx.app.conversation import Conversation, Message
    from qwen_mlx.app.store import Store

    path, tag, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3])
    store = Store(path)
    own = Conversation(name="shared")
    while time.time() < start_at:  # both processes begin together
        pass
    for i in range(50):
        own.messages.append(Message("user", f"{tag} {i}"))
        store.save(own)  # an autosave of this app's chat
        store.save(Conversation(name="race", messages=[Message("user", f"{tag} {i}")]))  # a new chat each time
        time.sleep(0.002)  # SQLite's lock is not fair: a writer that never pauses would finish before the other starts
    print(own.name)
    """
)


def test_two_processes_saving_at_once_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    Store(path).close()  # the schema exists before the race starts
    start_at = time.time() + 1.5  # time for both interpreters to start and open the store
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(path), tag, str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("A", "B")
    ]
    outputs = [racer.communicate(timeout=120) for racer in racers]
    for racer, (_, stderr) in zip(racers, outputs, strict=True):
        assert racer.returncode == 0, stderr
    own_names = {tag: out.strip() for tag, (out, _) in zip("AB", outputs, strict=True)}
    assert sorted(own_names.values()) == ["shared", "shared (2)"]
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    with Store(path) as store:
        # Each app's chat is whole, under the name it was told, with every one of its 50 turns.
        for tag, name in own_names.items():
            assert [m.content for m in store.load(name).messages] == [f"{tag} {i}" for i in range(50)]
        # And all 100 new chats are there, each once.
        race = [n for n in store.names() if n.startswith("race")]
        contents = sorted(store.load(n).messages[0].content for n in race)
        assert len(race) == 100 and contents == sorted(f"{tag} {i}" for tag in "AB" for i in range(50))


def test_a_version_1_file_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    conn = sqlite3.connect(path)
    with conn:
        store_module.MIGRATIONS[0](conn)
        conn.execute("PRAGMA user_version=1")
        conn.execute(
            "INSERT INTO conversations (name, model, system, thinking, created, updated) "
            "VALUES ('old', '', '', 1, 0, 0)"
        )
        conn.execute("INSERT INTO messages VALUES (1, 0, 'user', 'from before', '', 0, 0, 0)")
    conn.close()
    with Store(path) as store:
        old = store.load("old")
        assert [m.content for m in old.messages] == ["from before"]
        old.messages.append(Message("user", "and after"))
        assert store.save(old) == Saved("old")  # the chat it loaded: updated in place
        assert len(store.load("old").messages) == 2


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
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
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
    changed = dataclasses.replace(before, messages=chat(turns=2).messages, temperature=0.9, system="changed")
    with pytest.raises(RuntimeError, match="mid-save"):
        store.save(changed)
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
    broken = dataclasses.replace(before, messages=chat(turns=3).messages)  # the saved chat, changed
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
        from qwen_mlx.app.conversation import Message

        real_row = store_module._message_row
        def row(conversation_id, position, message):
            if position == 90:
                os._exit(3)
            return real_row(conversation_id, position, message)
        store_module._message_row = row
        s = store_module.Store({str(store.path)!r})
        work = s.load("work")
        work.messages = [Message("user", "x" * 100_000)] * 100
        s.save(work)
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


# --- the app: the note reaches the user, and the chat goes on under its new name ----------------------


class EchoBackend:
    """A backend with no model: it answers every message at once, so a turn (and its autosave) takes no time."""

    label = "echo"
    context_limit = 4096
    notices: list[str] = []

    def stream(self, messages, *, thinking, budget, temperature):
        yield Answer(f"echo: {messages[-1]['content']}")
        yield Done(ChatStats(completion_tokens=3, finish_reason="stop"))

    def end_thinking(self) -> bool:
        return False

    def memory(self) -> None:
        return None

    def prompt_tokens(self, messages) -> None:
        return None


async def test_the_app_says_where_a_save_went_when_another_app_had_the_name(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(LocalBackend, "load", classmethod(lambda cls, model, **options: EchoBackend()))
    other = Store(store.path)  # another app on the same file
    theirs = chat("shared", turns=1)
    other.save(theirs)
    app = ChatApp(Source(model="echo"), store=store)

    def notices() -> list[str]:
        return [str(n.render()) for n in app.query(Notice)]

    async with app.run_test(size=SIZE) as pilot:
        await ready(app)
        await ask(pilot, "hello")
        await send(pilot, "/save shared")
        await wait_until(lambda: any("saved as" in n for n in notices()), what="the save notice")
        assert "a chat named 'shared' is already saved; it is kept, and this one is now 'shared (2)'" in notices()
        assert "saved as 'shared (2)' (qwen-mlx chat --resume 'shared (2)')" in notices()[-1]
        assert app.conversation.name == "shared (2)" and other.load("shared") == theirs
        # The other app opens this one's chat and saves a turn of its own; this app's next autosave keeps it.
        forked = other.load("shared (2)")
        forked.messages.append(Message("user", "the other app's turn"))
        other.save(forked)
        await ask(pilot, "again")
        await wait_until(lambda: app.conversation.name == "shared (3)", what="the autosave under a new name")
        assert notices()[-1] == (
            "'shared (2)' was saved by another chat since this one opened it; both are kept, and this one is now "
            "'shared (3)' (qwen-mlx chat --resume 'shared (3)')"
        )
        assert other.load("shared (2)") == forked and other.load("shared") == theirs
        mine = [m.content for m in other.load("shared (3)").messages]
        assert mine == ["hello", "echo: hello", "again", "echo: again"]
    other.close()
