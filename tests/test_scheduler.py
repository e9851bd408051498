"""The scheduler alone, without a model: who runs in the next step, with how many tokens."""

from __future__ import annotations

from dataclasses import dataclass

from chatrt.engine.scheduler import Scheduler


@dataclass(eq=False)
class Fake:
    to_prefill: int
    cancelled: bool = False
    tokens: int = 0


def test_decoding_rows_get_one_token_and_prefills_share_the_chunk_budget_oldest_first():
    s: Scheduler[Fake] = Scheduler(max_batch=8, prefill_chunk=100)
    decoding, long, short = Fake(0), Fake(250), Fake(30)
    for r in (decoding, long, short):
        s.add(r)
    rows, _, _ = s.schedule()
    assert rows == [(decoding, 1), (long, 100)]  # the long prompt takes the whole budget; the short one waits
    long.to_prefill = 150
    rows, _, _ = s.schedule()
    assert rows == [(decoding, 1), (long, 100)]
    long.to_prefill = 50
    rows, _, _ = s.schedule()
    assert rows == [(decoding, 1), (long, 50), (short, 30)]


def test_a_whole_prompt_in_one_step_when_chunking_is_off():
    s: Scheduler[Fake] = Scheduler(max_batch=4, prefill_chunk=0)
    a, b = Fake(3000), Fake(10)
    s.add(a)
    s.add(b)
    assert s.schedule()[0] == [(a, 3000), (b, 10)]


def test_at_most_max_batch_requests_run_and_the_rest_wait_in_order():
    s: Scheduler[Fake] = Scheduler(max_batch=2, prefill_chunk=0)
    reqs = [Fake(0) for _ in range(5)]
    for r in reqs:
        s.add(r)
    assert [r for r, _ in s.schedule()[0]] == reqs[:2]
    s.finish(reqs[0])
    assert [r for r, _ in s.schedule()[0]] == [reqs[1], reqs[2]]
    assert list(s.waiting) == reqs[3:]


def test_cancelled_requests_leave_running_or_waiting():
    s: Scheduler[Fake] = Scheduler(max_batch=1, prefill_chunk=0)
    running, waiting = Fake(0), Fake(5)
    s.add(running)
    s.add(waiting)
    s.schedule()
    running.cancelled = waiting.cancelled = True
    rows, cancelled, _ = s.schedule()
    assert rows == [] and set(cancelled) == {running, waiting} and not s.has_work()


def test_max_batch_one_runs_one_request_at_a_time():
    s: Scheduler[Fake] = Scheduler(max_batch=1, prefill_chunk=0)
    a, b = Fake(7), Fake(0)
    s.add(a)
    s.add(b)
    assert s.schedule()[0] == [(a, 7)]
    a.to_prefill = 0
    assert s.schedule()[0] == [(a, 1)]


def test_requests_are_admitted_while_their_kv_fits_the_device():
    s: Scheduler[Fake] = Scheduler(max_batch=8, prefill_chunk=0, max_tokens=1000)
    a, b, c = Fake(0, tokens=400), Fake(300, tokens=400), Fake(200, tokens=400)
    for r in (a, b, c):
        s.add(r)
    rows, _, preempted = s.schedule()
    assert [r for r, _ in rows] == [a, b] and list(s.waiting) == [c] and preempted == []  # 401 + 400 fit, 1201 not


def test_the_newest_request_is_preempted_when_the_running_ones_outgrow_the_device_and_resumes_first():
    s: Scheduler[Fake] = Scheduler(max_batch=8, prefill_chunk=0, max_tokens=1000)
    old, new, later = Fake(0, tokens=500), Fake(0, tokens=498), Fake(0, tokens=10)
    for r in (old, new):
        s.add(r)
    assert [r for r, _ in s.schedule()[0]] == [old, new]  # 501 + 499 = 1000 after this step
    s.add(later)  # it waits: no room
    old.tokens, new.tokens = 501, 499
    rows, _, preempted = s.schedule()  # the next step would need 1002
    assert preempted == [new] and [r for r, _ in rows] == [old] and list(s.waiting) == [new, later]
    s.finish(old)
    rows, _, preempted = s.schedule()
    assert [r for r, _ in rows] == [new, later] and preempted == []  # the preempted one goes first


def test_a_lone_request_runs_whatever_its_size():
    s: Scheduler[Fake] = Scheduler(max_batch=8, prefill_chunk=0, max_tokens=100)
    big = Fake(5000, tokens=5000)
    s.add(big)
    assert s.schedule()[0] == [(big, 5000)]
