"""Chats that outlast the app: each chat's title, system prompt, settings and transcript in SQLite (stdlib
sqlite3) in the user's data folder, as oterm and elia keep theirs. The transcript is enough: a reopened chat's
KV is computed again (or restored from Redis, when configured), as for any resumed session.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
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
    updated real not null
)
"""


class StoredChat(BaseModel):
    id: str
    """The session id the chat reopens as."""
    title: str
    system_prompt: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    """Turn options of this chat (temperature, top_p, ...), applied to each of its turns."""
    messages: list[Message] = Field(default_factory=list)
    created: float = Field(default_factory=time.time)
    updated: float = Field(default_factory=time.time)


def data_dir() -> Path:
    """$CHATRT_DATA_DIR, else $XDG_DATA_HOME/chatrt, else ~/.local/share/chatrt."""
    if folder := os.environ.get("CHATRT_DATA_DIR"):
        return Path(folder)
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "chatrt"


class ChatStore:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or data_dir() / "chats.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        with self._db:
            self._db.execute(_SCHEMA)

    def chats(self) -> list[StoredChat]:
        """Every chat, least recently updated first (the sidebar's order)."""
        rows = self._db.execute(
            "select id, title, system_prompt, settings, messages, created, updated from chats order by updated"
        )
        return [
            StoredChat(
                id=i, title=t, system_prompt=s, settings=json.loads(o), messages=json.loads(m), created=c, updated=u
            )
            for i, t, s, o, m, c, u in rows
        ]

    def save(self, chat: StoredChat) -> None:
        """Insert or replace the chat (its token ids are not kept: text is the transcript)."""
        messages = [{"role": m.role, "content": m.content} for m in chat.messages]
        with self._db:
            self._db.execute(
                "insert or replace into chats values (?, ?, ?, ?, ?, ?, ?)",
                (
                    chat.id,
                    chat.title,
                    chat.system_prompt,
                    json.dumps(chat.settings),
                    json.dumps(messages),
                    chat.created,
                    time.time(),
                ),
            )

    def delete(self, chat_id: str) -> None:
        with self._db:
            self._db.execute("delete from chats where id = ?", (chat_id,))

    def close(self) -> None:
        self._db.close()


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
