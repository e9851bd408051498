"""What the cost model measures when it has seen nothing yet: a short prefill through the engine, a copy from
host to device memory, and a KV-shaped round trip through Redis (on probe keys of their own)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from chatrt.cache.cost import CostModel
from chatrt.cache.integrity import Sealer
from chatrt.cache.kv import KV, KVMeta, KVSpec, from_chunks
from chatrt.errors import StoreUnavailable
from chatrt.model import LoadedModel

if TYPE_CHECKING:  # the Redis client is an optional install
    from chatrt.cache.store import RedisStore

_PROBE_TOKENS = 128
_PROBE_BYTES = 8 * 2**20
Chunks = Callable[[KV], tuple[KVMeta, list[memoryview]]]


def cost_model(lm: LoadedModel, compute: Callable[[tuple[int, ...]], KV], store: RedisStore | None,
               chunks: Chunks, sealer: Sealer) -> CostModel:  # fmt: skip
    """A cost model whose probes are these (`compute`: the engine's prefill; `chunks`: KV as Redis stores it)."""
    cost = CostModel({})

    def prefill() -> tuple[float, float]:
        ids = tuple(range(1, _PROBE_TOKENS + 1))
        compute(ids[:8])  # warm up
        t0 = time.perf_counter()
        compute(ids)
        return _PROBE_TOKENS, time.perf_counter() - t0

    def host() -> tuple[float, float]:
        x = torch.empty(_PROBE_BYTES // 4, dtype=torch.float32, pin_memory=torch.cuda.is_available())
        t0 = time.perf_counter()
        x.to(lm.device, non_blocking=False)
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        return _PROBE_BYTES, time.perf_counter() - t0

    def redis() -> tuple[float, float]:
        """A KV-shaped round trip (write, read, checksum, load); sets the fixed latency of one call too."""
        assert store is not None
        info = lm.info
        tokens = min(info.max_context, max(16, _PROBE_BYTES // info.kv_bytes_per_token))
        layers = [torch.zeros((1, info.num_kv_heads, tokens, info.head_dim), dtype=lm.dtype)
                  for _ in range(2 * info.num_layers)]  # fmt: skip
        ids = tuple(n % info.vocab_size for n in range(tokens))
        meta, blobs = chunks(KV(ids, tuple(layers[: info.num_layers]), tuple(layers[info.num_layers :])))
        key = f"chatrt:probe:{{{uuid.uuid4().hex}}}"  # their own keys (one cluster slot, by the hash tag)
        keys = [f"{key}:{n}" for n in range(len(blobs))]
        try:
            store.put_values(dict(zip(keys, blobs, strict=True)))
            cost.set_latency("redis", store.round_trip(key))
            t0 = time.perf_counter()
            from_chunks(meta, store.get_chunks(keys, meta.nbytes), KVSpec.of(info), sealer, lm.device)
            return meta.nbytes, time.perf_counter() - t0
        finally:
            with contextlib.suppress(StoreUnavailable):
                store.delete_values(keys)

    cost.probes.update(prefill=prefill, host=host, redis=redis)
    return cost
