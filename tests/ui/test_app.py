"""The chat app driven by Pilot against a runtime on the tiny model: every action a user has, as they use it."""

from __future__ import annotations

import pytest
from textual.widgets import OptionList

from chatrt import ChatRuntime, Config, ModelLoadError
from tests.conftest import reference_reply
from tests.test_session import assert_kv_agrees
from tests.ui.pilot import (
    bubbles,
    chat_app,
    new_session,
    notifications,
    ready,
    say,
    start_reply,
    text_of,
    transcript,
    wait_until,
)
from tui import ChatApp
from tui.chat_screen import ChatScreen, model_title
from tui.confirm import ConfirmScreen
from tui.conversation import Bubble
from tui.loading import LoadingScreen
from tui.new_session import NewSessionScreen, Preset
from tui.prompt_input import PromptInput
from tui.sidebar import SessionItem
from tui.stats_panel import StatsPanel

SIZE = (140, 40)
PRESETS = [Preset(name="Model default", system=""), Preset(name="Pirate", system="You talk like a pirate.")]


@pytest.fixture
def long_runtime(tiny_lm):
    """Replies long enough to be stopped halfway."""
    with ChatRuntime(tiny_lm, Config().with_values(generation={"max_new_tokens": 1500})) as rt:
        yield rt


def assert_last_reply_exact(conversation, max_new_tokens: int) -> None:
    session = conversation.session
    prompt = session.template.render(session.transcript[:-1])
    assert session.messages[-1].token_ids == reference_reply(session.model, prompt, max_new_tokens)


def turn_rows(screen: ChatScreen) -> list[list[str]]:
    table = screen.query_one("#turns")
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


async def test_typing_a_message_streams_the_reply_into_the_conversation(long_runtime):
    async with chat_app(long_runtime).run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        conversation = screen.current
        await pilot.press(*"hi", "space", *"there")
        await pilot.press("enter")
        reply = lambda: conversation.query(Bubble).last()  # noqa: E731
        # Text shows while the reply is still being generated, not only at the end.
        await wait_until(pilot, lambda: conversation.responding and len(reply().source) > 20)
        assert reply().has_class("-streaming")
        await wait_until(pilot, lambda: not conversation.responding, timeout=120)
        assert not reply().has_class("-streaming")
        assert bubbles(conversation) == transcript(conversation)
        assert transcript(conversation)[0] == ("you", "hi there")
        assert_last_reply_exact(conversation, 1500)
        assert screen.query_one(PromptInput).text == ""


async def test_the_stats_panel_shows_each_turn_and_the_second_reuses_the_first(runtime):
    async with chat_app(runtime).run_test(size=SIZE) as pilot:
        conversation = await say(pilot, "What is a cache?")
        await say(pilot, "Why does it help?")
        screen = pilot.app.screen
        first, second = turn_rows(screen)
        assert first[:2] == ["1", "0"] and first[4] == first[5] == str(conversation.turns[0].prompt_tokens)
        assert second[0] == "2" and int(second[1]) == conversation.turns[1].reused_tokens > 0
        assert int(second[4]) == int(second[1]) + int(second[5])  # prompt = reused + prefilled
        assert second[3] == "device"
        heading = str(screen.query_one("#session-heading").render())
        assert "2 turns" in heading and "device" in heading
        shown = text_of(screen.query_one("#runtime").content)
        assert f"{runtime.stats().hit_rate:.1%} of {runtime.stats().prompt_tokens:,} prompt tokens" in shown
        item = screen.query_one(SessionItem)
        assert text_of(item.turns_label.content) == "2 turns" and text_of(item.tier_label.content) == "device"
        assert text_of(item.size_label.content).endswith("KiB")


async def test_the_stats_panel_toggles(runtime):
    async with chat_app(runtime).run_test(size=SIZE) as pilot:
        screen = await ready(pilot)
        panel = screen.query_one(StatsPanel)
        assert panel.display
        await pilot.press("ctrl+t")
        assert not panel.display
        await pilot.press("ctrl+t")
        assert panel.display


async def test_closing_a_session_removes_it_and_frees_its_cache(runtime):
    async with chat_app(runtime, presets=PRESETS).run_test(size=SIZE) as pilot:
        first = await say(pilot, "Keep me")
        screen = pilot.app.screen
        await new_session(pilot, "down", "enter")  # the "Pirate" preset
        second = await say(pilot, "Close me")
        closing = second.session
        assert closing.system_prompt == "You talk like a pirate." and closing.stats().kv_bytes > 0
        device_before = runtime.stats().tiers["device"].bytes
        await pilot.press("ctrl+w")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_until(pilot, lambda: len(screen.conversations()) == 1)
        assert closing.closed and closing.tier == "none"
        assert closing not in runtime.sessions() and first.session in runtime.sessions()
        assert runtime.stats().tiers["device"].bytes == first.session.stats().kv_bytes < device_before
        assert [i.conversation for i in screen.query(SessionItem)] == [first]
        assert screen.current is first
        assert any("freed" in n for n in notifications(pilot.app))


