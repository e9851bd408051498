"""The Redis tier's storage: session records and KV chunks, with TTLs, pipelining, leases and fenced writes (a
transaction on one session's keys, one hash slot, so it works on Redis Cluster too).

Keys: `chatrt:{<session>}:meta` (the record: transcript, KV metadata, rev, signature), `:kv:<n>` (its KV's
chunks), `:lease` (the owner token of the process holding it), `:closed` (a tombstone);
`chatrt:prefix:{<digest>}:meta` and `:kv:<n>` (an evicted shared prefix). The braces are Redis Cluster hash tags.

Every Redis failure becomes StoreUnavailable, so callers can fall back to recompute and say so.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import TypeVar

import redis
from pydantic import BaseModel, ValidationError
from redis.client import Pipeline
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from chatrt.cache.integrity import Sealer
from chatrt.cache.kv import KVMeta
from chatrt.cache.record import SessionRecord
from chatrt.errors import (
    CacheRejected,
    ChatrtError,
    InvalidMessage,
    SessionClosed,
    SessionConflict,
    SessionLeased,
    SessionNotFound,
    StoreUnavailable,
)

log = logging.getLogger("chatrt")
M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
# Chunks n, n+1, ... of a session (KEYS[1] = its "kv:" prefix, one slot) up to the first missing one: the count
# stored metadata claims is never trusted, so a forged record cannot make a delete or a renewal cost more.
_DELETE_CHUNKS = "local n = tonumber(ARGV[1]) while redis.call('del', KEYS[1] .. n) == 1 do n = n + 1 end return n"
_EXPIRE_CHUNKS = "local n = 0 while redis.call('expire', KEYS[1] .. n, ARGV[1]) == 1 do n = n + 1 end return n"


def session_key(session_id: str, part: str) -> str:
    # The hash tag keeps one session's keys on one Redis Cluster slot, so its transactions work there too.
    return f"chatrt:{{{session_id}}}:{part}"


def prefix_key(digest: str, part: str) -> str:
    return f"chatrt:prefix:{{{digest}}}:{part}"


@dataclass
class _Stored:
    """A session's keys as one fenced transaction sees them."""

    record: SessionRecord | None  # None: absent, or present but not to be trusted
    holder: bytes | None  # the lease's value: the owner token of the process holding it
    closed: bool  # a tombstone: the session was closed


