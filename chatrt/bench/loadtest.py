"""`chatrt loadtest`: N simulated users chat with a `chatrt serve` at once over HTTP, each a plain OpenAI-style
client that resends its whole conversation every turn (the common case), streaming; then the same workload
through the Python API in this process, so the HTTP overhead per turn is a difference within one run.

Each user has its own questions after a shared system prompt; a turn's TTFT is the time to its first content
chunk, its tokens the usage the server reports. Reported per N: aggregate reply tokens/s, TTFT p50/p95 and the
share of prompt tokens that were cached.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from pydantic import BaseModel

from chatrt.async_runtime import AsyncChatRuntime

REPORT_VERSION = 1
SYSTEM = (
    "You are the support assistant of a small bicycle shop. Answer in two or three short sentences, stay "
    "friendly, and suggest visiting the shop when a repair needs tools. "
) * 3
TOPICS = ("brakes", "gears", "tyres", "chains", "lights", "saddles", "locks", "pedals")


class Turn(BaseModel):
    ttft_s: float
    seconds: float
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int


class LoadResult(BaseModel):
    path: str
    """"http" (through chatrt serve) or "python" (the same turns through AsyncSession in one process)."""
    users: int
    turns: int
    wall_s: float
    tokens_per_s: float
    """All users' reply tokens over the wall time."""
    ttft_p50_s: float
    ttft_p95_s: float
    turn_s_mean: float
    cached_share: float
    """Cached prompt tokens over all prompt tokens (every turn, the first included)."""


class LoadReport(BaseModel):
    version: int = REPORT_VERSION
    model: str
    turns_per_user: int
    max_tokens: int
    results: list[LoadResult]


def questions(user: int, turns: int) -> list[str]:
    topic = TOPICS[user % len(TOPICS)]
    asks = ("How do I look after my {t}?", "What does it cost to replace the {t}?", "How long do {t} last?",
            "Can I fix the {t} myself?", "Which {t} do you recommend?", "Thanks! Anything else about {t}?")  # fmt: skip
    return [f"(user {user}) " + asks[n % len(asks)].format(t=topic) for n in range(turns)]


async def sse_chunks(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of a streamed chat completion (the `[DONE]` line and pings left out)."""
    async for line in response.aiter_lines():
        if line.startswith("data: {"):
            yield json.loads(line[6:])


async def http_user(client: httpx.AsyncClient, model: str, user: int, turns: int, max_tokens: int) -> list[Turn]:
    """One stateless OpenAI-style client: the whole conversation each turn, streamed, usage at the end."""
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    out = []
    for text in questions(user, turns):
        messages.append({"role": "user", "content": text})
        body = {"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens,
                "stream_options": {"include_usage": True}}  # fmt: skip
        t0 = time.perf_counter()
        ttft, reply, usage = 0.0, "", {}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for chunk in sse_chunks(response):
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", ()):
                    if piece := choice["delta"].get("content"):
                        ttft = ttft or time.perf_counter() - t0
                        reply += piece
        out.append(Turn(ttft_s=ttft, seconds=time.perf_counter() - t0, completion_tokens=usage["completion_tokens"],
                        prompt_tokens=usage["prompt_tokens"],
                        cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)))  # fmt: skip
        messages.append({"role": "assistant", "content": reply})
    return out


async def python_user(art: AsyncChatRuntime, user: int, turns: int, max_tokens: int) -> list[Turn]:
    """The same conversation through the Python API: one session, streamed."""
    session = await art.open_session(SYSTEM)
    out = []
    try:
        for text in questions(user, turns):
            t0 = time.perf_counter()
            ttft = 0.0
            turn = session.stream(text, max_new_tokens=max_tokens)
            async for _ in turn:
                ttft = ttft or time.perf_counter() - t0
            stats = (await turn.result()).stats
            out.append(Turn(ttft_s=ttft, seconds=time.perf_counter() - t0, completion_tokens=stats.generated_tokens,
                            prompt_tokens=stats.prompt_tokens,
                            cached_tokens=stats.reused_tokens))  # fmt: skip
    finally:
        await session.close()
    return out


async def measure(path: str, users: int, turns: int, user: Callable[[int], Awaitable[list[Turn]]]) -> LoadResult:
    t0 = time.perf_counter()
    done = await asyncio.gather(*(user(100 * users + n) for n in range(users)))  # users of no earlier run
    wall = time.perf_counter() - t0
    all_turns = [t for u in done for t in u]
    ttfts = sorted(t.ttft_s for t in all_turns)
    return LoadResult(
        path=path,
        users=users,
        turns=len(all_turns),
        wall_s=wall,
        tokens_per_s=sum(t.completion_tokens for t in all_turns) / wall,
        ttft_p50_s=statistics.median(ttfts),
        ttft_p95_s=ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        turn_s_mean=statistics.fmean(t.seconds for t in all_turns),
        cached_share=sum(t.cached_tokens for t in all_turns) / max(1, sum(t.prompt_tokens for t in all_turns)),
    )


async def over_http(url: str, sizes: list[int], turns: int, max_tokens: int) -> list[LoadResult]:
    # A connection per request: some servers (llama-server) close kept-alive connections between requests,
    # which a client reusing them meets as a disconnect.
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url.removesuffix("/v1"), timeout=600, limits=fresh) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        await http_user(client, model, 10**6, 1, max_tokens)  # warm-up (its session is not measured)
        return [
            await measure("http", n, turns, lambda u: http_user(client, model, u, turns, max_tokens)) for n in sizes
        ]


async def in_process(art: AsyncChatRuntime, sizes: list[int], turns: int, max_tokens: int) -> list[LoadResult]:
    await python_user(art, 10**6, 1, max_tokens)  # warm-up
    return [await measure("python", n, turns, lambda u: python_user(art, u, turns, max_tokens)) for n in sizes]
