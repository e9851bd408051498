"""Compiled decode steps: the replies of the eager forward (except at near-ties, where the top-2 logit gap is
printed), compiled by a process of their own without holding up a reply, kept on disk so a later start loads them,
and only where they pay."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import torch
import transformers

from chatrt import ChatRuntime, Config
from chatrt.cache.kv import new_cache
from chatrt.engine import runner
from chatrt.engine.compiled import CompiledSteps, compilable, package_path
from chatrt.model import LoadedModel
from tests.conftest import assert_greedy
from tests.test_session import random_message


def test_auto_compiles_where_it_pays(tiny_lm, bundled_lm):
    assert "too small" in compilable(tiny_lm, "auto") and compilable(tiny_lm, "on") == ""
    assert compilable(bundled_lm, "auto") == "" and "off" in compilable(bundled_lm, "off")


def test_a_package_is_kept_per_model_size_and_versions(tiny_lm, bundled_lm, tmp_path):
    path = package_path(tiny_lm, 128, tmp_path)
    assert path.parent == tmp_path and path.name.endswith("-128tokens.pt2") and "float32" in path.name
    assert path != package_path(tiny_lm, 256, tmp_path) and path != package_path(bundled_lm, 128, tmp_path)
    assert torch.__version__ in path.name and transformers.__version__ in path.name


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


def compiling(tmp_path: Path, **engine: object) -> Config:
    return Config().with_values(generation={"max_new_tokens": 16}, model={"cache_dir": str(tmp_path)},
                                engine={"compile": "on", **engine})  # fmt: skip


def test_compiled_steps_give_the_eager_replies_batched_and_alone_and_never_make_a_reply_wait(tiny_lm, tmp_path):
    with ChatRuntime(tiny_lm, compiling(tmp_path, max_batch=4)) as rt:
        compiled = rt.engine.compiled
        assert compiled is not None
        s = rt.open_session()
        started = time.perf_counter()
        first = s.send("hello there")  # answered eagerly while the step compiles
        assert not compiled.wait(0) and compiled.steps == 0, "the reply waited for the compiler"
        assert rt.stats().decode_step == "compiling"
        assert_greedy(tiny_lm, s.template.render(s.transcript[:-1]), first.token_ids, 16)
        assert compiled.wait(600) and compiled.error == "" and compiled.how == "compiled", compiled.describe()
        waited = time.perf_counter() - started
        print(f"\nfirst reply in {first.stats.e2e_s:.2f} s; {compiled.describe()} (ready after {waited:.0f} s)")
        identical = 0
        for n, seed in [(1, 0), (3, 1), (4, 2)]:  # a lone row, some rows, every row
            for session, reply in replies_at_once(rt, n, seed):
                prompt = session.template.render(session.transcript[:-1])
                identical += assert_greedy(tiny_lm, prompt, reply.token_ids, 16)
        assert compiled.steps > 0 and rt.stats().decode_step == "compiled"
        # As on a machine where prompts ran faster eagerly: decoding rows compiled, prompt chunks eager beside them.
        assert compiled.prompt_tokens > 0  # the tiny model's eager forward is all overhead
        compiled.prompt_tokens, steps = 0, compiled.steps
        for session, reply in replies_at_once(rt, 3, 3):
            prompt = session.template.render(session.transcript[:-1])
            identical += assert_greedy(tiny_lm, prompt, reply.token_ids, 16)
        assert compiled.steps > steps
        print(f"compiled: {identical}/11 replies identical to eager")
        # One step of a decoding row and a prompt chunk: the row compiled, the chunk eagerly, each as eager would.
        decoding, prompting = new_cache(), new_cache()
        runner.forward(tiny_lm, decoding, [1, 2, 3])
        rows, before = [(decoding, [4]), (new_cache(), [5, 6, 7, 8])], compiled.steps
        logits = runner.run(tiny_lm, rows, compiled)  # [2, V]
        runner.forward(tiny_lm, prompting, [1, 2, 3])
        expected = torch.stack([runner.forward(tiny_lm, prompting, [4]),
                                runner.forward(tiny_lm, new_cache(), [5, 6, 7, 8])])  # fmt: skip
        assert compiled.steps == before + 1  # the decoding row went through the graph
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
        assert [c.get_seq_length() for c, _ in rows] == [4, 4]
    # A later start (another process, or this one with the model loaded again) loads the kept package.
    again = CompiledSteps(tiny_lm, compiled.tokens, compiled.path, runner.forward)
    assert again.wait(60) and again.how == "loaded" and again.error == "", again.describe()
    assert again.seconds < compiled.seconds / 4
    # A damaged package (a crash mid-copy, a disk error) is built again, not trusted and not fatal.
    compiled.path.write_bytes(b"not a package")
    rebuilt = CompiledSteps(tiny_lm, compiled.tokens, compiled.path, runner.forward)
    assert rebuilt.wait(600) and rebuilt.how == "compiled" and rebuilt.ready, rebuilt.describe()


def test_a_step_that_cannot_compile_says_why_and_runs_eagerly(tiny_lm, tmp_path):
    (tmp_path / "compiled").write_text("a file where the folder should be")
    with ChatRuntime(tiny_lm, compiling(tmp_path, max_batch=2)) as rt:
        compiled = rt.engine.compiled
        assert compiled is not None and compiled.wait(60)
        assert "failed" in compiled.describe() and compiled.error and not compiled.ready
        assert rt.stats().decode_step == "eager"
        s = rt.open_session()
        reply = s.send("hello there")
        assert_greedy(tiny_lm, s.template.render(s.transcript[:-1]), reply.token_ids, 16)


def test_the_bundled_model_compiled_answers_as_eager(bundled_lm: LoadedModel, tmp_path):
    config = compiling(tmp_path, max_batch=1).with_values(generation={"max_new_tokens": 24}, engine={"compile": "auto"})
    with ChatRuntime(bundled_lm, config) as rt:
        compiled = rt.engine.compiled
        assert compiled is not None and compiled.wait(900) and compiled.error == "", compiled.describe()
        s = rt.open_session(system_prompt="You are a geography teacher.")
        for question in ["What is the capital of France?", "And of Italy?"]:
            reply = s.send(question)
            assert_greedy(bundled_lm, s.template.render(s.transcript[:-1]), reply.token_ids, 24)
        assert compiled.steps >= 40
