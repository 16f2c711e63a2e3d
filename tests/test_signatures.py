"""The thought-signature store behind Gemini's short tool call ids: ids every
OpenAI-compatible API accepts, bounded in entries and bytes, entries expiring
after their last use (an injected clock, no sleeps)."""

from __future__ import annotations

import re

from gandalf.provider._signatures import KEPT_PREFIX, Signatures


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ids_are_short_unique_and_find_their_signature() -> None:
    store = Signatures()
    long_signature = "A" * 5000  # real signatures run to kilobytes
    ids = [store.keep("fc-1", long_signature) for _ in range(100)]
    assert len(set(ids)) == 100
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,40}", i) and i.startswith(KEPT_PREFIX) for i in ids)
    assert store.find(ids[0]) == ("fc-1", long_signature)
    assert store.find("call_s" + "0" * 24) is None
    assert store.find("fc-1") is None


def test_expires_after_ttl_since_last_use() -> None:
    clock = Clock()
    store = Signatures(ttl=10.0, clock=clock)
    used = store.keep(None, "sig-a")
    idle = store.keep(None, "sig-b")
    clock.now += 8
    assert store.find(used) == (None, "sig-a")  # a use extends its life
    clock.now += 8
    assert store.find(used) == (None, "sig-a")
    assert store.find(idle) is None
    assert len(store) == 1


def test_bounded_in_entries_oldest_use_dropped_first() -> None:
    store = Signatures(max_entries=3)
    first, second, third = (store.keep(None, s) for s in ("a", "b", "c"))
    store.find(first)  # now the most recently used
    fourth = store.keep(None, "d")
    assert len(store) == 3
    assert store.find(second) is None
    assert [store.find(i) for i in (first, third, fourth)] == [
        (None, "a"),
        (None, "c"),
        (None, "d"),
    ]


def test_bounded_in_bytes() -> None:
    store = Signatures(max_bytes=10_000)
    ids = [store.keep(None, "x" * 1000) for _ in range(50)]
    assert 5 <= len(store) <= 9
    assert store.find(ids[-1]) is not None and store.find(ids[0]) is None
