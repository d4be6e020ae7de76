"""Saved chats: one SQLite file, each save one transaction, and Markdown exports beside it.

Design decisions:
- The standard library's `sqlite3`, one connection, used from the UI thread only: a save is a few hundred rows
  at most, well under a frame, and SQLite gives atomic replacement and crash recovery that a folder of JSON
  files would have to rebuild.
- Each save replaces the chat's rows completely inside one `BEGIN IMMEDIATE` transaction, so a crash or an
  error mid-save leaves the previous version whole. IMMEDIATE takes the write lock before reading, so a
  second app on the same file waits out `busy_timeout` instead of failing on a lock upgrade.
- Several apps may share the file, so a save never overwrites a version its chat has not seen. Every save
  writes a fresh random revision token into the chat's row, and the conversation keeps the (name, token) it
  last loaded or saved (`Conversation.saved`). A save whose name holds any other version (another app's
  `/save shared`, or its autosave after this one loaded the chat) keeps that version and goes to the next
  free name, `shared (2)`, with a note for the user; the conversation is that chat from then on. The check
  and the write are one IMMEDIATE transaction, so of two racing writers exactly one sees its version.
  A random token rather than a counter: a chat deleted and saved again by someone else starts over, and a
  counter would match the old one's. A chat another app deleted is saved again under its name without a
  note: nothing of anyone's is lost, and the user of this app asked for exactly that name.
- WAL with `synchronous=FULL` (and `fullfsync` on macOS): WAL alone survives the app crashing, FULL also
  survives power loss after a save returns. It costs one fsync per saved turn, nothing next to a turn.
- The schema is versioned with `PRAGMA user_version`; `MIGRATIONS[i]` takes a database from version i to
  i + 1 in the same transaction that bumps the version. A file from a newer qwen-mlx is refused, never read.
- The reasoning has its own column, apart from the answer, as in `Message`: a reloaded chat shows it folded
  and `prompt_messages` still leaves it out.
- The data folder is `$QWEN_MLX_DATA` when set (tests and smoke runs point it at a temporary folder), else
  the platform's user data folder. Exports go to its `exports/`, written to a temporary file and renamed
  into place, so an export is whole or absent.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import tempfile
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import platformdirs

from qwen_mlx.errors import QwenMLXError

from .conversation import Conversation, Message, SavedVersion

DATA_ENV = "QWEN_MLX_DATA"
DB_NAME = "chats.sqlite3"
EXPORTS_DIR = "exports"
MAX_NAME_LENGTH = 100
BUSY_TIMEOUT_S = 5.0  # another qwen-mlx saving into the same file holds the lock for milliseconds
LISTED_NAMES = 5  # saved names a "no such chat" error lists


def data_dir() -> Path:
    """The folder for chats and exports: `$QWEN_MLX_DATA` when set, else the platform's user data folder."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else platformdirs.user_data_path("qwen-mlx")


def _create_v1(conn: sqlite3.Connection) -> None:
    conn.execute(
        """CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            model TEXT NOT NULL,
            system TEXT NOT NULL,
            thinking INTEGER NOT NULL,
            budget INTEGER,      -- thinking budget in tokens; NULL: unlimited
            temperature REAL,    -- NULL: the model's own generation settings
            created REAL NOT NULL,  -- Unix seconds
            updated REAL NOT NULL
        )"""
    )
    conn.execute("CREATE INDEX conversations_updated ON conversations (updated)")
    conn.execute(
        """CREATE TABLE messages (
            conversation INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            reasoning TEXT NOT NULL,
            reasoning_tokens INTEGER NOT NULL,
            thought_s REAL NOT NULL,
            stopped INTEGER NOT NULL,
            PRIMARY KEY (conversation, position)
        ) WITHOUT ROWID"""
    )


def _add_revision_v2(conn: sqlite3.Connection) -> None:
    # Chats saved before revisions share the empty one: the first app to save such a chat again takes it.
    conn.execute("ALTER TABLE conversations ADD COLUMN revision TEXT NOT NULL DEFAULT ''")


# MIGRATIONS[i] takes a database at user_version i to i + 1; add a version by appending its function.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_create_v1, _add_revision_v2]
SCHEMA_VERSION = len(MIGRATIONS)


def check_name(name: str | None) -> str:
    """`name` if it can name a saved chat (and its export file), else a QwenMLXError saying why not."""
    if name is None or not name.strip():
        raise QwenMLXError("a saved chat needs a name; give one, e.g. /save NAME")
    if len(name) > MAX_NAME_LENGTH:
        raise QwenMLXError(f"chat name is {len(name)} characters long; use at most {MAX_NAME_LENGTH}")
    if "/" in name or "\\" in name:
        raise QwenMLXError(f"chat name {name!r} contains a path separator; use a name without / or \\")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise QwenMLXError(f"chat name {name!r} contains a control character; use printable characters only")
    return name


# "shared (2)": the suffix a kept-both save gets; a short number only, so "notes (2026)" is its own name.
_NUMBERED = re.compile(r"^(.*) \((\d{1,6})\)$")


