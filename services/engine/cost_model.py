"""What a denoiser call costs, by batch rows and shape bucket: measured, not assumed.

The engine times the denoiser at start-up for a ladder of batch sizes (1, 2, 4, ... up to
the model's max batch) at the native size, and every live call refreshes the entry of its
(bucket, rows) with a moving average. From that table:

  best_rows(bucket)         the rows per iteration with the most rows per second whose call
                            stays within the latency budget (on a CPU the per-row cost may
                            rise again past a few rows; on a GPU it stays flat far longer,
                            and the same rule finds where it bends)
  seconds_per_row(bucket)   the cost of one row at that size: what the queue's drain time,
                            Retry-After and the back-pressure bound are computed from

Between measured sizes the latency is interpolated linearly (so rows per second is monotone
between two points and its maximum is always a measured size); a bucket never measured is
priced from the native bucket's table scaled by its area. Runs no model itself: the engine
feeds it timings, so the policy is a pure function of the table (tests give it one).
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

Bucket = tuple[int, int]
# What callers pass: a request's (height, width), None where it leaves a side to the model
# (the native size), or None for the native bucket.
Shape = tuple[int | None, int | None] | None

# Moving-average weight of a live timing: live calls refresh the table without one noisy
# call (another process on the cores) moving it far.
LIVE_WEIGHT = 0.1
# Rows per second within this fraction of the best count as equal; the smaller batch wins
# (shorter iterations, same throughput), which keeps measurement noise from flapping.
TIE_TOLERANCE = 0.02
# Every this many scheduling decisions with more rows waiting than the best size, one
# iteration runs the measured size whose entry is oldest, so the table keeps tracking
# sizes the policy stopped choosing (a start-up measure taken under load is not forever).
EXPLORE_EVERY = 64


def row_ladder(max_rows: int) -> list[int]:
    """1, 2, 4, ... and max_rows: the sizes measured at start-up."""
    sizes, n = [], 1
    while n < max_rows:
        sizes.append(n)
        n *= 2
    return sorted({*sizes, max(1, max_rows)})


@dataclass
class Entry:
    seconds: float
    updated: float  # time.monotonic() of the last measure
    samples: int = 1


class CostModel:
    def __init__(self, max_rows: int, latency_budget_s: float = 0.0, native: Bucket | None = None,
                 learn: bool = True):
        """`latency_budget_s` (0: none) bounds one denoiser call: sizes slower than that are
        not chosen (the smallest size always is, if nothing fits). `learn=False` ignores live
        timings (tests that count iterations: the table stays what they gave it)."""
        self.max_rows = max(1, max_rows)
        self.learn = learn
        self.latency_budget_s = latency_budget_s
        self.native = native
        self.tables: dict[Bucket, dict[int, Entry]] = {}
        self._decisions = 0

    def _key(self, bucket: Shape) -> Bucket:
        """A request that leaves its size to the model (None) runs at the native size."""
        height, width = bucket if bucket is not None else (None, None)
        if height is None or width is None:
            return self.native if self.native is not None else (0, 0)
        return (height, width)

    # -- feeding ---------------------------------------------------------------------
    def seed(self, bucket: Shape, seconds_by_rows: dict[int, float], now: float | None = None) -> None:
        """A measured table (start-up): replaces the bucket's entries of those sizes."""
        now = time.monotonic() if now is None else now
        bucket = self._key(bucket)
        table = self.tables.setdefault(bucket, {})
        for rows, seconds in seconds_by_rows.items():
            if rows >= 1 and seconds > 0:
                table[rows] = Entry(seconds, now)
        if self.native is None:
            self.native = bucket

    def observe(self, bucket: Shape, rows: int, seconds: float, now: float | None = None) -> None:
        """One live call's duration refreshes its entry (a new size gets its own)."""
        if rows < 1 or seconds <= 0 or not self.learn:
            return
        now = time.monotonic() if now is None else now
        bucket = self._key(bucket)
        entry = self.tables.setdefault(bucket, {}).get(rows)
        if entry is None:
            self.tables[bucket][rows] = Entry(seconds, now)
        else:
            entry.seconds += LIVE_WEIGHT * (seconds - entry.seconds)
            entry.updated, entry.samples = now, entry.samples + 1
        if self.native is None:
            self.native = bucket

    @property
    def measured(self) -> bool:
        return any(self.tables.values())

    # -- reading ---------------------------------------------------------------------
    def _table(self, bucket: Shape) -> tuple[dict[int, float], float]:
        """(seconds by rows, scale): the bucket's own table, else the native one scaled by area."""
        bucket = self._key(bucket)
        own = self.tables.get(bucket)
        if own:
            return {n: e.seconds for n, e in own.items()}, 1.0
        if self.native and self.tables.get(self.native):
            scale = (bucket[0] * bucket[1]) / max(1, self.native[0] * self.native[1])
            return {n: e.seconds for n, e in self.tables[self.native].items()}, scale
        return {}, 1.0

    def latency(self, bucket: Shape, rows: int) -> float | None:
        """Seconds for one call of `rows` rows: interpolated between measured sizes, past the
        largest extrapolated at its cost per row; None before any measure."""
        table, scale = self._table(bucket)
        if not table:
            return None
        sizes = sorted(table)
        if rows in table:
            return table[rows] * scale
        i = bisect.bisect_left(sizes, rows)
        if i == 0:
            return table[sizes[0]] * scale  # smaller than the smallest measured: no cheaper
        if i == len(sizes):
            last = sizes[-1]
            return table[last] / last * rows * scale
        a, b = sizes[i - 1], sizes[i]
        return (table[a] + (table[b] - table[a]) * (rows - a) / (b - a)) * scale

    def best_rows(self, bucket: Shape, limit: int | None = None) -> int:
        """The size (<= limit, <= max_rows) with the most rows per second within the latency
        budget; the smallest within TIE_TOLERANCE of the best. max_rows before any measure
        (then "as many as fit" is all there is to go on)."""
        limit = min(self.max_rows, limit or self.max_rows)
        table, scale = self._table(bucket)
        sizes = sorted(n for n in table if n <= limit)
        if not sizes:
            return limit
        fits = [n for n in sizes if not self.latency_budget_s or table[n] * scale <= self.latency_budget_s]
        if not fits:
            return sizes[0]
        rate = {n: n / table[n] for n in fits}
        top = max(rate.values())
        best = min(n for n in fits if rate[n] >= (1 - TIE_TOLERANCE) * top)
        if best == max(table) and best < limit:
            # Nothing measured past the best yet (no warm-up; only small calls seen): larger
            # sizes are presumed no worse per row, up to what the budget allows, until timed.
            per_row = table[best] * scale / best
            if not self.latency_budget_s:
                return limit
            return max(best, min(limit, int(self.latency_budget_s / per_row)))
        return best

    def seconds_per_row(self, bucket: Shape) -> float | None:
        """Cost of one row at the best size (None before any measure)."""
        n = self.best_rows(bucket)
        seconds = self.latency(bucket, n)
        return None if seconds is None else seconds / n

    def target_rows(self, bucket: Shape, waiting_rows: int, now: float | None = None) -> int:
        """Rows to run this iteration when `waiting_rows` could: the best size, except that
        every EXPLORE_EVERY-th decision with more rows waiting than that runs the stalest
        measured size that the waiting rows can fill (to keep its entry current)."""
        best = self.best_rows(bucket)
        if waiting_rows <= best:
            return best
        self._decisions += 1
        if self._decisions % EXPLORE_EVERY:
            return best
        own = self.tables.get(self._key(bucket)) or {}
        candidates = [(e.updated, n) for n, e in own.items() if n <= min(waiting_rows, self.max_rows) and n != best]
        return min(candidates)[1] if candidates else best

    def describe(self, bucket: Shape = None) -> dict:
        """For GET /v1/models: the table (ms per call by rows) and what the policy makes of it."""
        bucket = self._key(bucket)
        if not self.tables.get(bucket):
            return {"measured": False, "max_rows": self.max_rows,
                    "latency_budget_ms": round(1000 * self.latency_budget_s, 3) or None}
        table = self.tables[bucket]
        best = self.best_rows(bucket)
        return {
            "measured": True,
            "bucket": {"height": bucket[0], "width": bucket[1]},
            "ms_per_call": {str(n): round(1000 * table[n].seconds, 3) for n in sorted(table)},
            "best_rows": best,
            "ms_per_row_at_best": round(1000 * table[best].seconds / best, 4) if best in table else None,
            "rows_per_second": round(best / (self.latency(bucket, best) or table[best].seconds), 1),
            "max_rows": self.max_rows,
            "latency_budget_ms": round(1000 * self.latency_budget_s, 3) or None,
        }
