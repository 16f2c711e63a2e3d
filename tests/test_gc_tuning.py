"""A serving worker freezes its start-up heap and collects the young generation rarely."""

from __future__ import annotations

import asyncio
import gc

import pytest

from gandalf.server import lifecycle
from gandalf.server.core import Runtime, ServerCore
from gandalf.server.lifecycle import Lifecycle


async def _never() -> Runtime:
    raise AssertionError("not built in this test")


def _collect() -> int:
    calls.append("collect")
    return 0


def _freeze() -> None:
    calls.append("freeze")


def _set_threshold(*threshold: int) -> None:
    calls.append(threshold)


calls: list[object] = []


def test_worker_ready_raises_the_young_generation_threshold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls.clear()
    # The real freeze/threshold are process-wide: record them instead of applying them.
    monkeypatch.setattr(gc, "collect", _collect)
    monkeypatch.setattr(gc, "freeze", _freeze)
    monkeypatch.setattr(gc, "set_threshold", _set_threshold)
    monkeypatch.setattr(Lifecycle, "_install_signal_drain", lambda self, loop: None)
    life = Lifecycle(ServerCore(_never), handle_signals=True)
    loop = asyncio.new_event_loop()
    try:
        life.worker_ready(loop)
    finally:
        loop.close()
    older = gc.get_threshold()[1:]
    assert calls == ["collect", "freeze", (lifecycle._GC_YOUNG_THRESHOLD, *older)]
    assert lifecycle._GC_YOUNG_THRESHOLD > 700  # above CPython's default