async def test_closing_asks_first_and_no_keeps_the_session(runtime):
    async with chat_app(runtime).run_test(size=SIZE) as pilot:
        conversation = await say(pilot, "Stay")
        await pilot.press("ctrl+w")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen))
        await pilot.press("n")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ChatScreen))
        assert not conversation.session.closed and conversation.session in runtime.sessions()


async def test_closing_the_last_session_opens_a_fresh_one(runtime):
    async with chat_app(runtime).run_test(size=SIZE) as pilot:
        conversation = await say(pilot, "Only one")
        screen = pilot.app.screen
        await pilot.press("ctrl+w", "y")
        await wait_until(pilot, lambda: screen.current is not None and screen.current is not conversation)
        assert len(screen.conversations()) == 1 and runtime.sessions() == [screen.current.session]


async def test_escape_stops_a_long_reply_and_the_next_turn_is_exact(long_runtime):
    async with chat_app(long_runtime).run_test(size=SIZE) as pilot:
        conversation = await start_reply(pilot, "Tell me a long story")
        await pilot.press("escape")
        await wait_until(pilot, lambda: not conversation.responding)
        stopped = conversation.turns[-1]
        assert stopped.finish_reason == "cancelled" and stopped.generated_tokens < 1500
        assert bubbles(conversation) == transcript(conversation)
        last = list(conversation.query(Bubble))[-1]
        assert last.has_class("-stopped") and last.border_subtitle == "stopped"  # not mistaken for a whole reply
        assert len(conversation.session.kv) > stopped.prompt_tokens
        assert_kv_agrees(conversation.session)
        long_runtime.config = long_runtime.config.with_values(generation={"max_new_tokens": 16})
        await say(pilot, "Go on")
        assert conversation.turns[-1].reused_session_tokens > 0
        assert_last_reply_exact(conversation, 16)


async def test_switching_sessions_keeps_each_conversation_intact(runtime):
    async with chat_app(runtime, presets=PRESETS).run_test(size=SIZE) as pilot:
        a = await say(pilot, "I am session A")
        screen = pilot.app.screen
        await new_session(pilot, "enter")  # the first preset: the model's default system prompt
        b = await say(pilot, "I am session B")
        await pilot.press("ctrl+up")
        assert screen.current is a
        await say(pilot, "Still A")
        await pilot.click(screen.query(SessionItem).last())
        await wait_until(pilot, lambda: screen.current is b)
        await pilot.press("ctrl+down")
        assert screen.current is a
        assert [text for role, text in transcript(a) if role == "you"] == ["I am session A", "Still A"]
        assert [text for role, text in transcript(b) if role == "you"] == ["I am session B"]
        for conversation in (a, b):
            assert bubbles(conversation) == transcript(conversation)
        assert a.title == "I am session A" and b.title == "I am session B"


async def test_regenerate_replaces_the_last_reply(runtime):
    async with chat_app(runtime).run_test(size=SIZE) as pilot:
        conversation = await say(pilot, "Tell me something")
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: len(conversation.turns) == 2 and not conversation.responding)
        regen = conversation.turns[-1]
        assert regen.reused_tokens == regen.prompt_tokens - 1  # the whole prompt but the token that yields logits
        assert len(conversation.session.messages) == 2 and bubbles(conversation) == transcript(conversation)
        assert_kv_agrees(conversation.session)  # a sampled reply (see below), whose cache is exactly its tokens


async def test_edit_last_message_puts_it_in_the_input_and_resends_it(runtime):
    async with chat_app(runtime).run_test(size=SIZE) as pilot:
        conversation = await say(pilot, "What is two plus two?")
        await pilot.press("ctrl+e")
        prompt = pilot.app.screen.query_one(PromptInput)
        assert prompt.editing and prompt.text == "What is two plus two?"
        await pilot.press(*["backspace"] * 4, *"three?")
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(conversation.turns) == 2 and not conversation.responding)
        assert transcript(conversation)[0] == ("you", "What is two plus three?")
        assert len(transcript(conversation)) == 2 and bubbles(conversation) == transcript(conversation)
        assert not prompt.editing
        assert_last_reply_exact(conversation, 12)


