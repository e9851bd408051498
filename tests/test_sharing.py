"""Sessions share KV by reference: a shared prefix is stored once, whatever number of sessions start from it."""

import gc
import time

import pytest

from chatrt import ChatRuntime, Config
from tests.test_session import assert_exact

SYSTEM = " ".join(f"Rule {i}: answer politely and briefly about topic number {i}." for i in range(76))


def resident() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) * 1024


def test_a_session_on_a_shared_prefix_references_its_tensors_and_replies_exactly(runtime):
    first, second = runtime.open_session(system_prompt="Be brief."), runtime.open_session(system_prompt="Be brief.")
    assert_exact(first, first.send("hello"), 12)
    reply = second.send("hello there")
    assert_exact(second, reply, 12)
    assert reply.stats.reused_prefix_tokens > 0
    a, b = first.kv, second.kv
    assert a.shared and b.shared and a.shared[0].keys[0] is b.shared[0].keys[0]  # the same tensors, not copies
    assert a.nbytes == (len(a) - a.shared_len) * runtime.lm.info.kv_bytes_per_token  # its own tokens only
    assert_exact(second, second.send("and again"), 12)  # its next turn starts from its own KV and the shared one


def test_sixteen_sessions_on_one_long_system_prompt_hold_it_once(bundled_lm):
    """The issue's measure: 16 sessions, one short turn each on a ~1,200-token system prompt, hold the least KV
    possible (the prompt once, plus each one's own tokens) within 1.3x, counted and resident."""
    config = Config().with_values(generation={"max_new_tokens": 4}, engine={"compile": "off"})
    with ChatRuntime(bundled_lm, config) as rt:
        warm = rt.open_session(system_prompt="Hi.")
        warm.send("hi")
        warm.close()
        gc.collect()
        before = resident()
        sessions = [rt.open_session(system_prompt=SYSTEM) for _ in range(16)]
        for n, s in enumerate(sessions):
            s.send(f"Hello, I am user {n}.")
        prompt = len(rt.template.prefix_ids(SYSTEM))
        own = sum(len(s.kv) - prompt for s in sessions)
        least = (prompt + own) * bundled_lm.info.kv_bytes_per_token
        counted = rt.stats().kv_bytes
        gc.collect()
        time.sleep(0.5)  # the engine gives freed activations back to the OS as it goes idle
        grown = resident() - before
        print(f"\n{prompt} shared tokens + {own} own: least {least / 2**20:.1f} MiB, counted "
              f"{counted / 2**20:.1f} MiB ({counted / least:.2f}x), resident +{grown / 2**20:.1f} MiB "
              f"({grown / least:.2f}x)")  # fmt: skip
        assert 1150 <= prompt <= 1300
        assert counted <= 1.3 * least
        assert grown <= 1.3 * least


@pytest.mark.parametrize("tier", ["host", "redis"])
def test_a_session_moved_down_keeps_referencing_the_shared_prefix(tiny_lm, redis_url, tier):
    from tests.conftest import tiered

    with tiered(tiny_lm, redis_url) as rt:
        s = rt.open_session(system_prompt="Share this prompt with everyone.")
        s.send("hello")
        before = s.kv
        assert rt.tiers.demote(s.id) == "host"
        if tier == "redis":
            assert rt.tiers.demote(s.id) == "redis"
            assert rt.tiers.kv_meta(s.id).shared_tokens == before.shared_len  # stored without the shared part
            # restored, not recomputed, however busy the machine is: the bandwidth, and the round trip a probe
            # may have measured while the machine was loaded (a tiny model prefills 33 tokens in about a ms)
            rt.tiers.cost.observe("redis", 1e12, 1.0)
            rt.tiers.cost.set_latency("redis", 0.0)
        reply = s.send("still there?")
        assert reply.stats.kv_source == tier and reply.stats.reused_session_tokens == len(before)
        assert_exact(s, reply, 12)
        assert s.kv.shared[0].keys[0] is before.shared[0].keys[0]  # joined again to the tensors it shared


def test_a_fork_shares_its_parents_kv_and_both_go_on_exactly(runtime):
    parent = runtime.open_session(system_prompt="Be brief.")
    parent.send("hello")
    parent.send("tell me more")
    before = runtime.stats().kv_bytes
    child = parent.fork()
    assert child.messages == parent.messages and child.id != parent.id and child.turns == parent.turns == 2
    assert child.kv.ids == parent.kv.ids and child.kv.nbytes == parent.kv.nbytes == 0  # both reference it
    assert runtime.stats().kv_bytes == before  # nothing was copied
    reply = child.send("and then?")
    assert_exact(child, reply, 12)
    new = len(runtime.template.render([*child.transcript[:-1]])) - len(parent.kv)  # the new message, templated
    assert reply.stats.prefilled_tokens <= new and reply.stats.reused_tokens == len(parent.kv)
    assert_exact(parent, parent.send("something else"), 12)  # the parent goes on its own way
    assert child.messages[-2].content == "and then?" and parent.messages[-2].content == "something else"
    parent.close()  # what the fork still references stays
    assert_exact(child, child.send("still here?"), 12)


def test_a_fork_of_a_session_whose_kv_is_not_in_memory_computes_it_on_its_first_turn(tiny_lm):
    from tests.conftest import tiered

    with tiered(tiny_lm) as rt:
        parent = rt.open_session(system_prompt="Be brief.")
        parent.send("hello")
        assert rt.tiers.demote(parent.id) == "host" and rt.tiers.demote(parent.id) == "none"  # no Redis: dropped
        assert parent.kv is None
        child = parent.fork(session_id="branch")
        assert child.id == "branch" and child.kv is None
        assert_exact(child, child.send("and then?"), 12)


def test_a_fork_on_the_bundled_model_replies_exactly(bundled_runtime):
    parent = bundled_runtime.open_session(system_prompt="You are a helpful assistant.")
    parent.send("Name a fruit.")
    child = parent.fork()
    reply = child.send("Name another one.")
    assert reply.stats.reused_tokens == len(parent.kv)
    assert_exact(child, reply, 24)


HISTORY = [("Hello there!", "Hi! How can I help?"), ("What is the sea?", "A great body of salt water."),
           ("And the sky?", "The air above us."), ("Tell me more.", "It looks blue by day.")]  # fmt: skip


def turns(pairs):  # type: ignore[no-untyped-def]
    return [m for user, reply in pairs for m in ({"role": "user", "content": user},
                                                 {"role": "assistant", "content": reply})]  # fmt: skip


def test_a_new_session_starts_from_another_sessions_cache_up_to_where_their_conversations_part(runtime):
    """A stateless client's edit of turn 2 of 4: a new session with turns 1 and an edited 2 starts from the
    cache of the session that holds all four, up to the edited message, exactly."""
    whole = runtime.open_session("Be brief.", messages=turns(HISTORY))
    whole.send("Thanks, bye.")
    edited = runtime.open_session("Be brief.", messages=turns(HISTORY[:1]))
    reply = edited.send("What is the ocean?")
    assert_exact(edited, reply, 12)
    before_edit = len(runtime.template.render(edited.transcript[:2 + 1]))  # the system prompt and turn 1
    assert reply.stats.reused_prefix_tokens >= before_edit
    elsewhere = runtime.open_session("Be brief.", messages=turns(HISTORY[:1]), cache_scope="another tenant")
    apart = elsewhere.send("What is the ocean?")
    assert_exact(elsewhere, apart, 12)
    assert apart.stats.reused_prefix_tokens == len(runtime.template.prefix_ids("Be brief."))  # its own scope's only
