"""Hit ratio of the response cache's eviction (SIEVE, app/cache.py) against a
plain LRU, on seeded Zipf-skewed traces (bounded: a fixed number of requests).

Each trace draws ``--requests`` keys from ``--keys`` distinct requests with a
Zipf(alpha) popularity (rank r drawn with weight 1 / r**alpha), the keys
shuffled once so popularity does not follow insertion order. Every answer has
the same size, so the entry bound decides; each configuration is run with the
cache holding 1 %, 5 % and 10 % of the distinct keys. A miss stores the answer
(as the gateway does); TTLs are long enough never to expire.

A second trace mixes the skewed workload with one-off requests (a batch job's
unique prompts: ``--scan`` of the requests never repeat), where LRU lets every
one-off push out a popular answer.

    python bench/cache_eviction.py [--requests 1000000] [--keys 100000] [--seed 15]

Prints the hit ratios and SIEVE's gain over LRU.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import random
from collections import OrderedDict

from gandalf.app.cache import CachedAnswer, InProcessCache
from gandalf.domain import Usage

_ANSWER = CachedAnswer(b"x" * 100, Usage(), "p", "m")


class LRU:
    """The baseline: an OrderedDict, the least recently used entry evicted."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[int, bool] = OrderedDict()

    def request(self, key: int) -> bool:
        entries = self.entries
        if key in entries:
            entries.move_to_end(key)
            return True
        if len(entries) >= self.capacity:
            entries.popitem(last=False)
        entries[key] = True
        return False


class Sieve:
    """The gateway's InProcessCache, bounded by entries, with a frozen clock."""

    def __init__(self, capacity: int) -> None:
        self.cache = InProcessCache(capacity, 1 << 62, clock=lambda: 0.0)

    def request(self, key: int) -> bool:
        raw = key.to_bytes(8, "little")
        if self.cache.lookup(raw) is not None:
            return True
        self.cache.store(raw, _ANSWER, 1e9)
        return False


def zipf_trace(requests: int, keys: int, alpha: float, rng: random.Random) -> list[int]:
    weights = [1.0 / (rank**alpha) for rank in range(1, keys + 1)]
    cumulative = list(itertools.accumulate(weights))
    total = cumulative[-1]
    ids = list(range(keys))
    rng.shuffle(ids)  # popularity unrelated to key order
    return [ids[bisect.bisect_left(cumulative, rng.random() * total)] for _ in range(requests)]


def with_scans(trace: list[int], share: float, rng: random.Random, start: int) -> list[int]:
    """``trace`` with ``share`` of its requests replaced by keys never seen again."""
    fresh = itertools.count(start)
    return [next(fresh) if rng.random() < share else key for key in trace]


def ratio(policy: LRU | Sieve, trace: list[int]) -> float:
    hits = sum(policy.request(key) for key in trace)
    return hits / len(trace)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--scan", type=float, default=0.3)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print(f"{args.requests:,} requests over {args.keys:,} keys, seed {args.seed}")
    print(f"{'trace':22} {'cache':>6} {'LRU':>7} {'SIEVE':>7} {'gain':>7}")
    for alpha in (0.8, 1.0, 1.2):
        base = zipf_trace(args.requests, args.keys, alpha, rng)
        traces = {
            f"zipf {alpha}": base,
            f"zipf {alpha} + {args.scan:.0%} once": with_scans(base, args.scan, rng, args.keys),
        }
        for name, trace in traces.items():
            for percent in (1, 5, 10):
                capacity = args.keys * percent // 100
                lru, sieve = ratio(LRU(capacity), trace), ratio(Sieve(capacity), trace)
                print(
                    f"{name:22} {percent:>5}% {lru:7.1%} {sieve:7.1%} {(sieve - lru) * 100:+6.1f}pt"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
