"""Tenants: who a request is, by its API key, and how much it may hold.

A tenant's sessions live under its own prefix of session ids (`acme.` + the id its clients use), so no request
can name another tenant's session, in this process or in another one sharing Redis. With one key, or none,
there is one tenant and ids are as clients give them. Each tenant may hold a share of the open sessions and
of the requests in flight, so one tenant cannot exhaust the server for the others.
"""

from __future__ import annotations

import secrets
import threading
from collections import Counter
from dataclasses import dataclass

from chatrt.config import ServeConfig


@dataclass(frozen=True)
class Tenant:
    name: str
    prefix: str
    """Prepended to the session ids its clients use ("" when the server has one tenant)."""

    def internal(self, session_id: str) -> str:
        return self.prefix + session_id

    def external(self, session_id: str) -> str:
        return session_id.removeprefix(self.prefix)

    def owns(self, session_id: str) -> bool:
        return session_id.startswith(self.prefix)


class Tenants:
    def __init__(self, config: ServeConfig, max_sessions: int, max_requests: int) -> None:
        keys = {name: key.get_secret_value() for name, key in config.api_keys.items()}
        if config.api_key.get_secret_value():
            keys.setdefault("default", config.api_key.get_secret_value())
        self.keys = keys
        several = len(keys) > 1
        self.tenants = {name: Tenant(name, f"{name}." if several else "") for name in keys or ["default"]}
        share = max(1, len(self.tenants))
        self.max_sessions = config.tenant_sessions or max(1, max_sessions // share)
        self.max_requests = config.tenant_requests or max(1, max_requests // share)
        self._in_flight: Counter[str] = Counter()
        self._lock = threading.Lock()

    def identify(self, authorization: str) -> Tenant | None:
        """The tenant whose key the Authorization header carries (`Bearer`, the scheme in any case, as RFC 9110
        says); None when it carries none of them. Without keys every request is the one tenant."""
        if not self.keys:
            return self.tenants["default"]
        scheme, _, given = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        found = None
        for name, key in self.keys.items():  # every key compared, in constant time each
            if secrets.compare_digest(given.strip().encode(), key.encode()):
                found = self.tenants[name]
        return found

    def admit(self, tenant: Tenant, count: int = 1) -> bool:
        """Count `count` of the tenant's requests in, all or none (False: they would pass its share)."""
        with self._lock:
            if self._in_flight[tenant.name] + count > self.max_requests:
                return False
            self._in_flight[tenant.name] += count
            return True

    def release(self, tenant: Tenant, count: int = 1) -> None:
        with self._lock:
            assert self._in_flight[tenant.name] >= count
            self._in_flight[tenant.name] -= count

    def in_flight(self, tenant: Tenant) -> int:
        with self._lock:
            return self._in_flight[tenant.name]
