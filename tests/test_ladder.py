"""The ladder policy alone, with no model and no Redis (as SGLang tests its radix cache): LRU order under byte and
session budgets, pinning, the cascade down the tiers, and caches dropped while they move."""

import pytest

from chatrt.cache.ladder import Budget, Ladder, Slot

UNLIMITED = Budget(bytes=10**12)


def ladder(device=UNLIMITED, host=UNLIMITED, redis=UNLIMITED) -> Ladder:
    return Ladder({"device": device, "host": host, "redis": redis})


def slot(nbytes: int = 10) -> Slot:
    return Slot(kv=None, meta=None, nbytes=nbytes)


def settle(lad: Ladder) -> list[tuple[str, str, str]]:
    """Run the policy as the movers do: every eviction lands one tier down (the bottom drops). Returns the moves."""
    below = {"device": "host", "host": "redis", "redis": None}
    moves = []
    while evictions := lad.evict():
        for e in evictions:
            dst = below[e.tier]
            assert lad.land(e.session_id, dst, e.slot if dst else None)
            moves.append((e.session_id, e.tier, dst or "dropped"))
    return moves


def turn(lad: Ladder, session_id: str, nbytes: int = 10) -> str:
    """A turn of the session: pinned, then checked in on the device. Returns where its cache was."""
    tier, found = lad.take(session_id)
    lad.unpin(session_id, slot(nbytes))
    return tier if found else "none"


def test_the_least_recently_used_idle_cache_moves_down_first():
    lad = ladder(device=Budget(10**6, sessions=2))
    for sid in "abc":
        turn(lad, sid)
    assert settle(lad) == [("a", "device", "host")]
    turn(lad, "b")  # b is now the most recent: c goes next
    turn(lad, "d")
    assert settle(lad) == [("c", "device", "host")]
    assert list(lad.lru["device"]) == ["b", "d"] and list(lad.lru["host"]) == ["a", "c"]


def test_a_byte_budget_counts_bytes_not_sessions():
    lad = ladder(device=Budget(25))
    turn(lad, "small", 5)
    turn(lad, "big", 20)
    assert settle(lad) == []
    turn(lad, "more", 10)  # 35 bytes: the oldest goes, then 30 is still over, so the next oldest too
    assert settle(lad) == [("small", "device", "host"), ("big", "device", "host")]
    assert lad.bytes("device") == 10 and lad.bytes("host") == 25


def test_a_pinned_cache_counts_on_the_device_and_never_moves():
    lad = ladder(device=Budget(10**6, sessions=1))
    turn(lad, "busy")
    lad.take("busy")  # generating now
    lad.pin("busy", 50)
    turn(lad, "idle")
    assert settle(lad) == [("idle", "device", "host")]  # over budget, yet only the idle one moved
    assert lad.sessions("device") == 1 and lad.bytes("device") == 50
    lad.unpin("busy", slot())
    assert settle(lad) == [] and lad.find("busy")[0] == "device"


def test_moves_cascade_down_every_tier_and_off_the_bottom():
    one = Budget(10**6, sessions=1)
    lad = ladder(device=one, host=one, redis=one)
    for sid in "abcd":
        turn(lad, sid)
        settle(lad)
    assert [lad.find(s)[0] for s in "bcd"] == ["redis", "host", "device"]
    assert lad.find("a")[1] is None  # fell off the bottom: only its transcript is left
    assert turn(lad, "a") == "none" and turn(lad, "b") == "redis"


def test_a_cache_dropped_while_it_moves_is_discarded_where_it_lands():
    lad = ladder(device=Budget(10**6, sessions=1))
    turn(lad, "old")
    turn(lad, "new")
    (e,) = lad.evict()
    assert e.session_id == "old" and lad.find("old")[1] is None  # in flight: on no tier
    lad.drop("old")  # closed meanwhile
    assert not lad.land("old", "host", e.slot)
    assert lad.find("old")[1] is None and lad.bytes("host") == 0
    turn(lad, "old")  # the id may be used again afterwards
    assert lad.find("old")[0] == "device"


def test_an_explicit_demotion_takes_only_an_idle_cache():
    lad = ladder()
    turn(lad, "a")
    e = lad.take_idle("a")
    assert e is not None and e.tier == "device"
    assert lad.land("a", "host", e.slot) and lad.find("a")[0] == "host"
    lad.take("a")
    assert lad.take_idle("a") is None  # pinned: not on any tier's LRU


def test_a_moving_cache_cannot_be_taken_for_a_turn():
    lad = ladder(device=Budget(10**6, sessions=1))
    turn(lad, "a")
    turn(lad, "b")
    lad.evict()
    with pytest.raises(AssertionError):
        lad.take("a")  # the movers wait for it to land first