async def test_escape_cancels_an_edit(runtime):
    async with chat_app(runtime).run_test(size=SIZE) as pilot:
        conversation = await say(pilot, "Keep this")
        await pilot.press("ctrl+e", "escape")
        prompt = pilot.app.screen.query_one(PromptInput)
        assert not prompt.editing and prompt.text == ""
        assert transcript(conversation)[0] == ("you", "Keep this")


async def test_copy_reply_puts_the_last_reply_on_the_clipboard(runtime):
    async with chat_app(runtime).run_test(size=SIZE) as pilot:
        conversation = await say(pilot, "Say something")
        await pilot.press("ctrl+y")
        assert pilot.app.clipboard == conversation.session.messages[-1].content != ""


async def test_new_session_with_a_typed_system_prompt(runtime):
    async with chat_app(runtime, presets=PRESETS).run_test(size=SIZE) as pilot:
        conversation = await new_session(pilot, "tab", *"Be", "space", *"brief.", "ctrl+s")
        assert conversation.session.system_prompt == "Be brief."


async def test_sessions_opened_with_one_preset_share_its_prefix(runtime):
    async with chat_app(runtime, presets=PRESETS).run_test(size=SIZE) as pilot:
        first, second = [await new_session(pilot, "down", "enter") for _ in range(2)]
        for conversation in (first, second):
            pilot.app.screen.show(conversation)
            await say(pilot, "Ahoy")
        assert first.turns[0].reused_prefix_tokens == 0 < second.turns[0].reused_prefix_tokens


async def test_the_command_palette_runs_actions(runtime):
    async with chat_app(runtime).run_test(size=SIZE) as pilot:
        conversation = await say(pilot, "Hello")
        await pilot.press("ctrl+p")
        await pilot.press(*"Regenerate")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(conversation.turns) == 2 and not conversation.responding)
        assert conversation.turns[-1].reused_tokens == conversation.turns[-1].prompt_tokens - 1


async def test_a_context_overflow_is_a_notification_and_the_message_comes_back(tiny_lm):
    config = Config().with_values(generation={"max_new_tokens": 4096})
    with ChatRuntime(tiny_lm, config) as rt:
        async with chat_app(rt).run_test(size=SIZE) as pilot:
            screen = await ready(pilot)
            conversation = screen.current
            screen.query_one(PromptInput).text = "Too much"
            await pilot.press("enter")
            await wait_until(pilot, lambda: notifications(pilot.app))
            await wait_until(pilot, lambda: not conversation.responding)
            assert any("context" in n for n in notifications(pilot.app))
            assert screen.query_one(PromptInput).text == "Too much"
            assert transcript(conversation) == [] == bubbles(conversation)
            assert pilot.app.is_running


async def test_a_model_that_fails_to_load_is_shown_and_the_app_stays_up():
    def load(progress):
        progress("loading a model that is not there")
        raise ModelLoadError("no model in /nowhere; pass --model with a transformers folder or a .gguf file")

    async with ChatApp(load).run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: notifications(pilot.app))
        assert isinstance(pilot.app.screen, LoadingScreen) and pilot.app.is_running
        assert "no model in /nowhere" in text_of(pilot.app.screen.query_one("#progress").content)
        assert any("failed to load" in n for n in notifications(pilot.app))
        await pilot.press("q")
        await wait_until(pilot, lambda: not pilot.app.is_running)


async def test_redis_down_is_a_warning_and_chat_goes_on(tiny_lm):
    config = Config().with_values(generation={"max_new_tokens": 8}, tiers={"redis_url": "redis://127.0.0.1:9/0"})
    with ChatRuntime(tiny_lm, config) as rt:
        async with chat_app(rt).run_test(size=SIZE) as pilot:
            conversation = await say(pilot, "Are you there?")
            await wait_until(pilot, lambda: any("Redis" in n for n in notifications(pilot.app)))
            assert conversation.turns[-1].generated_tokens > 0
            assert rt.stats().tier_counters.redis_errors > 0


async def test_quit_during_a_reply_stops_it_and_keeps_the_session_consistent(long_runtime):
    app = chat_app(long_runtime)
    async with app.run_test(size=SIZE) as pilot:
        conversation = await start_reply(pilot, "Talk")
        await pilot.press("ctrl+q")
        await wait_until(pilot, lambda: not app.is_running)
    assert conversation.session.last_turn.finish_reason == "cancelled"
    assert_kv_agrees(conversation.session)


