"""Digests that vouch for what is read back from Redis: sha256, or HMAC-SHA256 under a deployment's secret.

Without a secret a digest catches corruption, truncation and chunks that do not belong together, not forgery:
whoever can write to Redis can recompute a sha256. With a secret (`tiers.redis_secret`), only a process that
knows it can write a record or a cache that this process accepts.
"""

from __future__ import annotations

import hashlib
import hmac


class Sealer:
    def __init__(self, secret: str = "") -> None:
        self._key = secret.encode()

    @property
    def signed(self) -> bool:
        return bool(self._key)

    def digest(self, *parts: bytes | memoryview) -> str:
        """A digest over `parts`, each length-prefixed so that no byte can move from one part to the next.
        Its scheme is part of it: a signing process refuses a plain sha256, and the other way round."""
        h = hmac.new(self._key, digestmod=hashlib.sha256) if self._key else hashlib.sha256()
        for part in parts:
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return f"{'hmac-sha256' if self._key else 'sha256'}:{h.hexdigest()}"

    def verify(self, digest: str, *parts: bytes | memoryview) -> bool:
        return hmac.compare_digest(self.digest(*parts), digest)
