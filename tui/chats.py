"""Chats that outlast the app: each chat's title, system prompt, settings and transcript in SQLite (stdlib
sqlite3) in the user's data folder, as oterm and elia keep theirs. The transcript is enough: a reopened chat's
KV is computed again (or restored from Redis, when configured), as for any resumed session.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from chatrt.message import Message

_SCHEMA = """
create table if not exists chats (
    id text primary key,
    title text not null,
    system_prompt text,
    settings text not null,
    messages text not null,
    created real not null,
    updated real not null,
    version integer not null default 0
)
"""
_COLUMNS = "id, title, system_prompt, settings, messages, created, updated, version"


class StoredChat(BaseModel):
    id: str
    """The chat's id: the session id it reopens as."""
    title: str
    system_prompt: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    """Turn options of this chat (temperature, top_p, ...), applied to each of its turns."""
    messages: list[Message] = Field(default_factory=list)
    created: float = Field(default_factory=time.time)
    updated: float = Field(default_factory=time.time)
    version: int = 0
    """How many times it was saved (0: never): a save over a version another window wrote is a conflict."""


class ChatStoreError(Exception):
    """A chat could not be saved or deleted; the message says why, for a notification."""


def data_dir() -> Path:
    """$CHATRT_DATA_DIR, else $XDG_DATA_HOME/chatrt, else ~/.local/share/chatrt."""
    if folder := os.environ.get("CHATRT_DATA_DIR"):
        return Path(folder)
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "chatrt"


class ChatStore:
    """Chats in SQLite. Whatever is wrong with the file (a path that is a folder's, a corrupt or unreadable
    database, a read-only folder, a row that does not parse), the store opens with what it can read, in memory
    when it cannot write, and says so in `problems` for the app to show; it never raises at start."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or data_dir() / "chats.db"
        self.problems: list[str] = []
        """What went wrong opening or reading the store, for notifications (taken by `take_problems`)."""
        self.persistent = True
        """False when this run's chats are kept in memory only."""
        self._db = self._open()

    def chats(self) -> list[StoredChat]:
        """Every chat that can be read, least recently updated first (the sidebar's order); a row that cannot
        be read is left as it is and named in `problems`."""
        out = []
        for row in self._db.execute(f"select {_COLUMNS} from chats order by updated"):
            try:
                out.append(_chat(row))
            except (ValueError, TypeError) as e:  # JSONDecodeError and pydantic's ValidationError among them
                self.problems.append(f"the chat {row[1]!r} could not be read ({type(e).__name__}); it is left as it "
                                     f"is in {self.path}")  # fmt: skip
        return out

    def save(self, chat: StoredChat) -> StoredChat:
        """Store the chat (its token ids are not kept: text is the transcript); returns it as stored. When another
        window saved this chat since this one read it, both are kept: this one is stored as a new chat, which is
        returned (its id and title say so). Raises ChatStoreError when it cannot be written."""
        messages = json.dumps([{"role": m.role, "content": m.content} for m in chat.messages])
        row = (chat.title, chat.system_prompt, json.dumps(chat.settings), messages, chat.created, time.time())
        try:
            with self._db:
                done = self._db.execute(
                    "update chats set title = ?, system_prompt = ?, settings = ?, messages = ?, created = ?, "
                    "updated = ?, version = version + 1 where id = ? and version = ?", (*row, chat.id, chat.version)
                ).rowcount  # fmt: skip
                if done:
                    return chat.model_copy(update={"version": chat.version + 1})
                taken = self._db.execute("select 1 from chats where id = ?", (chat.id,)).fetchone()
                if taken:  # another window saved it meanwhile: keep both
                    chat = chat.model_copy(update={"id": f"{chat.id}-{uuid.uuid4().hex[:6]}",
                                                   "title": f"{chat.title} (another window)"})  # fmt: skip
                    row = (chat.title, *row[1:])
                self._db.execute(f"insert into chats ({_COLUMNS}) values (?, ?, ?, ?, ?, ?, ?, 1)", (chat.id, *row))
                return chat.model_copy(update={"version": 1})
        except sqlite3.Error as e:
            raise ChatStoreError(f"the chat {chat.title!r} could not be saved to {self.path}: {e}") from None

    def delete(self, chat_id: str) -> None:
        try:
            with self._db:
                self._db.execute("delete from chats where id = ?", (chat_id,))
        except sqlite3.Error as e:
            raise ChatStoreError(f"the chat could not be deleted from {self.path}: {e}") from None

    def take_problems(self) -> list[str]:
        problems, self.problems = self.problems, []
        return problems

    def close(self) -> None:
        self._db.close()

    def _open(self) -> sqlite3.Connection:
        """The database at `path`; else what can be read of it, in memory."""
        db = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False)
            with db:
                db.execute(_SCHEMA)
                columns = [c[1] for c in db.execute("pragma table_info(chats)")]
                if "version" not in columns:  # a store written before chats had versions
                    db.execute("alter table chats add column version integer not null default 0")
            with db:  # a read-only file or folder opens, and fails only at the first save: find out now
                db.execute("create table if not exists chatrt_probe (x)")
                db.execute("drop table chatrt_probe")
            return db
        except sqlite3.DatabaseError as e:
            if db is not None:
                db.close()
            if not isinstance(e, sqlite3.OperationalError) and self._set_aside():
                return self._open()
            return self._in_memory(f"{self.path} cannot be written ({e})")
        except OSError as e:
            return self._in_memory(f"the data folder {self.path.parent} cannot be used ({e.strerror or e})")

    def _set_aside(self) -> bool:
        """A file that is not a database: kept under another name, and a new store started in its place."""
        aside = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}")
        try:
            self.path.rename(aside)
        except OSError:
            return False
        self.problems.append(f"{self.path} was not a readable chat store; it is kept as {aside.name} and a new one "
                             "was started")  # fmt: skip
        return True

    def _in_memory(self, why: str) -> sqlite3.Connection:
        """This run's chats in memory, starting from whatever of the file can be read."""
        self.persistent = False
        db = sqlite3.connect(":memory:", check_same_thread=False)
        with db:
            db.execute(_SCHEMA)
        kept = 0
        try:
            with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)) as old:
                columns = [c[1] for c in old.execute("pragma table_info(chats)")]
                wanted = [c if c in columns else "0" for c in _COLUMNS.split(", ")]
                rows = old.execute(f"select {', '.join(wanted)} from chats").fetchall()
            with db:
                db.executemany(f"insert into chats ({_COLUMNS}) values (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            kept = len(rows)
        except (sqlite3.Error, OSError):
            pass
        self.problems.append(f"{why}: chats are kept in memory for this run only"
                             + (f" ({kept} read from the file)" if kept else ""))  # fmt: skip
        return db


def _chat(row: tuple[Any, ...]) -> StoredChat:
    i, title, system_prompt, settings, messages, created, updated, version = row
    return StoredChat(id=i, title=title, system_prompt=system_prompt, settings=json.loads(settings),
                      messages=json.loads(messages), created=created, updated=updated, version=version)  # fmt: skip


def markdown(chat: StoredChat) -> str:
    """The chat as a Markdown document: its title, the system prompt, then each message under its speaker."""
    parts = [f"# {chat.title}", ""]
    if chat.system_prompt:
        parts += ["> **system:** " + chat.system_prompt.replace("\n", "\n> "), ""]
    for m in chat.messages:
        parts += [f"**{'you' if m.role == 'user' else 'assistant'}:**", "", m.content, ""]
    return "\n".join(parts)


def export_name(title: str) -> str:
    """A file name from a chat's title."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower()[:60] or "chat"
    return f"chat-{slug}.md"
