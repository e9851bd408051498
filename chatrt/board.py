"""The operators' board in Redis: each process publishes its RuntimeStats there (`chatrt:runtime:<instance>`,
expiring unless published again), and `chatrt stats --redis` reads every process's beside what Redis holds
(sessions, their KV, shared prefixes). It shares the store's connection and nothing else.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel

from chatrt.cache.kv import KVMeta
from chatrt.cache.record import SessionRecord
from chatrt.cache.store import RedisStore, parse, prefix_key, session_key
from chatrt.stats import DeploymentStats, RuntimeStats

M = TypeVar("M", bound=BaseModel)


def runtime_key(instance: str) -> str:
    return f"chatrt:runtime:{instance}"


class Board:
    def __init__(self, store: RedisStore) -> None:
        self.store = store

    def publish(self, instance: str, stats: RuntimeStats, ttl_s: float) -> None:
        """This process's stats for `chatrt stats --redis`; they expire unless published again."""
        with self.store.guard("publish runtime stats"):
            self.store.client.set(runtime_key(instance), stats.model_dump_json(), px=max(1, int(ttl_s * 1000)))

    def remove(self, instance: str) -> None:
        with self.store.guard("remove runtime stats"):
            self.store.client.delete(runtime_key(instance))

    def deployment(self) -> DeploymentStats:
        """What every process using this Redis last published, and what Redis holds: sessions, KV, prefixes."""
        with self.store.guard("read the deployment's stats"):
            runtimes = {s.instance: s for s in self._all(RuntimeStats, runtime_key("*"))}
            records = self._all(SessionRecord, session_key("*", "meta"))
            prefix_metas = self._all(KVMeta, prefix_key("*", "meta"))
        return DeploymentStats(
            runtimes=runtimes,
            sessions=len(records),
            sessions_with_kv=sum(r.kv is not None for r in records),
            kv_bytes=sum(r.kv.nbytes for r in records if r.kv is not None),
            prefixes=len(prefix_metas),
            prefix_bytes=sum(p.nbytes for p in prefix_metas),
        )

    def _all(self, model: type[M], pattern: str) -> list[M]:
        client = self.store.client
        keys = list(client.scan_iter(match=pattern, count=1000))  # every node's, on a cluster
        if not keys:
            return []
        values = client.mget_nonatomic(keys) if self.store.cluster else client.mget(keys)  # type: ignore[attr-defined]
        return [m for raw in values if (m := parse(model, raw)) is not None]