def _free_name(conn: sqlite3.Connection, name: str) -> str:
    """The first unused `name (n)`: n from 2, or after the number `name` already ends with."""
    match = _NUMBERED.match(name)
    base, n = (match[1], int(match[2]) + 1) if match else (name, 2)
    while True:
        suffix = f" ({n})"
        candidate = base[: MAX_NAME_LENGTH - len(suffix)] + suffix
        if conn.execute("SELECT 1 FROM conversations WHERE name = ?", (candidate,)).fetchone() is None:
            return candidate
        n += 1


@dataclass(frozen=True)
class Saved:
    """Where a save went: `name`, and a `note` for the user when that is not the name asked for."""

    name: str
    note: str | None = None


def _message_row(conversation_id: int, position: int, m: Message) -> tuple:
    return (conversation_id, position, m.role, m.content, m.reasoning, m.reasoning_tokens, m.thought_s, m.stopped)


class Store:
    """Named chats in one SQLite file: `save`, `load`, `names`, `delete`, `export_markdown`."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else data_dir() / DB_NAME
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise QwenMLXError(f"cannot create the chat folder {self.path.parent}: {e.strerror}") from None
        try:
            # isolation_level=None: transactions are ours (BEGIN IMMEDIATE), the module opens none behind our back.
            self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as e:
            raise QwenMLXError(f"cannot open the chat database {self.path}: {e}") from None
        try:
            self._setup()
        except sqlite3.DatabaseError as e:
            self._conn.close()
            if isinstance(e, sqlite3.OperationalError):
                raise QwenMLXError(f"cannot open the chat database {self.path}: {e}") from None
            raise QwenMLXError(
                f"{self.path} is not a readable chat database ({e}); move it aside or set {DATA_ENV} to another folder"
            ) from None
        except QwenMLXError:
            self._conn.close()
            raise

    def _setup(self) -> None:
        conn = self._conn
        conn.execute("PRAGMA journal_mode=WAL")  # the first read: a file that is not a database fails here
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA fullfsync=ON")  # macOS: fsync alone does not reach the disk; ignored elsewhere
        conn.execute("PRAGMA foreign_keys=ON")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        self._check_version(version)
        while version < SCHEMA_VERSION:
            with self._transaction():
                version = conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have migrated
                self._check_version(version)
                if version < SCHEMA_VERSION:
                    MIGRATIONS[version](conn)
                    version += 1
                    conn.execute(f"PRAGMA user_version={version}")

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise QwenMLXError(
                f"{self.path} was written by a newer qwen-mlx (schema {version}, this one reads up to "
                f"{SCHEMA_VERSION}); upgrade qwen-mlx"
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        with self._conn:  # commits, or rolls back on an exception
            self._conn.execute("BEGIN IMMEDIATE")
            yield self._conn

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: its reads see one committed version, never half of a save made between them."""
        with self._conn:
            self._conn.execute("BEGIN")
            yield self._conn

    @contextlib.contextmanager
    def _sqlite_errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise QwenMLXError(f"could not {action} in {self.path}: {e}") from None

    def save(self, conversation: Conversation, name: str | None = None) -> Saved:
        """Write `conversation` as `name` (default: its own name), all or nothing, and say where it went.

        It replaces the chat saved under that name only if that is the version the conversation last loaded
        or saved; any other version is kept, and this one goes to the next free name (`Saved.note` says so).
        On success the conversation takes the name it was saved under; on failure it is left as it was.
        """
        wanted = check_name(conversation.name if name is None else name)
        c = conversation
        revision = uuid.uuid4().hex
        note = None
        with self._sqlite_errors(f"save chat {wanted!r}"), self._transaction() as conn:
            target = wanted
            row = conn.execute("SELECT id, revision FROM conversations WHERE name = ?", (wanted,)).fetchone()
            if row is not None and c.saved != SavedVersion(wanted, row[1]):
                target, row = _free_name(conn, wanted), None
                if c.saved is not None and c.saved.name == wanted:
                    note = f"{wanted!r} was saved by another chat since this one opened it; both are kept"
                else:
                    note = f"a chat named {wanted!r} is already saved; it is kept"
                note += f", and this one is now {target!r}"
            # Strictly after every other chat, so names() is in save order even when the clock stalls or steps back.
            last = conn.execute("SELECT max(updated) FROM conversations").fetchone()[0]
            now = time.time() if last is None else max(time.time(), last + 1e-6)
            settings = (c.model, c.system, c.thinking, c.budget, c.temperature, revision, now)
            if row is None:
                conversation_id = conn.execute(
                    """INSERT INTO conversations
                    (model, system, thinking, budget, temperature, revision, updated, name, created)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (*settings, target, now),
                ).lastrowid
            else:
                conversation_id = row[0]
                conn.execute(
                    """UPDATE conversations SET model = ?, system = ?, thinking = ?, budget = ?, temperature = ?,
                    revision = ?, updated = ? WHERE id = ?""",
                    (*settings, conversation_id),
                )
                conn.execute("DELETE FROM messages WHERE conversation = ?", (conversation_id,))
            conn.executemany(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (_message_row(conversation_id, i, m) for i, m in enumerate(c.messages)),
            )
        c.name, c.saved = target, SavedVersion(target, revision)
        return Saved(target, note)

    def load(self, name: str) -> Conversation:
        """The chat saved as `name`; a QwenMLXError naming the saved chats when there is none."""
        with self._sqlite_errors(f"load chat {name!r}"), self._snapshot() as conn:
            row = conn.execute(
                "SELECT id, model, system, thinking, budget, temperature, revision FROM conversations WHERE name = ?",
                (name,),
            ).fetchone()
            if row is None:
                raise self._missing(name)
            conversation_id, model, system, thinking, budget, temperature, revision = row
            messages = [
                Message(role, content, reasoning, reasoning_tokens, thought_s, bool(stopped))
                for role, content, reasoning, reasoning_tokens, thought_s, stopped in conn.execute(
                    """SELECT role, content, reasoning, reasoning_tokens, thought_s, stopped FROM messages
                    WHERE conversation = ? ORDER BY position""",
                    (conversation_id,),
                )
            ]
        saved = SavedVersion(name, revision)
        return Conversation(name, model, system, bool(thinking), budget, temperature, messages, saved)

    def names(self) -> list[str]:
        """Saved chat names, most recently saved first."""
        with self._sqlite_errors("list chats"):
            return [name for (name,) in self._conn.execute("SELECT name FROM conversations ORDER BY updated DESC")]

    def delete(self, name: str) -> None:
        """Remove the chat saved as `name` (its exports stay); a QwenMLXError when there is none."""
        with self._sqlite_errors(f"delete chat {name!r}"), self._transaction() as conn:
            if conn.execute("DELETE FROM conversations WHERE name = ?", (name,)).rowcount == 0:
                raise self._missing(name)

    def _missing(self, name: str) -> QwenMLXError:
        names = self.names()
        if not names:
            return QwenMLXError(f"no saved chat named {name!r}; there are no saved chats yet")
        listed = ", ".join(repr(n) for n in names[:LISTED_NAMES])
        more = f" and {len(names) - LISTED_NAMES} more" if len(names) > LISTED_NAMES else ""
        return QwenMLXError(f"no saved chat named {name!r}; saved chats: {listed}{more}")

    def export_markdown(self, conversation: Conversation, path: str | Path | None = None) -> Path:
        """Write `conversation` as a Markdown transcript and return where; default `exports/<name>.md`.

        A `path` that is a folder gets `<name>.md` inside it. The file appears whole or not at all.
        """
        if conversation.name is None:
            name = datetime.now().strftime("chat-%Y%m%d-%H%M%S")
        else:
            name = check_name(conversation.name)
        if path is None:
            target = self.path.parent / EXPORTS_DIR / f"{name}.md"
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise QwenMLXError(f"cannot create the export folder {target.parent}: {e.strerror}") from None
        else:
            target = Path(path).expanduser()
            if target.is_dir():
                target = target / f"{name}.md"
        _write_atomically(target, to_markdown(conversation, title=name))
        return target

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_atomically(path: Path, text: str) -> None:
    """A temporary file in `path`'s folder, synced, then renamed over `path`: readers see old or new, never half."""
    tmp_name = None
    try:
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as f:
            tmp_name = f.name
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except OSError as e:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
        raise QwenMLXError(f"cannot write {path}: {e.strerror or e}") from None


def _settings_line(c: Conversation) -> str:
    if not c.thinking:
        thinking = "thinking off"
    elif c.budget is None:
        thinking = "thinking on"
    else:
        thinking = f"thinking on, budget {c.budget} tokens"
    temperature = "model's default temperature" if c.temperature is None else f"temperature {c.temperature:g}"
    model = f"`{c.model}`" if c.model else "unknown model"
    return f"Model: {model} · {thinking} · {temperature}"


def to_markdown(conversation: Conversation, title: str | None = None) -> str:
    """A readable transcript: title, model and settings, then `## You` / `## Qwen` turns, reasoning folded."""
    c = conversation
    parts = [f"# {title or c.name or 'Chat'}", _settings_line(c)]
    if c.system:
        parts += ["## System", c.system]
    for m in c.messages:
        parts.append({"user": "## You", "assistant": "## Qwen"}.get(m.role, f"## {m.role.title()}"))
        if m.reasoning:
            # A literal closing tag in the reasoning would end the fold early.
            reasoning = m.reasoning.strip().replace("</details>", "&lt;/details>")
            summary = f"Thought for {m.thought_s:.1f} s · {m.reasoning_tokens} tokens"
            parts.append(f"<details><summary>{summary}</summary>\n\n{reasoning}\n\n</details>")
        if m.content:
            parts.append(m.content.strip())
        if m.stopped:
            parts.append("*(stopped before the end)*")
    return "\n\n".join(parts) + "\n"
