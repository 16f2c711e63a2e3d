"""Window: two running sums over the last N one-second buckets.

The circuit breaker counts (samples, weighted failures) in one, the retry
budget (requests, retries) in another. Adding to the current second is an
attribute increment (``cur_a += 1``) once the caller has checked
``now < edge``; :meth:`roll` moves the bucket boundary, evicting seconds that
left the window, so reading a total never walks the buckets.
"""

from __future__ import annotations

import math


class Window:
    """Sums of ``a`` and ``b`` over the current second and the ``size - 1`` before it.

    Callers add to ``cur_a`` / ``cur_b`` after ``if now >= window.edge:
    window.roll(now)``; ``now`` is a monotonic time in seconds and must not go
    backwards (a smaller one is counted in the current second).
    """

    __slots__ = (
        "_index",
        "_ring_a",
        "_ring_b",
        "_second",
        "cur_a",
        "cur_b",
        "edge",
        "past_a",
        "past_b",
        "size",
    )

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a window needs at least one bucket")
        self.size = size
        self._ring_a = [0] * size
        self._ring_b = [0.0] * size
        self._index = 0
        self._second = -(2**62)  # no second seen yet: the first roll clears everything
        self.edge = -math.inf  # the first add rolls
        self.cur_a = 0  # the current second's sums
        self.cur_b = 0.0
        self.past_a = 0  # the other seconds still in the window
        self.past_b = 0.0

    def roll(self, now: float) -> None:
        """Make the second holding ``now`` the current one."""
        second = math.floor(now)
        elapsed = second - self._second
        if elapsed <= 0:
            return
        ring_a, ring_b, size = self._ring_a, self._ring_b, self.size
        if elapsed >= size:
            for i in range(size):
                ring_a[i] = 0
                ring_b[i] = 0.0
            self.past_a = 0
            self.past_b = 0.0
        else:
            index = self._index
            ring_a[index] = self.cur_a
            ring_b[index] = self.cur_b
            past_a = self.past_a + self.cur_a
            past_b = self.past_b + self.cur_b
            for _ in range(elapsed):
                index = (index + 1) % size
                past_a -= ring_a[index]
                past_b -= ring_b[index]
                ring_a[index] = 0
                ring_b[index] = 0.0
            self._index = index
            self.past_a = past_a
            self.past_b = past_b
        self.cur_a = 0
        self.cur_b = 0.0
        self._second = second
        self.edge = float(second + 1)

    def totals(self, now: float) -> tuple[int, float]:
        """``(a, b)`` summed over the window ending at ``now``."""
        if now >= self.edge:
            self.roll(now)
        return self.past_a + self.cur_a, self.past_b + self.cur_b

    def recent(self, now: float, seconds: int) -> tuple[int, float]:
        """``(a, b)`` summed over the last ``seconds`` seconds (the current one
        included; at most the whole window)."""
        if now >= self.edge:
            self.roll(now)
        if seconds >= self.size:
            return self.past_a + self.cur_a, self.past_b + self.cur_b
        a, b = self.cur_a, self.cur_b
        ring_a, ring_b, size, index = self._ring_a, self._ring_b, self.size, self._index
        for _ in range(seconds - 1):
            index = (index - 1) % size
            a += ring_a[index]
            b += ring_b[index]
        return a, b

    def clear(self) -> None:
        for i in range(self.size):
            self._ring_a[i] = 0
            self._ring_b[i] = 0.0
        self.cur_a = self.past_a = 0
        self.cur_b = self.past_b = 0.0
