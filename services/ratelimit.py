"""Token buckets per client: `GENSERVE_RATE_LIMIT` (requests) and
`GENSERVE_RATE_LIMIT_IMAGE_STEPS` (diffusion cost: denoising steps x images).

A bucket holds at most `count` tokens (the burst) and refills at count / period. A
request that finds too few tokens takes none and is told when enough will be there
(Retry-After). Buckets live in a bounded LRU: a client not seen for a while has a full
bucket anyway, so forgetting the least recently seen costs nothing but memory.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

from services.config import Rate

MAX_CLIENTS = 100_000


class RateLimiter:
    def __init__(self, rate: Rate, clock=time.monotonic, max_clients: int = MAX_CLIENTS):
        self.rate = rate
        self.capacity = rate.count
        self.refill_per_s = rate.per_second
        self._clock = clock
        self._max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def acquire(self, client: str, cost: float = 1.0) -> float:
        """Takes `cost` tokens; returns 0 on success, else the seconds until it would fit.
        A cost above the burst can never fit: the caller must refuse it outright."""
        return self._take(client, cost, take=True)

    def wait(self, client: str, cost: float = 1.0) -> float:
        """The seconds until `cost` tokens are there (0: now), taking none."""
        return self._take(client, cost, take=False)

    def _take(self, client: str, cost: float, take: bool) -> float:
        now = self._clock()
        tokens, at = self._buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.refill_per_s)
        if tokens >= cost:
            tokens -= cost if take else 0.0
            wait = 0.0
        else:
            wait = (cost - tokens) / self.refill_per_s
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return wait


def retry_after(seconds: float) -> int:
    """Whole seconds for a Retry-After header, at least 1."""
    return max(1, math.ceil(seconds))
