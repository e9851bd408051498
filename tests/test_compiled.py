"""Compiled decode steps: the replies of the eager forward (except at near-ties, where the top-2 logit gap is
printed), compiled in the background without holding up a reply, and only where they pay."""

from __future__ import annotations

import random
import threading

from chatrt import ChatRuntime, Config
from chatrt.engine.compiled import buckets, compilable
from tests.conftest import assert_greedy
from tests.test_session import random_message


def test_buckets_cover_every_batch_size():
    assert buckets(1) == [1] and buckets(16) == [1, 2, 4, 8, 16] and buckets(6) == [1, 2, 4, 6]


def test_auto_compiles_where_it_pays(tiny_lm, bundled_lm):
    assert "too small" in compilable(tiny_lm, "auto") and compilable(tiny_lm, "on") == ""
    assert compilable(bundled_lm, "auto") == "" and "off" in compilable(bundled_lm, "off")


def replies_at_once(rt: ChatRuntime, n: int, seed: int) -> list:  # type: ignore[type-arg]
    rng = random.Random(seed)
    sessions = [rt.open_session() for _ in range(n)]
    out: list = [None] * n  # type: ignore[type-arg]
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, (sessions[i], sessions[i].send(
        random_message(rng))))) for i in range(n)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_compiled_steps_give_the_eager_replies_batched_and_alone_and_never_make_a_reply_wait(tiny_lm):
    config = Config().with_values(generation={"max_new_tokens": 16}, engine={"compile": "on", "max_batch": 4})
    with ChatRuntime(tiny_lm, config) as rt:
        compiled = rt.engine.compiled
        assert compiled is not None
        s = rt.open_session()
        first = s.send("hello there")  # answered eagerly while the graphs compile
        assert not compiled.wait(0) and compiled.steps == 0
        assert_greedy(tiny_lm, s.template.render(s.transcript[:-1]), first.token_ids, 16)
        assert compiled.wait(600) and compiled.error == "" and set(compiled.ready) == {1, 2, 4}
        identical = 0
        for n, seed in [(1, 0), (3, 1), (4, 2)]:  # a lone row, a padded bucket, a full one
            for session, reply in replies_at_once(rt, n, seed):
                prompt = session.template.render(session.transcript[:-1])
                identical += assert_greedy(tiny_lm, prompt, reply.token_ids, 16)
        assert compiled.steps > 0
        print(f"\ncompiled: {identical}/8 replies identical to eager; {compiled.describe()}")


def test_the_bundled_model_compiled_answers_as_eager(bundled_lm):
    config = Config().with_values(generation={"max_new_tokens": 24}, engine={"compile": "auto", "max_batch": 1})
    with ChatRuntime(bundled_lm, config) as rt:
        compiled = rt.engine.compiled
        assert compiled is not None and compiled.wait(900) and compiled.error == "", compiled.describe()
        s = rt.open_session(system_prompt="You are a geography teacher.")
        for question in ["What is the capital of France?", "And of Italy?"]:
            reply = s.send(question)
            assert_greedy(bundled_lm, s.template.render(s.transcript[:-1]), reply.token_ids, 24)
        assert compiled.steps >= 40
