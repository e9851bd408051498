"""Many stateless HTTP clients at once, a third of them leaving mid-stream (before the first event or after a
few): afterwards no client is ever answered inside another's conversation, every reply is what plain
transformers gives on the client's own messages, and the idle sessions kept for stateless clients stay within
`serve.stateless_sessions`."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from chatrt.bench.loadtest import sse_chunks
from chatrt.template import ChatTemplate, Message, decode
from tests.conftest import reference_reply, serve

QUESTIONS = ["How do I boil an egg?", "What is a KV cache?", "Name a colour.", "Why is the sky blue?"]
FOLLOW_UPS = ["Tell me more.", "Shorter, please."]
CLIENTS, CAP, MAX_NEW = 48, 4, 16


@dataclass
class Answer:
    messages: list[dict[str, str]]
    text: str
    usage: dict
    session_id: str


class Greedy:
    """Plain transformers' greedy reply to a conversation, computed once per prompt."""

    def __init__(self, lm) -> None:
        self.lm, self.template = lm, ChatTemplate(lm.tokenizer)
        self.known: dict[tuple[int, ...], tuple[int, ...]] = {}  # prompt → greedy reply ids
        self.spelled: dict[str, tuple[int, ...]] = {}  # a greedy reply's text → its ids
        self.ties: set[tuple[tuple[int, ...], str]] = set()  # (prompt, reply) seen to leave greedy at a near-tie

    def prompt(self, messages: list[dict[str, str]], prompt_tokens: int) -> list[int]:
        """The prompt a session answered `messages` with: an assistant message is its text re-tokenized, or (a
        session that generated it) the ids that spelled it; the one of `prompt_tokens` tokens."""
        as_text = [Message(role=m["role"], content=m["content"]) for m in messages]
        with_ids = [m.model_copy(update={"token_ids": self.spelled.get(m.content)}) if m.role == "assistant" else m
                    for m in as_text]  # fmt: skip
        candidates = [self.template.render(as_text), self.template.render(with_ids)]
        assert prompt_tokens in map(len, candidates), f"{prompt_tokens} tokens: not a prompt of {messages}"
        return next(c for c in candidates if len(c) == prompt_tokens)

    def check(self, prompt: list[int], text: str, what: str) -> None:
        """`text` is the greedy reply to `prompt`, or it left it at a near-tie (the top-2 logit gap printed)."""
        key = tuple(prompt)
        if key not in self.known:
            self.known[key] = reference_reply(self.lm, prompt, MAX_NEW)
        want = self.known[key]
        self.spelled[decode(self.lm.tokenizer, want)] = want
        if decode(self.lm.tokenizer, want) == text or (key, text) in self.ties:
            return
        self.ties.add((key, text))
        k = next(k for k in range(len(want)) if not text.startswith(decode(self.lm.tokenizer, want[: k + 1])))
        with torch.inference_mode():
            logits = self.lm.model(torch.tensor([prompt + list(want[:k])])).logits[0, -1].float()
        top = torch.topk(logits, 2).values
        gap = float(top[0] - top[1])
        print(f"reply to {what!r} left greedy at token {k}, top-2 logit gap {gap:.2e}")
        assert gap < 1e-3, f"not a near-tie: {text!r} vs {decode(self.lm.tokenizer, want)!r} (gap {gap:.3f})"


async def turn(http: httpx.AsyncClient, messages: list[dict], leave_after: int | None = None) -> Answer | None:
    """One streamed turn. `leave_after`: the client disconnects after that many content events."""
    body = {"model": http.headers["x-model"], "messages": messages, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    text, usage, session_id, events = "", {}, "", 0
    async with http.stream("POST", "/chat/completions", json=body) as response:
        response.raise_for_status()
        async for chunk in sse_chunks(response):
            assert "error" not in chunk, chunk
            session_id, usage = chunk["session_id"], chunk.get("usage") or usage
            for choice in chunk["choices"]:
                if piece := choice["delta"].get("content"):
                    text, events = text + piece, events + 1
                    if leave_after is not None and events >= leave_after:
                        return None  # the connection is closed as the block exits
    return Answer(messages, text, usage, session_id)


async def client(http: httpx.AsyncClient, n: int, rng: random.Random) -> list[Answer]:
    messages = [{"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]}]
    if n % 3 == 0:  # a third leave: half at a random moment (maybe before any event), half after a few pieces
        if n % 2:
            task = asyncio.ensure_future(turn(http, messages))
            await asyncio.sleep(rng.uniform(0.0, 0.2))
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        else:
            await turn(http, messages, leave_after=rng.randint(1, 4))
        return []
    first = await turn(http, messages)
    assert first is not None
    follow = [*messages, {"role": "assistant", "content": first.text},
              {"role": "user", "content": FOLLOW_UPS[n % len(FOLLOW_UPS)]}]  # fmt: skip
    second = await turn(http, follow)
    assert second is not None
    return [first, second]


def scrape(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def settled(base: str, timeout: float = 60.0) -> dict[str, float]:
    """The server's gauges once no turn runs or waits (the departed clients' turns finish on their own)."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(base)
        if (m["chatrt_requests_running"], m["chatrt_requests_waiting"]) == (0, 0) and m["chatrt_sessions_open"] <= CAP:
            return m
        if time.monotonic() > deadline:
            return m
        time.sleep(0.1)


@pytest.mark.parametrize("seed", [1, 2])
def test_clients_leaving_mid_stream_never_hand_their_conversation_to_another(tiny_folder, tiny_lm, seed):
    greedy = Greedy(tiny_lm)
    rng = random.Random(seed)
    with serve(tiny_folder, max_new_tokens=MAX_NEW, SERVE__STATELESS_SESSIONS=CAP) as url:
        base = url.removesuffix("/v1")
        model = httpx.get(f"{url}/models").json()["data"][0]["id"]
        for _ in range(2):  # a storm, then another over what the first left

            async def storm() -> list[list[Answer]]:
                limits = httpx.Limits(max_connections=CLIENTS)
                headers = {"x-model": model}  # read back by `turn`: the served model's id
                async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as http:
                    return await asyncio.gather(*(client(http, n, rng) for n in range(CLIENTS)))

            answers = [a for per in asyncio.run(storm()) for a in per]
            assert len(answers) == 2 * (CLIENTS - CLIENTS // 3)
            m = settled(base)
            assert m["chatrt_sessions_open"] <= CAP, f"{m['chatrt_sessions_open']} sessions left open (cap {CAP})"
            for a in sorted(answers, key=lambda a: len(a.messages)):  # each that stayed: on its own messages
                prompt = greedy.prompt(a.messages, a.usage["prompt_tokens"])
                greedy.check(prompt, a.text, a.messages[-1]["content"])
            for question in QUESTIONS:  # a newcomer with a first message others sent: nobody else's history
                messages = [{"role": "user", "content": question}]
                got = httpx.post(f"{url}/chat/completions", json={"model": model, "messages": messages},
                                 timeout=60).json()  # fmt: skip
                prompt = greedy.prompt(messages, got["usage"]["prompt_tokens"])  # its own message, nobody else's
                text = got["choices"][0]["message"]["content"]
                greedy.check(prompt, text, question)
                held = httpx.get(f"{url}/sessions/{got['session_id']}").json()["messages"]
                assert held == [*messages, {"role": "assistant", "content": text}]
            assert settled(base)["chatrt_sessions_open"] <= CAP
