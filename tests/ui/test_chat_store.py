"""The chat store as the app meets it: a corrupt file, a bad row, a read-only folder, a data path that is a
file, and two windows continuing one chat. Each is a notification; the app runs with what it can read (in
memory when it cannot write), and no window's turns are lost."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from chatrt import ChatRuntime, Config
from tests.ui.pilot import chat_app, notifications, ready, say
from tui.chats import ChatStore, StoredChat

SIZE = (140, 40)


def kept(folder: Path, *chats: StoredChat) -> None:
    store = ChatStore(folder / "chats.db")
    for chat in chats:
        store.save(chat)
    store.close()


def chat(title: str, *texts: str) -> StoredChat:
    roles = ["user", "assistant"] * len(texts)
    return StoredChat(id=title.lower().replace(" ", "-"), title=title,
                      messages=[{"role": r, "content": t} for r, t in zip(roles, texts, strict=False)])  # fmt: skip


def titles(screen) -> list[str]:
    return [c.title for c in screen.conversations()]


async def test_a_corrupt_store_is_set_aside_and_a_new_one_started(runtime, data_dir):
    data_dir.mkdir(parents=True)
    (data_dir / "chats.db").write_bytes(b"this is not a database" * 100)
    async with chat_app(runtime).run_test(size=SIZE) as pilot:
        await say(pilot, "hello")
        assert any("not a readable chat store" in n for n in notifications(pilot.app))
    assert [p.name for p in data_dir.iterdir() if p.name.startswith("chats.db.unreadable-")]
    assert [c.messages[0].content for c in ChatStore().chats()] == ["hello"]


async def test_a_row_that_does_not_parse_is_named_and_the_others_open(runtime, data_dir):
    kept(data_dir, chat("Good chat", "hi", "hello"), chat("Bad chat", "a", "b"))
    with contextlib.closing(sqlite3.connect(data_dir / "chats.db")) as db, db:
        db.execute("update chats set settings = '{not json' where title = 'Bad chat'")
    async with chat_app(runtime).run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        assert titles(screen) == ["Good chat"]
        assert any("'Bad chat' could not be read" in n for n in notifications(pilot.app))
        await say(pilot, "still here")


@contextlib.contextmanager
def read_only(folder: Path):
    """The folder and its files made unwritable: chattr +i as root (who ignores modes), modes otherwise."""
    paths = [folder, *folder.iterdir()]
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True).returncode != 0:
            pytest.skip("root, and this filesystem has no immutable attribute: nothing here is read-only")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", *map(str, paths)], check=True)
    else:
        for p in paths:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield
        finally:
            for p in paths:
                p.chmod(0o755 if p.is_dir() else 0o644)


async def test_a_read_only_folder_keeps_chats_in_memory_and_says_so(runtime, data_dir):
    kept(data_dir, chat("Old chat", "hi", "hello"))
    with read_only(data_dir):
        async with chat_app(runtime).run_test(size=SIZE) as pilot:
            screen = await ready(pilot)
            assert titles(screen) == ["Old chat"]  # what could be read
            assert any("kept in memory" in n for n in notifications(pilot.app))
            await say(pilot, "a new turn")  # saved in memory: no error
            assert not any("could not be saved" in n for n in notifications(pilot.app))
    assert [len(c.messages) for c in ChatStore().chats()] == [2]  # the file is as it was


async def test_a_data_path_that_is_a_file_is_a_notification(runtime, data_dir):
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    data_dir.write_text("I am a file")
    async with chat_app(runtime).run_test(size=SIZE) as pilot:
        await say(pilot, "hello")
        assert any("cannot be used" in n and "kept in memory" in n for n in notifications(pilot.app))


async def test_two_windows_continuing_one_chat_keep_both(tiny_lm, data_dir):
    kept(data_dir, chat("Shared chat", "hi", "hello"))
    config = Config().with_values(generation={"max_new_tokens": 6})
    with ChatRuntime(tiny_lm, config) as rt1, ChatRuntime(tiny_lm, config) as rt2:  # two processes' runtimes
        async with chat_app(rt1).run_test(size=SIZE) as one, chat_app(rt2).run_test(size=SIZE) as two:
            for pilot, text in [(one, "from window one"), (two, "from window two"), (one, "one again")]:
                await say(pilot, text)
            assert any("another window saved 'Shared chat'" in n for n in notifications(two.app))
            assert titles(two.app.screen) == ["Shared chat (another window)"]
    stored = {c.title: [m.content for m in c.messages if m.role == "user"] for c in ChatStore().chats()}
    assert stored == {"Shared chat": ["hi", "from window one", "one again"],
                      "Shared chat (another window)": ["hi", "from window two"]}  # fmt: skip


def test_the_store_reopens_a_store_written_before_versions(data_dir):
    data_dir.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(data_dir / "chats.db")) as db, db:
        db.execute("create table chats (id text primary key, title text not null, system_prompt text, settings "
                   "text not null, messages text not null, created real not null, updated real not null)")
        db.execute("insert into chats values ('a', 'Old', null, '{}', '[]', 1, 1)")
    store = ChatStore()
    assert [(c.title, c.version) for c in store.chats()] == [("Old", 0)] and store.problems == []
    assert store.save(store.chats()[0]).version == 1


