"""The engine prefills after a KV, decodes, samples, stops and streams text without splitting characters."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from chatrt.bench import reuse as bench
from chatrt.cache.kv import KV, common_prefix_len
from chatrt.config import EngineConfig, GenerationConfig
from chatrt.engine import Engine, Generation, Request, TextStream, forward, sample
from chatrt.model import LoadedModel
from chatrt.template import ChatTemplate, Message
from tests.conftest import compute_kv, prefill, reference_reply


def alone(lm, gen: Generation) -> tuple[Engine, Request]:
    """The engine with one row and whole-prompt prefill: the batch-1 path, bit for bit a session alone."""
    engine = Engine(lm, EngineConfig(max_batch=1, prefill_chunk=0), thread=False)
    return engine, engine.submit(gen)


def run_alone(lm, gen: Generation) -> str:
    engine, request = alone(lm, gen)
    while engine.scheduler.has_work():
        engine.step()
    return "".join(request.stream())


def test_greedy_generation_on_a_cropped_kv_equals_plain_transformers(tiny_lm):
    prompt = list(range(300, 360))
    for split in (1, 17, 59):
        gen = Generation(
            tiny_lm, compute_kv(tiny_lm, tuple(prompt[:split])), prompt[split:], GenerationConfig(max_new_tokens=10)
        )
        text = run_alone(tiny_lm, gen)
        assert tuple(gen.token_ids) == reference_reply(tiny_lm, prompt, 10)
        assert text == gen.text == tiny_lm.tokenizer.decode(gen.token_ids)
        assert gen.finish_reason in ("length", "stop")
        assert gen.kv.ids == (*prompt, *gen.token_ids[:-1])


def test_repetition_penalty_on_a_reused_kv_equals_plain_transformers(tiny_lm):
    # The prompt ends with what the model would say next, so the penalty has something to change; it must
    # see the cached part of the prompt too, as generate's does.
    head = list(range(300, 330))
    prompt = head + list(reference_reply(tiny_lm, head, 30))
    plain = reference_reply(tiny_lm, prompt, 30)
    for split in (1, len(prompt) - 1):
        kv = compute_kv(tiny_lm, tuple(prompt[:split]))
        gen = Generation(tiny_lm, kv, prompt[split:], GenerationConfig(max_new_tokens=30, repetition_penalty=1.5))
        run_alone(tiny_lm, gen)
        assert tuple(gen.token_ids) == reference_reply(tiny_lm, prompt, 30, repetition_penalty=1.5) != plain


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([2.0, 1.9, -1.0, -1.05])
    p = GenerationConfig(repetition_penalty=1.1)
    assert sample(logits, p, None) == 0  # nothing seen: plain argmax
    assert sample(logits, p, None, torch.tensor([True, False, False, False])) == 1  # 2.0 / 1.1 < 1.9
    only_negatives = torch.tensor([-1.0, -1.05])
    assert sample(only_negatives, p, None, torch.tensor([True, False])) == 1  # -1.1 < -1.05


def test_abandoned_stream_leaves_kv_for_exactly_what_was_fed(tiny_lm):
    gen = Generation(tiny_lm, None, list(range(400, 420)), GenerationConfig(max_new_tokens=50))
    engine, request = alone(tiny_lm, gen)
    for _ in range(3):  # the prompt, then two tokens fed back
        engine.step()
    request.cancel()
    engine.step()
    assert request.ended.is_set() and gen.finish_reason == "cancelled" and len(gen.token_ids) == 3
    assert len(gen.kv) == 20 + len(gen.token_ids) - 1
    assert gen.kv.ids[20:] == tuple(gen.token_ids[:-1])


def test_frequency_and_presence_penalties_subtract_by_count_and_logit_bias_adds():
    """OpenAI's definitions: logit - frequency_penalty * count - presence_penalty * (count > 0), after the bias."""
    logits = torch.tensor([1.0, 2.0, 3.0, 2.9])
    counts = torch.tensor([0.0, 0.0, 2.0, 0.0])
    p = GenerationConfig(frequency_penalty=0.1, presence_penalty=0.0)
    assert sample(logits, p, None, counts=counts) == 3  # 3.0 - 0.2 < 2.9
    p = GenerationConfig(frequency_penalty=0.0, presence_penalty=0.05)
    assert sample(logits, p, None, counts=counts) == 2  # 3.0 - 0.05 > 2.9
    assert sample(logits, GenerationConfig(logit_bias={0: 2.5}), None) == 0
    assert sample(logits, GenerationConfig(logit_bias={2: -100}), None) == 3


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k():
    logits = torch.linspace(0, 5, 100)
    p = GenerationConfig(temperature=1.0, top_k=3, seed=1)
    draws = [sample(logits, p, torch.Generator().manual_seed(7)) for _ in range(5)]
    assert len(set(draws)) == 1
    many = {sample(logits, p, torch.Generator().manual_seed(s)) for s in range(200)}
    assert many <= {97, 98, 99} and len(many) > 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = GenerationConfig(temperature=1.0, top_p=0.7)
    drawn = {sample(logits, p, torch.Generator().manual_seed(s)) for s in range(300)}
    assert drawn == {0, 1}


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9])
    assert sample(logits, GenerationConfig(), None) == 1


