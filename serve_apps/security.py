"""API keys and per-key rate limits of the allocation service.

Keys come from a secret file (one key per line, ``#`` comments and blank lines ignored) or, when no
file is given, from the environment variable ``DEEPSLICING_API_KEYS`` (comma separated). Keys are
at least 16 characters. A request's ``X-API-Key`` is compared with every key in constant time
(``hmac.compare_digest`` over SHA-256 digests, no early exit), so timing does not tell how much
of a key matched. Keys are never logged: logs and limits use the key's id, the first 12 hex
digits of its SHA-256.

Rate limits are token buckets, one per key: ``rate_per_s`` tokens per second up to ``burst``; a
request takes one token, and a request without one gets 429 with ``Retry-After`` (whole seconds
until a token is back). Buckets live in each replica, so with R replicas a key can reach up to
R x ``rate_per_s`` in total; a cluster-wide limit belongs in front of Serve (ingress gateway).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

KEYS_ENV = "DEEPSLICING_API_KEYS"
MIN_KEY_LENGTH = 16


class ApiKeyError(ValueError):
    """The key configuration is unusable; the message says which source and why."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def read_keys(keys_file: str | None) -> list[str]:
    """The configured keys (see the module docstring); raises :class:`ApiKeyError` if none."""
    if keys_file:
        path = Path(keys_file)
        if not path.is_file():
            raise ApiKeyError(f"api_keys_file: no such file {keys_file!r}")
        lines = path.read_text().splitlines()
        keys = [k.strip() for k in lines if k.strip() and not k.strip().startswith("#")]
        source = f"api_keys_file {keys_file}"
    else:
        keys = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
        source = f"${KEYS_ENV}"
    if not keys:
        raise ApiKeyError(
            f"api_keys_file: no API keys found in {source}; set api_keys_file to a file with one "
            f"key per line or {KEYS_ENV}=key1,key2 (or auth: false on a trusted network only)"
        )
    short = [i for i, k in enumerate(keys) if len(k) < MIN_KEY_LENGTH]
    if short:
        raise ApiKeyError(
            f"api_keys_file: keys must be at least {MIN_KEY_LENGTH} characters; "
            f"key number {short[0] + 1} in {source} is shorter"
        )
    return keys


class KeyRing:
    """Checks a presented key against the configured ones in constant time."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [(_digest(k), key_id(k)) for k in keys]

    def identify(self, presented: str | None) -> str | None:
        """The id of the matching key, or None."""
        if not presented:
            return None
        candidate = _digest(presented)
        found = None
        for digest, ident in self._digests:
            if hmac.compare_digest(candidate, digest):
                found = ident
        return found


@dataclass
class TokenBuckets:
    """One token bucket per key id; ``take`` returns 0 when allowed, else seconds to wait."""

    rate_per_s: float
    burst: float
    clock: object = time.monotonic
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def take(self, ident: str) -> float:
        now = self.clock()
        tokens, last = self._buckets.get(ident, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate_per_s)
        if tokens >= 1.0:
            self._buckets[ident] = (tokens - 1.0, now)
            return 0.0
        self._buckets[ident] = (tokens, now)
        return (1.0 - tokens) / self.rate_per_s

    @staticmethod
    def retry_after(wait_s: float) -> str:
        return str(max(1, math.ceil(wait_s)))
