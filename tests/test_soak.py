"""A soak: 1,000 sessions opened, used and closed from 8 threads, with Redis and every tier in play. Memory
stays bounded by the budgets, and nothing is left when they are all closed."""

from __future__ import annotations

import gc
import resource
import threading

from tests.conftest import live_keys, tiered

THREADS, PER_THREAD = 8, 125


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_a_thousand_sessions_from_eight_threads(tiny_lm, redis_url, redis_client):
    budget = {"device_sessions": 2, "host_sessions": 2}  # fewer than the threads: caches move all the time
    errors: list[BaseException] = []
    peaks = {"device": 0, "host": 0, "open": 0}
    with tiered(tiny_lm, redis_url, max_new_tokens=4, **budget) as rt:
        rss_start = rss_mib()

        def user(n: int) -> None:
            try:
                for i in range(PER_THREAD):
                    with rt.open_session(system_prompt=f"You are assistant {n % 3}.") as s:
                        s.send(f"hello {i}")
                        s.send("and again")
                    stats = rt.stats()
                    for tier in ("device", "host"):
                        peaks[tier] = max(peaks[tier], stats.tiers[tier].sessions)
                    peaks["open"] = max(peaks["open"], stats.sessions_open)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=user, args=(n,)) for n in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert errors == []
        gc.collect()
        stats = rt.stats()
        rss_end = rss_mib()
        print(
            f"\nsoak: {stats.sessions_closed} sessions, {stats.turns} turns, peak open {peaks['open']}, "
            f"peak device {peaks['device']}, host {peaks['host']} sessions, {stats.tier_counters.demotions} demotions, "
            f"{stats.tier_counters.restores} restores; RSS {rss_start:.0f} → {rss_end:.0f} MiB, "
            f"peak RSS of the process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
        )
        assert stats.sessions_closed == THREADS * PER_THREAD and stats.turns == 2 * THREADS * PER_THREAD
        assert stats.prompt_tokens == stats.reused_tokens + stats.prefilled_tokens
        assert stats.tier_counters.demotions > 0 and peaks["host"] > 0
        assert peaks["open"] <= THREADS and peaks["device"] <= THREADS + budget["device_sessions"]
        assert peaks["host"] <= budget["host_sessions"]
        assert all(u.bytes == 0 and u.sessions == 0 for u in stats.tiers.values()) and stats.kv_bytes == 0
        assert rss_end - rss_start < 200  # bounded: a leak of even 200 KiB per session would show
        assert [k for k in live_keys(redis_client) if k.startswith(b"chatrt:{")] == []