def test_text_stream_never_splits_a_multibyte_character(tokenizer):
    text = "naïve 東京 🐱🐶 café"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len([p for p in pieces if p]) > 3  # it streams, not all at the end


def test_stop_string_cuts_the_reply_and_holds_back_partial_matches(tokenizer):
    ids = tokenizer("Hello world. END of text", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, stop=("END",))
    pieces = []
    for i in ids:
        pieces.append(stream.push(i))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    assert "".join(pieces) == "Hello world. "
    assert stream.stopped and stream.text == "Hello world. "


def test_stop_string_split_over_tokens(tokenizer):
    stream = TextStream(tokenizer, stop=("<STOP>",))
    out = ""
    for i in tokenizer("abc <ST", add_special_tokens=False).input_ids:
        out += stream.push(i)
    assert not out.endswith("<ST")  # held back: it may become the stop string
    for i in tokenizer("OP> tail", add_special_tokens=False).input_ids:
        out += stream.push(i)
    out += stream.finish()
    assert out == "abc "


def test_held_back_text_is_released_when_it_is_not_a_stop(tokenizer):
    stream = TextStream(tokenizer, stop=("<STOP>",))
    out = "".join(stream.push(i) for i in tokenizer("a <S b", add_special_tokens=False).input_ids)
    out += stream.finish()
    assert out == "a <S b"


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return float(torch.sum(p.exp() * (p - q)))


@pytest.mark.bundled
def test_bf16_logits_with_reuse_are_as_close_to_fp32_as_bf16_itself(bundled_folder, bundled_lm, tokenizer):
    """bf16 is not exact, so it is judged by closeness: next-token logits computed on a reused cache are
    about as far from fp32 as bf16 computed in one pass, and agree on the greedy token."""
    folder, weights_id = bundled_folder
    bf16 = LoadedModel.wrap(
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16), tokenizer, weights_id=weights_id
    )
    template = ChatTemplate(tokenizer)
    system, users = bench.conversations(bench.Workload(sessions=3, turns=2, user_words=12))
    for questions in users:
        head = [Message(role="system", content=system), Message(role="user", content=questions[0]),
                Message(role="assistant", content="I can help with that.")]  # fmt: skip
        ids = template.render([*head, Message(role="user", content=questions[1])])
        cached = tuple(ids[: common_prefix_len(template.render(head), ids)])  # what the session would reuse
        fp32, _ = prefill(bundled_lm, None, ids)
        one_pass, _ = prefill(bf16, None, ids)
        reused, _ = prefill(bf16, compute_kv(bf16, cached), ids[len(cached) :])
        assert kl(fp32, reused) < 0.01
        assert kl(fp32, reused) <= 3 * max(kl(fp32, one_pass), 1e-4)
        assert int(reused.argmax()) == int(one_pass.argmax()) == int(fp32.argmax())


