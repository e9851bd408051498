"""The prefix index points at the sessions whose caches held the most whole blocks of a prompt, within a scope."""

from chatrt.cache.index import BLOCK, CANDIDATES, PrefixIndex, block_keys


def ids(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def test_block_keys_are_chained_so_a_key_stands_for_everything_before_it():
    a, b = ids(3 * BLOCK), ids(3 * BLOCK)
    b[5] = 7  # an early id differs: every later block's key differs too
    assert len(block_keys("", a)) == 3 and len(block_keys("", a[:-1])) == 2  # whole blocks only
    assert all(x != y for x, y in zip(block_keys("", a), block_keys("", b), strict=True))
    assert block_keys("", a) == block_keys("", list(a))
    assert block_keys("tenant-a", a) != block_keys("tenant-b", a)


def test_find_returns_the_sessions_that_held_the_longest_match_most_recent_first():
    index = PrefixIndex()
    long, short = ids(5 * BLOCK), ids(2 * BLOCK)
    index.add("old", "", long)
    index.add("short", "", short)
    index.add("new", "", long[: 4 * BLOCK + 3])
    prompt = [*long[: 4 * BLOCK + 10], 9, 9]
    assert index.find("", prompt) == (["new", "old"], 4 * BLOCK)
    assert index.find("", prompt, skip="new") == (["old"], 4 * BLOCK)
    assert index.find("", [*short, 1, 2]) == (["new", "short", "old"], 2 * BLOCK)
    assert index.find("", [1, *long]) == ([], 0)  # a different first block: nothing
    assert index.find("", long[: BLOCK - 1]) == ([], 0)  # not even one whole block


def test_sessions_are_matched_only_within_their_scope():
    index = PrefixIndex()
    index.add("a", "tenant-a", ids(2 * BLOCK))
    assert index.find("tenant-b", ids(2 * BLOCK)) == ([], 0)
    assert index.find("tenant-a", ids(2 * BLOCK)) == (["a"], 2 * BLOCK)


def test_adding_again_replaces_and_removing_forgets():
    index = PrefixIndex()
    index.add("s", "", ids(3 * BLOCK))
    index.add("s", "", ids(BLOCK))  # its cache now holds less (an edit cropped it)
    assert index.find("", ids(3 * BLOCK)) == (["s"], BLOCK)
    index.remove("s")
    assert index.find("", ids(3 * BLOCK)) == ([], 0) and len(index) == 0
    index.remove("s")  # twice is harmless


def test_at_most_a_few_candidates_are_offered():
    index = PrefixIndex()
    for n in range(10):
        index.add(f"s{n}", "", ids(BLOCK))
    owners, _ = index.find("", ids(BLOCK))
    assert owners == [f"s{n}" for n in range(9, 9 - CANDIDATES, -1)]
