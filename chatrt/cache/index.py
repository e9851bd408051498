"""PrefixIndex: which sessions' caches begin like a prompt, for a turn to start from another session's cache where
it is longer than its own (a stateless client's edit of an earlier message, a regenerated turn, many users
sending one long document).

Token ids are cut into blocks of BLOCK; each full block is keyed by a chained sha256 (the scope, the previous
block's key, this block's ids), as nano-vllm keys its prefix blocks, so one lookup per block finds the sessions
whose cache held the same ids up to there. The index only points: whoever uses a hit compares the ids of the
cache it finds (a hash collision, or a cache that has changed since, is never served). Sessions are matched only
within their scope (a tenant's, a user's), never across.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence

BLOCK = 32
CANDIDATES = 4
"""At most this many sessions are offered per lookup, those that held the longest match most recently first."""


def block_keys(scope: str, ids: Sequence[int]) -> list[str]:
    """The chained key of each full block of `ids`: key i covers ids[: (i + 1) * BLOCK] in `scope`."""
    keys, previous = [], hashlib.sha256(scope.encode()).digest()
    for start in range(0, len(ids) - BLOCK + 1, BLOCK):
        h = hashlib.sha256(previous)
        h.update(array("i", ids[start : start + BLOCK]).tobytes())
        previous = h.digest()
        keys.append(previous.hex())
    return keys


class PrefixIndex:
    def __init__(self) -> None:
        self._owners: dict[str, OrderedDict[str, None]] = {}  # block key → sessions, most recent last
        self._keys: dict[str, list[str]] = {}  # session → the block keys it is listed under
        self._lock = threading.Lock()

    def add(self, owner: str, scope: str, ids: Sequence[int]) -> None:
        """`owner`'s cache holds `ids` now (it replaces what it held before). Hashes outside the lock."""
        keys = block_keys(scope, ids)
        with self._lock:
            self._remove(owner)
            self._keys[owner] = keys
            for key in keys:
                self._owners.setdefault(key, OrderedDict())[owner] = None

    def remove(self, owner: str) -> None:
        with self._lock:
            self._remove(owner)

    def find(self, scope: str, ids: Sequence[int], *, skip: str = "") -> tuple[list[str], int]:
        """The sessions (but `skip`) whose cache held the most whole blocks of `ids` when listed, most recent
        first, and how many tokens those blocks are; ([], 0) when none held even the first block."""
        keys = block_keys(scope, ids)
        with self._lock:
            for depth in range(len(keys), 0, -1):
                owners = [o for o in reversed(self._owners.get(keys[depth - 1], {})) if o != skip]
                if owners:
                    return owners[:CANDIDATES], depth * BLOCK
        return [], 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    def _remove(self, owner: str) -> None:
        for key in self._keys.pop(owner, ()):
            owners = self._owners[key]
            del owners[owner]
            if not owners:
                del self._owners[key]
