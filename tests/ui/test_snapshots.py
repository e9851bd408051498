"""Snapshots of the app's screens (pytest-textual-snapshot): a layout change shows up as a failing diff.

After an intended change, review the new look and accept it with `pytest tests/ui --snapshot-update`.
Timings differ per run, so screens with the per-turn stats table are not snapshotted after a turn.
"""

from __future__ import annotations

import pytest

from chatrt import ModelLoadError
from tests.ui.pilot import chat_app, notifications, ready, say, wait_until
from tui import ChatApp
from tui.confirm import ConfirmScreen
from tui.new_session import NewSessionScreen, Preset
from tui.rename import RenameScreen
from tui.settings import SettingsScreen

SIZE = (120, 34)
PRESETS = [Preset(name="Model default", system=""), Preset(name="Pirate", system="You talk like a pirate.")]


def test_main_screen_before_the_first_message(snap_compare, runtime):
    async def run_before(pilot) -> None:
        await ready(pilot)

    assert snap_compare(chat_app(runtime, presets=PRESETS), terminal_size=SIZE, run_before=run_before)


def test_main_screen_with_a_conversation_and_two_sessions(snap_compare, runtime):
    async def run_before(pilot) -> None:
        await say(pilot, "What is a KV cache?")
        await say(pilot, "Why keep it between turns?")
        await pilot.press("ctrl+n")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, NewSessionScreen))
        await pilot.press("down", "enter")
        await say(pilot, "Ahoy!")
        await pilot.press("ctrl+up", "ctrl+t")  # back to the first session, stats hidden

    assert snap_compare(chat_app(runtime, presets=PRESETS), terminal_size=SIZE, run_before=run_before)


def dialog(key: str, screen: type):  # type: ignore[no-untyped-def]
    """A run_before that opens a dialog from the main screen, before any turn (no timings on screen)."""

    async def run_before(pilot) -> None:
        await ready(pilot)
        await pilot.press(key)
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, screen))

    return run_before


@pytest.mark.parametrize(
    ("key", "screen"),
    [("ctrl+n", NewSessionScreen), ("ctrl+g", SettingsScreen), ("f2", RenameScreen)],
    ids=["new_session", "settings", "rename"],
)
def test_dialogs_render_whole(snap_compare, runtime, key, screen):
    assert snap_compare(chat_app(runtime, presets=PRESETS), terminal_size=SIZE, run_before=dialog(key, screen))


def test_a_failed_load(snap_compare):
    def load(progress):
        raise ModelLoadError("no model in /nowhere; pass --model with a transformers folder or a .gguf file")

    async def run_before(pilot) -> None:
        await wait_until(pilot, lambda: notifications(pilot.app))

    assert snap_compare(ChatApp(load, presets=PRESETS), terminal_size=SIZE, run_before=run_before)


def test_close_confirmation_dialog_shows_its_whole_question(snap_compare, runtime):
    async def run_before(pilot) -> None:
        await say(pilot, "Hello there")
        await pilot.press("ctrl+t", "ctrl+w")  # stats hidden: their timings differ per run
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen))

    assert snap_compare(chat_app(runtime, presets=PRESETS), terminal_size=SIZE, run_before=run_before)