def test_batched_greedy_replies_equal_unbatched_ones_except_at_near_ties(tiny_lm, monkeypatch):
    """210 turns in batches of 2 to 16, prompts partly cached and prefilled in chunks beside decoding rows, half of
    them on a prefix shared by reference (attended once per step for all its rows, merged by log-sum-exp).
    Batched rows run other matrix shapes, so their logits may differ from batch 1 by ~1e-5: a reply may
    diverge only where the top-2 gap of the unbatched logits at that step is below 1e-3."""
    accept = Generation.accept

    def recording(gen, logits):  # the logits each step handed each reply
        gen.__dict__.setdefault("seen_logits", []).append(logits)
        return accept(gen, logits)

    monkeypatch.setattr(Generation, "accept", recording)
    rng = random.Random(0)
    turns = agreed = 0
    worst = 0.0
    for _ in range(7):
        for batch in (2, 4, 8, 16):
            engine = Engine(tiny_lm, EngineConfig(max_batch=batch, prefill_chunk=64), thread=False)
            common = [rng.randrange(200, 40000) for _ in range(rng.randrange(30, 200))]
            shared = compute_kv(tiny_lm, tuple(common)).referencing()  # a prefix rows start from by reference
            gens = []
            for _ in range(batch):
                tail = [rng.randrange(200, 40000) for _ in range(rng.randrange(20, 300))]
                if rng.random() < 0.5:  # on its own: partly cached, or not at all
                    prompt = tail
                    split = rng.randrange(0, len(prompt) - 1)
                    kv = compute_kv(tiny_lm, tuple(prompt[:split])) if split else None
                else:  # on the shared prefix, with tokens of its own cached after it, or none
                    prompt = common + tail
                    split = len(common) + rng.randrange(0, len(tail) - 1)
                    kv = shared
                    if split > len(common):
                        _, cache = prefill(tiny_lm, shared, prompt[len(common) : split])
                        kv = KV.from_cache(cache, tuple(prompt[:split]), shared.shared)
                gens.append((prompt, Generation(tiny_lm, kv, prompt[split:], GenerationConfig(max_new_tokens=12))))
            requests = [engine.submit(gen) for _, gen in gens]
            while engine.scheduler.has_work():
                engine.step()
            assert engine.rows > engine.steps  # rows did share steps
            for (prompt, gen), request in zip(gens, requests, strict=True):
                assert "".join(request.stream()) == gen.text
                got = tuple(gen.token_ids)
                alone, cache = prefill(tiny_lm, None, prompt)  # batch 1, along the batched reply's own tokens
                for k, logits in enumerate(gen.seen_logits):
                    if k:
                        alone = forward(tiny_lm, cache, [got[k - 1]])
                    worst = max(worst, (logits - alone).abs().max().item())
                    if int(logits.argmax()) != int(alone.argmax()):
                        top2 = torch.topk(alone, 2).values
                        gap = (top2[0] - top2[1]).item()
                        assert gap < 1e-3, f"turn {turns} diverged at step {k}, where the top-2 gap is {gap:.2e}"
                turns += 1
                agreed += got == reference_reply(tiny_lm, prompt, 12)
    print(
        f"\nbatched vs unbatched: {agreed}/{turns} replies identical ({agreed / turns:.1%}); "
        f"largest logit difference {worst:.2e}"
    )
    assert turns >= 200 and worst < 1e-3


def test_a_request_cancelled_before_its_first_step_keeps_no_cache(tiny_lm):
    engine = Engine(tiny_lm, EngineConfig(), thread=False)
    gen = Generation(tiny_lm, None, [300, 301, 302], GenerationConfig(max_new_tokens=4))
    request = engine.submit(gen)
    request.cancel()
    engine.step()
    assert "".join(request.stream()) == "" and gen.finish_reason == "cancelled" and gen.kv is None


def test_requests_outgrowing_the_device_are_preempted_to_the_host_and_resume_exactly(tiny_lm):
    """Four replies whose KV does not fit the device together: the newest is parked on the host and resumes
    where it stopped once an older one ends. Each reply equals the one computed alone (batched steps could
    differ at a near-tie, by the rule above; these prompts have none)."""
    rng = random.Random(3)
    prompts = [[rng.randrange(200, 40000) for _ in range(60)] for _ in range(4)]
    budget = 150 * tiny_lm.info.kv_bytes_per_token  # two prompts and a little room: growth forces preemption
    engine = Engine(tiny_lm, EngineConfig(max_batch=4, prefill_chunk=0), device_bytes=budget, thread=False)
    gens = [Generation(tiny_lm, None, p, GenerationConfig(max_new_tokens=40)) for p in prompts]
    requests = [engine.submit(g) for g in gens]
    while engine.scheduler.has_work():
        engine.step()
        running = engine.scheduler.running
        assert sum(r.tokens for r in running) <= 150 or len(running) == 1
    assert engine.preemptions > 0
    for prompt, gen, request in zip(prompts, gens, requests, strict=True):
        assert "".join(request.stream()) == gen.text
        assert gen.kv is not None and gen.kv.ids == (*prompt, *gen.token_ids[: len(gen.kv.ids) - len(prompt)])
        assert tuple(gen.token_ids) == reference_reply(tiny_lm, prompt, 40)
