"""One session's KV cache: the token ids it was computed on and the per-layer key/value tensors.

Longest-common-prefix match, crop, byte size, moves between devices, and the bridge to transformers' cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@dataclass(frozen=True)
class KV:
    """Keys and values for exactly `ids`, in order. Immutable: crops are views, growth makes new tensors,
    so a KV shared by several sessions (a prefix) is never changed by any of them."""

    ids: tuple[int, ...]
    keys: tuple[torch.Tensor, ...]  # per layer: [1, H_kv, S, D]
    values: tuple[torch.Tensor, ...]  # per layer: [1, H_kv, S, D]

    def __post_init__(self) -> None:
        assert len(self.keys) == len(self.values), "one key and one value tensor per layer"
        assert all(k.shape[-2] == len(self.ids) for k in self.keys), "KV length must equal its token count"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def crop(self, n: int) -> KV:
        """The KV of the first `n` tokens (views, no copy)."""
        if n >= len(self):
            return self
        return KV(self.ids[:n], tuple(k[..., :n, :] for k in self.keys), tuple(v[..., :n, :] for v in self.values))

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> KV:
        """A copy on `device` (self when already there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return KV(self.ids, tuple(map(move, self.keys)), tuple(map(move, self.values)))

    def as_cache(self) -> DynamicCache:
        """A transformers cache that starts from these tensors without copying them."""
        cache = DynamicCache()
        cache.layers = []
        for k, v in zip(self.keys, self.values, strict=True):
            layer = DynamicLayer()
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
            cache.layers.append(layer)
        return cache

    @classmethod
    def from_cache(cls, cache: DynamicCache, ids: tuple[int, ...]) -> KV:
        keys = tuple(layer.keys for layer in cache.layers)
        values = tuple(layer.values for layer in cache.layers)
        return cls(ids, keys, values)


def common_prefix_len(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
