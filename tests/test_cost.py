"""The cost model restores when moving the bytes is estimated faster than recomputing the tokens, and learns."""

from chatrt.cache.cost import CostModel


def model(probes=None) -> CostModel:
    calls = []

    def probe(name):
        def run():
            calls.append(name)
            return probes[name]

        return run

    cost = CostModel({name: probe(name) for name in (probes or {})})
    cost.calls = calls
    return cost


def test_it_picks_the_faster_way_back():
    cost = model()
    cost.observe("prefill", 1000, 2.0)  # 500 tokens/s
    cost.observe("redis", 400e6, 1.0)  # 400 MB/s
    fast_restore = cost.choose("redis", nbytes=92_000_000, tokens=2000)  # 0.23 s vs 4 s
    assert fast_restore.action == "restore" and fast_restore.restore_s < fast_restore.recompute_s
    cost.observe("prefill", 1e9, 1.0)  # a much faster accelerator: recompute wins
    for _ in range(20):
        cost.observe("prefill", 1e9, 1.0)
    slow_restore = cost.choose("redis", nbytes=92_000_000, tokens=2000)
    assert slow_restore.action == "recompute" and "recompute ~" in slow_restore.reason


def test_fixed_latency_counts_for_small_caches():
    cost = model()
    cost.observe("prefill", 1000, 1.0)
    cost.observe("redis", 1e9, 1.0)
    assert cost.choose("redis", nbytes=1000, tokens=10).action == "restore"
    cost.set_latency("redis", 0.5)
    assert cost.choose("redis", nbytes=1000, tokens=10).action == "recompute"


def test_it_probes_only_what_it_has_not_seen():
    cost = model({"prefill": (128, 0.256), "host": (8e6, 0.001)})
    cost.observe("prefill", 64, 0.064)
    assert cost.rate("host") == 8e9 and cost.calls == ["host"]
    assert cost.rate("prefill") == 1000 and cost.calls == ["host"]
    assert cost.rate("host") == 8e9 and cost.calls == ["host"]


def test_short_prefills_do_not_teach_it():
    cost = model({"prefill": (128, 1.28)})
    cost.observe("prefill", 4, 0.001)  # overhead-bound, would claim 4,000 tokens/s
    assert cost.rate("prefill") == 100
