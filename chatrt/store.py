"""The Redis tier's storage: session records and KV chunks under DESIGN's keys, with TTLs, pipelining and leases.

Every Redis failure becomes StoreUnavailable, so callers can fall back to recompute and say so.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import redis
from pydantic import BaseModel, ValidationError
from redis.lock import Lock

from chatrt.errors import SessionLeased, StoreUnavailable
from chatrt.kv import KVMeta
from chatrt.stats import DeploymentStats, RuntimeStats
from chatrt.template import Message

RECORD_VERSION = 1
log = logging.getLogger("chatrt")
M = TypeVar("M", bound=BaseModel)


class SessionRecord(BaseModel):
    """A session as Redis keeps it: the transcript (the source of truth) and, when its KV is there, what it is."""

    version: int = RECORD_VERSION
    session_id: str
    system_prompt: str | None
    messages: list[Message]
    turns: int
    """Bumped by every turn, so a process that held the session earlier sees that another advanced it."""
    fingerprint: str
    """Of the model that wrote the transcript; another model must re-tokenize the replies."""
    kv: KVMeta | None = None


def session_key(session_id: str, part: str) -> str:
    # The hash tag keeps one session's keys on one Redis Cluster slot.
    return f"chatrt:{{{session_id}}}:{part}"


def prefix_key(digest: str, part: str) -> str:
    return f"chatrt:prefix:{{{digest}}}:{part}"


def runtime_key(instance: str) -> str:
    return f"chatrt:runtime:{instance}"


class RedisStore:
    def __init__(self, url: str, *, ttl_s: int, lease_s: float, timeout_s: float = 5.0) -> None:
        self.url, self.ttl_s, self.lease_s = url, ttl_s, lease_s
        self.up = True
        """False since a call failed, until one succeeds."""
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        except ValueError as e:
            raise StoreUnavailable(f"tiers.redis_url {url!r} is not a Redis URL: {e}") from None

    # -- sessions --------------------------------------------------------------------------------

    def get_session(self, session_id: str) -> SessionRecord | None:
        with self._guard("read a session"):
            raw = self.client.get(session_key(session_id, "meta"))
        return _parse(SessionRecord, raw)

    def put_session(self, record: SessionRecord, chunks: list[memoryview] | None = None) -> None:
        """Write the record, and with `chunks` the KV its `kv` names; chunks of an older KV are deleted."""
        sid = record.session_id
        with self._guard("write a session"):
            old = _parse(SessionRecord, self.client.get(session_key(sid, "meta")))
            new_count = record.kv.chunks if record.kv is not None else 0
            pipe = self.client.pipeline(transaction=True)
            for n, chunk in enumerate(chunks or ()):
                pipe.set(session_key(sid, f"kv:{n}"), chunk, ex=self.ttl_s)
            stale = range(new_count, old.kv.chunks if old is not None and old.kv is not None else 0)
            if stale:
                pipe.delete(*(session_key(sid, f"kv:{n}") for n in stale))
            if chunks is None and record.kv is not None:  # the KV stays as it is: keep its chunks alive as long
                for n in range(record.kv.chunks):
                    pipe.expire(session_key(sid, f"kv:{n}"), self.ttl_s)
            pipe.set(session_key(sid, "meta"), record.model_dump_json(), ex=self.ttl_s)
            pipe.execute()

    def get_chunks(self, keys: list[str]) -> list[bytes | None]:
        with self._guard("read a cache"):
            return self.client.mget(keys) if keys else []

    def session_chunks(self, session_id: str, meta: KVMeta) -> list[bytes | None]:
        return self.get_chunks([session_key(session_id, f"kv:{n}") for n in range(meta.chunks)])

    def delete_session(self, session_id: str) -> None:
        """Every key of the session: record, KV chunks, lease."""
        with self._guard("delete a session"):
            old = _parse(SessionRecord, self.client.get(session_key(session_id, "meta")))
            count = old.kv.chunks if old is not None and old.kv is not None else 0
            keys = [session_key(session_id, p) for p in ("meta", "lease", *(f"kv:{n}" for n in range(count)))]
            self.client.delete(*keys)

    def take_lease(self, session_id: str, lease: Lock | None = None) -> Lock:
        """The session's lease (SET NX with expiry), so one process advances a session at a time: `lease` renewed
        when this process still holds it, else taken anew. Raises SessionLeased while another process holds it."""
        if lease is None:
            lease = self.client.lock(
                session_key(session_id, "lease"), timeout=self.lease_s, blocking=False, thread_local=False
            )
        with self._guard("take a session's lease"):
            if lease.owned():
                lease.reacquire()
                return lease
            if lease.acquire():
                return lease
        raise SessionLeased(
            f"session {session_id} is in use by another process; try again when it is done "
            f"(its lease lasts {self.lease_s:g} s after its last turn)"
        )

    # -- prefixes --------------------------------------------------------------------------------

    def get_prefix(self, digest: str) -> KVMeta | None:
        with self._guard("read a prefix"):
            return _parse(KVMeta, self.client.get(prefix_key(digest, "meta")))

    def prefix_chunks(self, digest: str, meta: KVMeta) -> list[bytes | None]:
        return self.get_chunks([prefix_key(digest, f"kv:{n}") for n in range(meta.chunks)])

    def put_prefix(self, digest: str, meta: KVMeta, chunks: list[memoryview]) -> None:
        with self._guard("write a prefix"):
            pipe = self.client.pipeline(transaction=True)
            for n, chunk in enumerate(chunks):
                pipe.set(prefix_key(digest, f"kv:{n}"), chunk, ex=self.ttl_s)
            pipe.set(prefix_key(digest, "meta"), meta.model_dump_json(), ex=self.ttl_s)
            pipe.execute()

    # -- operators -------------------------------------------------------------------------------

    def put_runtime_stats(self, instance: str, stats: RuntimeStats, ttl_s: float) -> None:
        """This process's stats for `chatrt stats --redis`; they expire unless published again."""
        with self._guard("publish runtime stats"):
            self.client.set(runtime_key(instance), stats.model_dump_json(), px=max(1, int(ttl_s * 1000)))

    def delete_runtime_stats(self, instance: str) -> None:
        with self._guard("remove runtime stats"):
            self.client.delete(runtime_key(instance))

    def deployment(self) -> DeploymentStats:
        """What every process using this Redis last published, and what Redis holds: sessions, KV, prefixes."""
        with self._guard("read the deployment's stats"):
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
        keys = list(self.client.scan_iter(match=pattern, count=1000))
        return [m for raw in (self.client.mget(keys) if keys else []) if (m := _parse(model, raw)) is not None]

    def ping(self) -> None:
        with self._guard("reach Redis"):
            self.client.ping()

    def close(self) -> None:
        self.client.close()

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Every Redis failure becomes StoreUnavailable; the first after a success is logged, as is the recovery
        (redis-py reconnects on the next call, so Redis coming back needs nothing from chatrt)."""
        try:
            yield
        except redis.RedisError as e:
            if self.up:
                log.warning("Redis at %s is unavailable (%s); serving from memory and transcripts until it is back",
                            self.url, e)  # fmt: skip
            self.up = False
            raise StoreUnavailable(f"could not {what} in Redis: {e}") from e
        if not self.up:
            log.warning("Redis at %s is back", self.url)
        self.up = True


def _parse(model: type[M], raw: bytes | None) -> M | None:
    """The stored JSON as `model`; None when absent or unreadable (a foreign or older writer is a miss)."""
    if raw is None:
        return None
    try:
        return model.model_validate_json(raw)
    except ValidationError:
        return None


class RedisServer:
    """A private redis-server on a free loopback port in a temporary folder (tests, bench). It can be killed
    and started again on the same port, empty, as a real Redis restart after a crash would be."""

    def __init__(self, *args: str, binary: str = "redis-server") -> None:
        path = shutil.which(binary)
        if path is None:
            raise StoreUnavailable("redis-server is not installed; install the redis-server package (see the README)")
        self.folder = Path(tempfile.mkdtemp(prefix="chatrt-redis-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = [path, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                     "--save", "", "--appendonly", "no", *args]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        logfile = self.folder / "log"
        with logfile.open("a") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url)
        try:
            for _ in range(400):
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if self.proc.poll() is not None:
                        raise StoreUnavailable(f"redis-server exited: {logfile.read_text()}") from None
                    time.sleep(0.025)
            raise StoreUnavailable(f"redis-server did not answer within 10 s: {logfile.read_text()}")
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients, nothing saved."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def redis_server(*args: str) -> Iterator[str]:
    """A private redis-server for the duration of the block; yields its URL."""
    server = RedisServer(*args).start()
    try:
        yield server.url
    finally:
        server.stop()