@pytest.mark.bundled
async def test_chat_on_the_bundled_model_is_exact_and_reuses_the_history(bundled_runtime):
    async with chat_app(bundled_runtime).run_test(size=SIZE) as pilot:
        conversation = await say(pilot, "What is the capital of France?")
        await say(pilot, "And of Italy?")
        first, second = conversation.turns
        assert second.reused_session_tokens >= first.prompt_tokens  # the whole first turn, reply included
        session = conversation.session
        prompt = session.template.render(session.transcript[:-1])
        assert session.messages[-1].token_ids == reference_reply(session.model, prompt, 24, use_cache=True)
        assert bubbles(conversation) == transcript(conversation)
        assert turn_rows(pilot.app.screen)[1][1] == str(second.reused_tokens)


async def test_a_new_chat_starts_from_the_chat_preset_and_the_settings_offer_exact(runtime):
    from chatrt.model import CHAT_SAMPLING
    from tui.settings import SettingsScreen

    async with chat_app(runtime, sampling="chat").run_test(size=SIZE) as pilot:
        await ready(pilot)
        conversation = pilot.app.screen.current
        assert conversation.settings == CHAT_SAMPLING  # the tiny model recommends nothing: the chat preset
        await pilot.press("ctrl+g")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, SettingsScreen))
        assert pilot.app.screen.query_one("#temperature").value == str(CHAT_SAMPLING["temperature"])
        await pilot.click("#exact")
        assert pilot.app.screen.query_one("#temperature").value == "0.0"
        pilot.app.screen.save()
        await wait_until(pilot, lambda: not conversation.settings)  # the runtime's defaults: greedy, exact


@pytest.mark.bundled
def test_the_chat_preset_writes_a_poem_on_the_bundled_model_without_repeating_a_line(bundled_lm):
    """The issue's prompt: greedy and unpenalized, the bundled model loops ("a place where the sea is a place")
    until 256 tokens; the chat preset it gets in a new chat does not repeat a line."""
    from chatrt import ChatRuntime, Config
    from chatrt.model import chat_sampling

    config = Config().with_values(engine={"compile": "off"}, generation={"max_new_tokens": 256, "seed": 0})
    with ChatRuntime(bundled_lm, config) as rt:
        greedy = rt.open_session().send("Write a short poem about the sea")
        reply = rt.open_session().send("Write a short poem about the sea", **chat_sampling(bundled_lm))
    lines = [line.strip() for line in reply.text.splitlines() if line.strip()]
    print(f"\ngreedy: {greedy.stats.generated_tokens} tokens; chat preset: {reply.stats.generated_tokens} tokens:\n"
          f"{reply.text}")  # fmt: skip
    assert len(lines) >= 2 and len(set(lines)) == len(lines)
    assert reply.stats.finish_reason == "stop"


async def test_the_new_session_dialog_opens_on_the_first_preset(runtime):
    async with chat_app(runtime, presets=PRESETS).run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+n")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, NewSessionScreen))
        presets = pilot.app.screen.query_one("#presets", OptionList)
        assert presets.highlighted == 0 and pilot.app.focused is presets
        await pilot.press("enter")  # opens it at once
        await wait_until(pilot, lambda: len(pilot.app.screen.conversations()) == 2)
        assert pilot.app.screen.current.session.system_prompt is None  # "Model default"


async def test_the_title_says_a_gguf_is_dequantized_and_the_footer_offers_quit(runtime):
    info = runtime.lm.info.model_copy(update={"name": "SmolLM2-135M-Instruct.Q4_1", "origin": "GGUF, dequantized"})
    assert model_title(info) == "SmolLM2-135M-Instruct.Q4_1 (GGUF, dequantized) · float32 on cpu"
    async with chat_app(runtime).run_test(size=SIZE) as pilot:
        await ready(pilot)
        footer = [b.description for (_, b, enabled, _) in pilot.app.active_bindings.values() if b.show and enabled]
        assert "Quit" in footer


async def test_a_session_with_no_cache_says_not_cached(runtime):
    async with chat_app(runtime).run_test(size=SIZE) as pilot:
        await ready(pilot)
        item = pilot.app.screen.query_one(SessionItem)
        assert str(item.tier_label.render()) == "not cached"
        assert "not cached" in str(pilot.app.screen.query_one("#session-heading").render())


