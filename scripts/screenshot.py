"""Drive the chat app on the bundled model with Pilot and save the README's screenshot with Textual's
screenshot action. From the repository root: `PYTHONPATH=. .venv/bin/python scripts/screenshot.py docs/chat.svg`."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

from chatrt import ChatRuntime, Config
from tests.ui.pilot import new_session, ready, say, wait_until
from tui import ChatApp
from tui.new_session import load_presets


async def main(out: Path) -> None:
    os.environ["CHATRT_DATA_DIR"] = tempfile.mkdtemp()  # only this chat on screen, not the machine's own chats
    config = Config.load(None).with_values(model={"dtype": "float32"}, generation={"max_new_tokens": 120})
    with ChatRuntime.from_config(config) as rt:
        presets = load_presets()
        # Both sessions start with the "Concise assistant" preset, so the second reuses the first's prefix.
        app = ChatApp(lambda progress: rt, system_prompt=presets[1].system, presets=presets)
        async with app.run_test(size=(150, 46)) as pilot:
            await say(pilot, "What is a KV cache in a language model?")
            await say(pilot, "Why does keeping it between turns make replies faster?")
            await new_session(pilot, "down", "enter")
            await say(pilot, "Give me one tip for writing clear Python.")
            await pilot.press("ctrl+up")
            await say(pilot, "Summarize that in one line.")
            screen = await ready(pilot)
            screen.refresh_stats()
            await pilot.pause(0.5)
            out.unlink(missing_ok=True)
            app.action_screenshot(out.name, str(out.parent))  # saved from a thread, which then notifies
            await wait_until(pilot, lambda: app._notifications)
    print(f"saved {out}")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/chat.svg")))
