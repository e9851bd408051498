"""One session's KV cache: the token ids it was computed on and the per-layer key/value tensors.

Longest-common-prefix match, crop, byte size, moves between devices, safetensors bytes, the bridge to transformers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from chatrt.cache.integrity import Sealer
from chatrt.errors import CacheRejected
from chatrt.model import ModelInfo


@dataclass(frozen=True)
class KV:
    """Keys and values for exactly `ids`, in order: the `shared` segments it starts from, held by reference (a
    shared prefix's tensors, never copied), then its own `keys` and `values`. Immutable: crops are views, growth
    makes new tensors, so a KV shared by several sessions is never changed by any of them."""

    ids: tuple[int, ...]
    keys: tuple[torch.Tensor, ...]  # own, per layer: [1, H_kv, S_own, D]
    values: tuple[torch.Tensor, ...]  # own, per layer: [1, H_kv, S_own, D]
    shared: tuple[KV, ...] = ()
    """Flat KVs (of no segments of their own) for the first `shared_len` ids, in order: what this KV references."""

    def __post_init__(self) -> None:
        assert len(self.keys) == len(self.values), "one key and one value tensor per layer"
        assert all(not s.shared for s in self.shared), "shared segments are flat"
        own = len(self.ids) - self.shared_len
        assert all(k.shape[-2] == own for k in self.keys), "own KV length must equal its own token count"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def shared_len(self) -> int:
        """How many leading ids the shared segments hold."""
        return sum(len(s) for s in self.shared)

    @property
    def nbytes(self) -> int:
        """Bytes of this KV's own tensors (the shared segments are accounted where they are kept)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor it holds or references: its own keys and values, and its shared segments'."""
        return (*self.keys, *self.values, *(t for s in self.shared for t in (*s.keys, *s.values)))

    def own(self) -> KV:
        """The own tensors as a flat KV of their ids."""
        return KV(self.ids[self.shared_len :], self.keys, self.values) if self.shared else self

    def segments(self) -> tuple[KV, ...]:
        """Every flat segment in order: the shared ones, then the own one (when it holds any token)."""
        own = self.own()
        return (*self.shared, own) if len(own) or not self.shared else self.shared

    def referencing(self) -> KV:
        """A KV of the same ids that references all of these tensors (shares them with this one) and owns none:
        what a session starts from to share a prefix or a fork point instead of copying it."""
        return _referencing(self.ids, self.segments())

    def crop(self, n: int) -> KV:
        """The KV of the first `n` tokens (views, no copy)."""
        if n >= len(self):
            return self
        s = self.shared_len
        if n >= s:
            m = n - s
            return KV(self.ids[:n], tuple(k[..., :m, :] for k in self.keys),
                      tuple(v[..., :m, :] for v in self.values), self.shared)  # fmt: skip
        if n <= 0:
            return KV((), tuple(k[..., :0, :] for k in self.keys), tuple(v[..., :0, :] for v in self.values))
        kept, left = [], n
        for segment in self.shared:
            if left <= 0:
                break
            kept.append(segment.crop(left))
            left -= len(segment)
        return _referencing(self.ids[:n], tuple(kept))

    def flat(self) -> KV:
        """One KV that holds every tensor itself (a copy when there are shared segments), for storage."""
        if not self.shared:
            return self
        segments = self.segments()
        keys = tuple(torch.cat([s.keys[i] for s in segments], dim=-2) for i in range(len(segments[0].keys)))
        values = tuple(torch.cat([s.values[i] for s in segments], dim=-2) for i in range(len(segments[0].keys)))
        return KV(self.ids, keys, values)

    def compact(self, spare: float = 1 / 8) -> KV:
        """The same KV with its own tensors in storage of their size when the room they grew in is larger by more
        than `spare` (a short reply in room made for a longer one): what a session keeps is what it holds."""
        per_tensor = self.nbytes // (2 * len(self.keys)) if self.keys else 0
        if not self.keys or self.keys[0].untyped_storage().nbytes() <= per_tensor * (1 + spare):
            return self
        return KV(self.ids, tuple(k.clone() for k in self.keys), tuple(v.clone() for v in self.values), self.shared)

    def to(self, device: torch.device | str, *, pin: bool = False) -> KV:
        """Its own tensors on `device` (self when already there; the shared segments stay where they are kept).
        `pin` puts a host copy in page-locked memory, which CUDA copies back to the device at full bus speed."""
        device = torch.device(device)
        if self.device == device:
            return self
        if pin and device.type == "cpu":
            move = lambda t: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)  # noqa: E731
        else:
            move = lambda t: t.to(device)  # noqa: E731
        return KV(self.ids, tuple(map(move, self.keys)), tuple(map(move, self.values)), self.shared)

    def as_cache(self) -> DynamicCache:
        """A transformers cache that starts from these tensors: the shared segments are read where they are, the
        own tensors copied once, on its first append."""
        cache = new_cache()
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            layer = GrowingLayer(tuple((s.keys[i], s.values[i]) for s in self.shared))
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
            cache.layers.append(layer)
        return cache

    @classmethod
    def from_cache(cls, cache: DynamicCache, ids: tuple[int, ...], shared: tuple[KV, ...] = ()) -> KV:
        """The KV a cache holds: its layers' own tensors after `shared` (the segments it was started from)."""
        keys = tuple(layer.keys for layer in cache.layers)
        values = tuple(layer.values for layer in cache.layers)
        return cls(ids, keys, values, shared)

    @classmethod
    def linked(cls, shared: tuple[KV, ...], own: KV) -> KV:
        """`own` (a flat KV of the ids after the shared segments') referencing `shared` again."""
        assert not own.shared
        return cls((*(i for s in shared for i in s.ids), *own.ids), own.keys, own.values, shared)


def _referencing(ids: tuple[int, ...], segments: tuple[KV, ...]) -> KV:
    """A KV of `ids` that references `segments` (flat, in order, holding exactly those ids) and owns nothing."""
    empty = lambda ts: tuple(t[..., :0, :] for t in ts)  # noqa: E731
    return KV(ids, empty(segments[-1].keys), empty(segments[-1].values), segments)


class GrowingLayer(DynamicLayer):
    """transformers' DynamicLayer, but appending into spare room instead of concatenating: a reply of n tokens
    copies the cache each time it outgrows its room (by an eighth), not once per token, so a long reply costs
    O(n) copies, not O(n²). `keys` and `values` are views of the layer's own tokens that never include the spare
    room, and the first append of a cache moves into room of its own, so the tensors it started from are never
    written. `shared` segments come first and are only read: attention over segments reads them in place
    (`engine/segments.py`); `update`, for transformers' plain forward, returns them joined with the own tokens."""

    def __init__(self, shared: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()) -> None:
        super().__init__()
        self.shared = shared  # per segment (keys, values): [1, H_kv, S_i, D]
        self.shared_len = sum(k.shape[-2] for k, _ in shared)
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None  # [1, H_kv, capacity, D] each

    def get_seq_length(self) -> int:
        return self.shared_len + self.own_len

    @property
    def own_len(self) -> int:
        return self.keys.shape[-2] if self.is_initialized and self.keys.dim() == 4 else 0

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # key_states, value_states: [1, H_kv, S_new, D]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.own_len
        end = n + key_states.shape[-2]
        if self._room is None or end > self._room[0].shape[-2]:
            shape = (*key_states.shape[:-2], end + max(64, end // 8), key_states.shape[-1])
            room = (key_states.new_empty(shape), value_states.new_empty(shape))
            if n:
                room[0][..., :n, :] = self.keys
                room[1][..., :n, :] = self.values
            self._room = room
        keys, values = self._room
        keys[..., n:end, :] = key_states
        values[..., n:end, :] = value_states
        self.keys, self.values = keys[..., :end, :], values[..., :end, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        """Append, and return every key and value of the layer: [1, H_kv, L, D] (joined, a copy, when the layer
        has shared segments: the plain forward is transformers' own, bit for bit)."""
        self.append(key_states, value_states)
        if not self.shared:
            return self.keys, self.values
        keys = torch.cat([*(k for k, _ in self.shared), self.keys], dim=-2)
        values = torch.cat([*(v for _, v in self.shared), self.values], dim=-2)
        return keys, values


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind these tensors: a storage shared by several (a shared prefix, views
    of one room) is counted once, and whole (the room a KV grows in included)."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def cache_layer(cache: DynamicCache, index: int) -> GrowingLayer:
    """The cache's layer `index`, created empty (with those before it) when the cache has none yet."""
    while len(cache.layers) <= index:
        cache.layers.append(GrowingLayer())
    return cache.layers[index]


def new_cache() -> DynamicCache:
    """An empty transformers cache whose layers grow by GrowingLayer."""
    cache = DynamicCache()
    cache.layers = []
    cache.layer_class_to_replicate = GrowingLayer
    return cache


MIN_CHUNK_BYTES = 1024  # the least `tiers.redis_chunk_bytes` may be
_HEADER_BYTES = 64 * 1024  # more than a safetensors header of a few hundred layers takes


class KVMeta(BaseModel):
    """What stored KV bytes are, checked against the running model before any tensor is loaded."""

    model_config = ConfigDict(frozen=True)

    fingerprint: str
    ids: tuple[int, ...]
    dtype: str
    num_layers: int
    key_shape: tuple[int, ...]  # of every layer's keys: [1, H_kv, S, D]
    value_shape: tuple[int, ...]
    shared_tokens: int = 0
    """How many leading ids are held by shared segments, stored apart (by their hash, as prefixes): the tensors
    stored here are those of the ids after them."""
    nbytes: int  # of the serialized blob
    chunks: int
    digest: str
    """Over this metadata and the blob (sha256, or an HMAC under the deployment's secret): ids included."""


@dataclass(frozen=True)
class KVSpec:
    """What a cache of the running model must look like; stored metadata that differs in anything is refused."""

    fingerprint: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_tokens: int
    vocab_size: int
    bytes_per_token: int

    @classmethod
    def of(cls, info: ModelInfo) -> KVSpec:
        """What a cache of this model looks like, for checking stored ones."""
        return cls(info.fingerprint, info.dtype, info.num_layers, info.num_kv_heads, info.head_dim, info.max_context,
                   info.vocab_size, info.kv_bytes_per_token)  # fmt: skip

    def max_nbytes(self, tokens: int) -> int:
        return tokens * self.bytes_per_token + _HEADER_BYTES


def to_chunks(kv: KV, fingerprint: str, chunk_bytes: int, sealer: Sealer) -> tuple[KVMeta, list[memoryview]]:
    """`kv`'s own tensors as one safetensors blob (tensors only, nothing executable) cut into chunks of at most
    `chunk_bytes`; its metadata names every id and how many of them its shared segments hold."""
    tensors = {f"k{i}": k.contiguous() for i, k in enumerate(kv.keys)}
    tensors |= {f"v{i}": v.contiguous() for i, v in enumerate(kv.values)}
    blob = memoryview(st_save(tensors))
    meta = KVMeta(
        fingerprint=fingerprint,
        ids=kv.ids,
        shared_tokens=kv.shared_len,
        dtype=str(kv.keys[0].dtype).removeprefix("torch."),
        num_layers=len(kv.keys),
        key_shape=tuple(kv.keys[0].shape),
        value_shape=tuple(kv.values[0].shape),
        nbytes=len(blob),
        chunks=max(1, -(-len(blob) // chunk_bytes)),
        digest="",
    )
    meta = meta.model_copy(update={"digest": sealer.digest(_signed_part(meta), blob)})
    return meta, [blob[i : i + chunk_bytes] for i in range(0, len(blob), chunk_bytes)]


def check_meta(meta: KVMeta, spec: KVSpec) -> None:
    """Refuse (CacheRejected) metadata that cannot describe a cache of the running model, before any of its
    bytes are read. What a record that passes can cost is bounded by its token count: at most
    `spec.max_nbytes(spec.max_tokens)` bytes are read (a full context's KV)."""
    n, own = len(meta.ids), len(meta.ids) - meta.shared_tokens
    shape = (1, spec.num_kv_heads, own, spec.head_dim)
    if meta.fingerprint != spec.fingerprint:
        raise CacheRejected("the cache was computed by another model (fingerprint differs)")
    if meta.dtype != spec.dtype or meta.num_layers != spec.num_layers:
        raise CacheRejected(
            f"the cache is {meta.num_layers} layers of {meta.dtype}; the model has {spec.num_layers} of {spec.dtype}"
        )
    if meta.key_shape != shape or meta.value_shape != shape:
        raise CacheRejected(f"the cache's shapes {meta.key_shape}, {meta.value_shape} are not the model's {shape}")
    if not 0 < n <= spec.max_tokens or min(meta.ids) < 0 or max(meta.ids) >= spec.vocab_size:
        raise CacheRejected("the cache's token ids are not ids of this model within its context")
    if not 0 <= meta.shared_tokens <= n:
        raise CacheRejected(f"the cache claims {meta.shared_tokens} shared tokens of {n}")
    if not own * spec.bytes_per_token <= meta.nbytes <= spec.max_nbytes(own):
        raise CacheRejected(f"the cache claims {meta.nbytes} bytes for {own} tokens")
    if not 1 <= meta.chunks <= -(-meta.nbytes // MIN_CHUNK_BYTES):
        raise CacheRejected(f"the cache claims {meta.chunks} chunks for {meta.nbytes} bytes")


def from_chunks(
    meta: KVMeta, chunks: list[bytes | None], spec: KVSpec, sealer: Sealer, device: torch.device | str
) -> KV:
    """The own KV the chunks hold (a flat KV of the ids after `meta.shared_tokens`: `KV.linked` joins it to its
    shared segments again), on `device`. Raises CacheRejected, never returns KV it cannot vouch for:
    another model's, a missing or changed chunk, metadata that was altered, or tensors that do not match it."""
    check_meta(meta, spec)
    if len(chunks) != meta.chunks or any(c is None for c in chunks):
        raise CacheRejected("chunks of the cache are missing (expired or evicted)")
    blob = b"".join(chunks)  # type: ignore[arg-type]
    del chunks  # the caller passes the list it read: at most the blob and the tensors are held at once
    if len(blob) != meta.nbytes or not sealer.verify(meta.digest, _signed_part(meta), blob):
        raise CacheRejected(
            "the cache's digest does not match its bytes and metadata"
            + (" (or it was not signed with this deployment's secret)" if sealer.signed else "")
        )
    try:
        tensors = st_load(blob)
        keys = tuple(tensors[f"k{i}"] for i in range(meta.num_layers))
        values = tuple(tensors[f"v{i}"] for i in range(meta.num_layers))
    except Exception as e:  # the digest matched, so this is a writer that broke the format
        raise CacheRejected(f"the cache's tensors cannot be read: {e}") from None
    if len(tensors) != 2 * meta.num_layers or any(
        tuple(k.shape) != meta.key_shape or tuple(v.shape) != meta.value_shape or str(k.dtype) != f"torch.{meta.dtype}"
        for k, v in zip(keys, values, strict=True)
    ):
        raise CacheRejected("the cache's tensors do not have the shapes and dtype its metadata names")
    return KV(meta.ids[meta.shared_tokens :], keys, values).to(device)


def _signed_part(meta: KVMeta) -> bytes:
    return meta.model_dump_json(exclude={"digest"}).encode()


def common_prefix_len(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