class RedisStore:
    def __init__(
        self,
        url: str,
        *,
        ttl_s: int,
        lease_s: float,
        timeout_s: float = 5.0,
        secret: str = "",
        cluster: bool = False,
    ) -> None:
        """`cluster`: `url` names a node of a Redis Cluster (the client finds the others). Every key of a session
        (and of a prefix) carries a hash tag, so its transactions and scripts run on one slot."""
        self.url, self.ttl_s, self.lease_s, self.cluster = url, ttl_s, lease_s, cluster
        self.sealer = Sealer(secret)
        self.owner = uuid.uuid4().hex.encode()
        """The value of every lease this store holds: one token per process (per runtime)."""
        self.up = True
        """False since a call failed, until one succeeds."""
        timeouts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        try:
            if cluster:  # it connects to learn the cluster's slots: a cluster that cannot be reached is said now
                self.client: redis.Redis = RedisCluster.from_url(url, **timeouts)  # type: ignore[assignment]
            else:
                self.client = redis.Redis.from_url(url, **timeouts)
        except ValueError as e:
            raise StoreUnavailable(f"tiers.redis_url {url!r} is not a Redis URL: {e}") from None
        except (redis.RedisError, RedisClusterException) as e:
            raise StoreUnavailable(f"the Redis Cluster at {url} cannot be reached: {e}") from None
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)

    # -- sessions --------------------------------------------------------------------------------

    def get_session(self, session_id: str) -> SessionRecord | None:
        """The stored record; None when there is none or it cannot be trusted (unreadable, another session's, not
        signed with this deployment's secret). Raises SessionClosed when the session was closed."""
        try:
            return self.read_session(session_id)
        except SessionNotFound:
            return None

    def read_session(self, session_id: str) -> SessionRecord:
        """The stored record. Raises SessionClosed when the session was closed, SessionNotFound when there is none
        or it cannot be trusted, saying why."""
        with self.guard("read a session"):
            raw, closed = self.client.mget(session_key(session_id, "meta"), session_key(session_id, "closed"))
        record, why = self._trusted(session_id, raw)
        if record is None and closed is not None:
            raise SessionClosed(f"session {session_id} was closed; open a new session")
        if record is None:
            raise SessionNotFound(f"no session has id {session_id!r} here or in Redis; open a new one" if raw is None
                                  else f"session {session_id!r} is in Redis, but its record was refused: {why}; "
                                  "it cannot be resumed, open a new session")  # fmt: skip
        return record

    def create_session(self, record: SessionRecord) -> None:
        """Store a new session (a closed one's id may be used again) and take its lease.
        Raises InvalidMessage when a session with this id is stored, SessionLeased while another process holds it."""
        sid = record.session_id

        def write(pipe: Pipeline, now: _Stored) -> None:
            if now.record is not None:
                raise InvalidMessage(f"session {sid} exists in Redis; use rt.session(id) to resume it")
            self._check_holder(sid, now, SessionLeased)
            pipe.multi()
            pipe.set(session_key(sid, "meta"), self._sealed(record).model_dump_json(), ex=self.ttl_s)
            pipe.set(session_key(sid, "lease"), self.owner, px=self._lease_ms)
            pipe.delete(session_key(sid, "closed"))

        self._fenced(sid, "create a session", write)

    def put_session(
        self, record: SessionRecord, *, replaces: Collection[str], chunks: list[memoryview] | None = None
    ) -> None:
        """Write the transcript (`record.rev` new), and with `chunks` the KV its `kv` names; chunks of an older
        KV are deleted. Fenced: only while no other process holds the lease (this process takes or renews it)
        and the stored rev is one of `replaces` (a record that expired may be written again). Raises
        SessionConflict when another process holds the session, wrote a newer transcript or closed it."""
        sid = record.session_id

        def write(pipe: Pipeline, now: _Stored) -> None:
            self._check_holder(sid, now, SessionConflict)
            if now.record is None and now.closed:
                raise SessionConflict(f"session {sid} was closed by another process; this turn was not saved")
            if now.record is not None and now.record.rev not in replaces:
                raise SessionConflict(
                    f"another process answered session {sid} while this process's lease had run out; this turn "
                    "was not saved over it"
                )
            pipe.multi()
            self._queue_kv(pipe, sid, record.kv, chunks)
            pipe.set(session_key(sid, "meta"), self._sealed(record).model_dump_json(), ex=self.ttl_s)
            pipe.set(session_key(sid, "lease"), self.owner, px=self._lease_ms)

        self._fenced(sid, "write a session", write)

    def put_kv(self, session_id: str, meta: KVMeta | None, chunks: list[memoryview] | None = None) -> bool:
        """Attach a KV to the stored transcript (or with None, drop the stored one), leaving the transcript as
        it is. Refused (False) when the session is not stored or another process holds its lease."""
        sid = session_id

        def write(pipe: Pipeline, now: _Stored) -> bool:
            if now.record is None or now.holder not in (None, self.owner):
                return False
            pipe.multi()
            self._queue_kv(pipe, sid, meta, chunks)
            record = self._sealed(now.record.model_copy(update={"kv": meta}))
            pipe.set(session_key(sid, "meta"), record.model_dump_json(), ex=self.ttl_s)
            return True

        return self._fenced(sid, "write a cache", write)

    def delete_session(self, session_id: str) -> None:
        """Every key of the session (record, KV chunks, lease), and a tombstone in their place that expires with
        them, so that no process resumes it. Raises SessionLeased while another process holds it."""
        sid = session_id

        def write(pipe: Pipeline, now: _Stored) -> None:
            self._check_holder(sid, now, SessionLeased)
            pipe.multi()
            pipe.delete(session_key(sid, "meta"), session_key(sid, "lease"))
            pipe.execute_command("EVAL", _DELETE_CHUNKS, 1, session_key(sid, "kv:"), 0)
            pipe.set(session_key(sid, "closed"), b"1", ex=self.ttl_s)

        self._fenced(sid, "delete a session", write)

    def get_chunks(self, keys: list[str], nbytes: int) -> list[bytes | None]:
        """The values of `keys`, read only when their sizes add up to `nbytes`: metadata that lies about its
        chunks cannot make this process read more than it declared (and checks against the model)."""
        if not keys:
            return []
        with self.guard("read a cache"):
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.strlen(key)
            sizes = pipe.execute()
            if 0 in sizes or sum(sizes) != nbytes:
                raise CacheRejected("chunks of the cache are missing or not the size its metadata says")
            return self.client.mget(keys)

    def session_chunks(self, session_id: str, meta: KVMeta) -> list[bytes | None]:
        return self.get_chunks([session_key(session_id, f"kv:{n}") for n in range(meta.chunks)], meta.nbytes)

    # -- leases ----------------------------------------------------------------------------------

    def take_lease(self, session_id: str) -> bool:
        """Hold the session's lease for `lease_s` more: renewed when this process holds it (returns True: held
        without a break, so nobody else wrote meanwhile), else taken anew (False). Raises SessionLeased while
        another process holds it."""
        key = session_key(session_id, "lease")
        with self.guard("take a session's lease"):
            if self._renew(keys=[key], args=[self.owner, self._lease_ms]):
                return True
            if self.client.set(key, self.owner, nx=True, px=self._lease_ms):
                return False
        raise SessionLeased(
            f"session {session_id} is in use by another process; try again when it is done "
            f"(its lease lasts {self.lease_s:g} s after its last turn)"
        )

    def renew_lease(self, session_id: str) -> bool:
        """Extend the lease this process holds; False when it does not hold it any more."""
        with self.guard("renew a session's lease"):
            return bool(self._renew(keys=[session_key(session_id, "lease")], args=[self.owner, self._lease_ms]))

    def release_lease(self, session_id: str) -> None:
        with self.guard("release a session's lease"):
            self._release(keys=[session_key(session_id, "lease")], args=[self.owner])

    @property
    def _lease_ms(self) -> int:
        return max(1, int(self.lease_s * 1000))

    # -- fenced transactions ---------------------------------------------------------------------

    def _fenced(self, session_id: str, what: str, write: Callable[[Pipeline, _Stored], R]) -> R:
        """Run `write` in a transaction on the session's keys (one hash slot): it sees them as they are and
        queues its commands after `pipe.multi()`; when another client changes a key before they run, it runs
        again on the new state (optimistic locking with WATCH)."""
        keys = [session_key(session_id, p) for p in ("meta", "lease", "closed")]
        with self.guard(what):
            for _ in range(16):
                with self.client.pipeline(transaction=True) as pipe:
                    try:
                        pipe.watch(*keys)
                        raw, holder, closed = (pipe.get(key) for key in keys)  # read at once while watched
                        result = write(pipe, _Stored(self._trusted(session_id, raw)[0], holder, closed is not None))
                        pipe.execute()  # what `write` queued after multi(), if anything
                        return result
                    except redis.WatchError:
                        continue
            raise StoreUnavailable(f"could not {what}: its keys kept changing under 16 tries")

    def _check_holder(self, session_id: str, now: _Stored, error: type[ChatrtError]) -> None:
        if now.holder not in (None, self.owner):
            raise error(
                f"session {session_id} is in use by another process; try again when it is done "
                f"(its lease lasts {self.lease_s:g} s after its last turn)"
            )

    def _queue_kv(self, pipe: Pipeline, sid: str, meta: KVMeta | None, chunks: list[memoryview] | None) -> None:
        """Queue the writes that leave exactly `meta`'s chunks stored: new ones set, the rest deleted, or with
        no new chunks, the stored ones given the record's TTL again. (EVAL goes through execute_command: redis-py's
        cluster pipeline refuses .eval(), and the command routes by its one key, on the session's slot.)"""
        prefix = session_key(sid, "kv:")
        for n, chunk in enumerate(chunks or ()):
            pipe.set(f"{prefix}{n}", chunk, ex=self.ttl_s)
        if chunks is None and meta is not None:
            pipe.execute_command("EVAL", _EXPIRE_CHUNKS, 1, prefix, self.ttl_s)
        else:
            pipe.execute_command("EVAL", _DELETE_CHUNKS, 1, prefix, len(chunks or ()))

    def _sealed(self, record: SessionRecord) -> SessionRecord:
        return record.model_copy(update={"sig": self.sealer.digest(_record_bytes(record))})

    def _trusted(self, session_id: str, raw: bytes | None) -> tuple[SessionRecord | None, str]:
        """The stored record when it can be trusted, else None and why not."""
        if raw is None:
            return None, "absent"
        record = parse(SessionRecord, raw)
        if record is None:
            why = "it is unreadable (damaged, or written by another version of chatrt)"
        elif record.session_id != session_id:
            why = f"it is the record of another session ({record.session_id!r})"
        elif self.sealer.verify(record.sig, _record_bytes(record)):
            return record, ""
        elif self.sealer.signed:
            why = ("it is not signed with this deployment's secret (tiers.redis_secret): written by a process "
                   "without the secret, or altered since")  # fmt: skip
        else:
            why = "it was altered after it was written (its digest does not match)"
        log.warning("refused the stored record of session %s: %s", session_id, why)
        return None, why

    # -- prefixes --------------------------------------------------------------------------------

    def get_prefix(self, digest: str) -> KVMeta | None:
        with self.guard("read a prefix"):
            return parse(KVMeta, self.client.get(prefix_key(digest, "meta")))

    def prefix_chunks(self, digest: str, meta: KVMeta) -> list[bytes | None]:
        return self.get_chunks([prefix_key(digest, f"kv:{n}") for n in range(meta.chunks)], meta.nbytes)

    def put_prefix(self, digest: str, meta: KVMeta, chunks: list[memoryview]) -> None:
        with self.guard("write a prefix"):
            pipe = self.client.pipeline(transaction=True)
            for n, chunk in enumerate(chunks):
                pipe.set(prefix_key(digest, f"kv:{n}"), chunk, ex=self.ttl_s)
            pipe.set(prefix_key(digest, "meta"), meta.model_dump_json(), ex=self.ttl_s)
            pipe.execute()

    def put_values(self, values: dict[str, bytes | memoryview]) -> None:
        """Plain values on one slot (the cost model's probe), expiring with the TTL."""
        with self.guard("write a probe"):
            pipe = self.client.pipeline(transaction=False)
            for key, value in values.items():
                pipe.set(key, value, ex=self.ttl_s)
            pipe.execute()

    def delete_values(self, keys: list[str]) -> None:
        with self.guard("delete a probe"):
            self.client.delete(*keys)

    def round_trip(self, key: str) -> float:
        """Seconds for one GET: the fixed latency of a call."""
        with self.guard("time a round trip"):
            t0 = time.perf_counter()
            self.client.get(key)
            return time.perf_counter() - t0

    def ping(self) -> None:
        with self.guard("reach Redis"):
            self.client.ping()

    def close(self) -> None:
        self.client.close()

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Every Redis failure becomes StoreUnavailable; the first after a success is logged, as is the recovery
        (redis-py reconnects on the next call, so Redis coming back needs nothing from chatrt)."""
        try:
            yield
        except (redis.RedisError, RedisClusterException) as e:  # the second is not a RedisError
            if self.up:
                log.warning("Redis at %s is unavailable (%s); serving from memory and transcripts until it is back",
                            self.url, e)  # fmt: skip
            self.up = False
            raise StoreUnavailable(f"could not {what} in Redis: {e}") from e
        if not self.up:
            log.warning("Redis at %s is back", self.url)
        self.up = True


def _record_bytes(record: SessionRecord) -> bytes:
    return record.model_dump_json(exclude={"sig"}).encode()


def parse(model: type[M], raw: bytes | None) -> M | None:
    """The stored JSON as `model`; None when absent or unreadable (a foreign or older writer is a miss)."""
    if raw is None:
        return None
    try:
        return model.model_validate_json(raw)
    except ValidationError:
        return None