async def test_chats_survive_a_restart_and_continue_exactly(tiny_lm):
    config = Config().with_values(generation={"max_new_tokens": 12})
    with ChatRuntime(tiny_lm, config) as rt:
        async with chat_app(rt, presets=PRESETS).run_test(size=SIZE) as pilot:
            await say(pilot, "Remember the number 42")
            await new_session(pilot, "down", "enter")  # the "Pirate" preset
            await say(pilot, "Ahoy there")
            before = [(c.title, c.session.system_prompt, bubbles(c)) for c in pilot.app.screen.conversations()]
    with ChatRuntime(tiny_lm, config) as rt:  # a new process, as far as the sessions know
        async with chat_app(rt, presets=PRESETS).run_test(size=SIZE) as pilot:
            screen = await ready(pilot)
            after = [(c.title, c.session.system_prompt, bubbles(c)) for c in screen.conversations()]
            assert after == before
            assert screen.current is screen.conversations()[-1]  # the chat used last
            await pilot.press("ctrl+up")
            conversation = await say(pilot, "What was the number?")
            assert conversation.title == "Remember the number 42" and len(conversation.session.messages) == 4
            assert_last_reply_exact(conversation, 12)


async def test_rename_delete_and_export(runtime, tmp_path, monkeypatch, data_dir):
    from tui.chats import ChatStore
    from tui.rename import RenameScreen

    monkeypatch.chdir(tmp_path)
    async with chat_app(runtime, presets=PRESETS).run_test(size=SIZE) as pilot:
        conversation = await say(pilot, "A chat to keep")
        await pilot.press("f2")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, RenameScreen))
        field = pilot.app.screen.query_one("#title")
        field.value = "Kept chat"
        await pilot.press("enter")
        await wait_until(pilot, lambda: conversation.title == "Kept chat")
        assert [c.title for c in ChatStore().chats()] == ["Kept chat"]
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: (tmp_path / "chat-kept-chat.md").exists())
        exported = (tmp_path / "chat-kept-chat.md").read_text()
        assert exported.startswith("# Kept chat") and "A chat to keep" in exported
        assert conversation.session.messages[-1].content in exported
        await pilot.press("ctrl+w")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_until(pilot, lambda: conversation.session.closed)
        assert ChatStore().chats() == [] and conversation.session not in runtime.sessions()


async def test_settings_change_the_next_reply_and_are_kept(runtime):
    from tui.chats import ChatStore
    from tui.settings import SettingsScreen

    async with chat_app(runtime).run_test(size=SIZE) as pilot:
        conversation = await say(pilot, "Hello")
        await pilot.press("ctrl+g")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, SettingsScreen))
        dialog = pilot.app.screen
        dialog.query_one("#max_new_tokens").value = "3"
        dialog.query_one("#temperature").value = "-1"
        dialog.save()
        assert "temperature" in str(dialog.query_one("#problem").render())  # checked as a turn checks it
        dialog.query_one("#temperature").value = "0.7"
        dialog.query_one("#seed").value = "5"
        dialog.save()
        await wait_until(pilot, lambda: conversation.settings)
        assert conversation.settings == {"max_new_tokens": 3, "temperature": 0.7, "seed": 5}
        await say(pilot, "And now?")
        turn = conversation.turns[-1]
        assert turn.generated_tokens <= 3
        assert ChatStore().chats()[0].settings == conversation.settings  # kept with the chat


async def test_regenerate_at_temperature_zero_samples_and_says_why(runtime):
    async with chat_app(runtime).run_test(size=SIZE) as pilot:
        conversation = await say(pilot, "Hello")
        first = conversation.session.messages[-1].content
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: len(conversation.turns) == 2 and not conversation.responding)
        assert any("greedy decoding gives the same reply" in n for n in notifications(pilot.app))
        assert conversation.session.messages[-1].content != first  # sampled: a different reply
        item = pilot.app.screen.query_one(SessionItem)
        item.sync()
        assert str(item.turns_label.render()) == "1 turn"  # a regenerated reply is not a new turn


@pytest.mark.parametrize(("columns", "at_least"), [(120, 50), (140, 70), (200, 90)])
async def test_the_conversation_stays_readable_beside_the_sidebar_and_stats(runtime, columns, at_least):
    """A reply's bubble keeps `at_least` characters a line with the sidebar and the stats panel both shown."""
    async with chat_app(runtime).run_test(size=(columns, 40)) as pilot:
        conversation = await say(pilot, "What is a cache?")
        screen = pilot.app.screen
        assert screen.query_one("#sidebar").display and screen.query_one(StatsPanel).display
        assert all(b.content_region.width >= at_least for b in conversation.query(Bubble)), columns
        assert "KV from" in [str(c.label) for c in screen.query_one("#turns").columns.values()]
        turns = screen.query_one("#turns")
        assert turns.region.width <= screen.query_one(StatsPanel).region.width  # the table stays in its panel
