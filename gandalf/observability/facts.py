"""What a request's model call left for the server core, handed over without arguments.

``Pipeline.account`` builds one :class:`~gandalf.domain.UsageRecord` per
request (route alias, provider, model, status, tokens, cost, attempts, key,
org, team); its ``observe`` hook is :func:`observe`. The stream relay notes
when the first chunk went out (:func:`first_chunk`), the response cache its
verdict (:func:`cached`). The server core :func:`take` s all three when the
request ends, for the access log line and the metrics. No per-request dict
and no new argument through the layers: a ContextVar ``set`` (~50 ns) and a
``get``.

Why a ContextVar is per request: every request runs in its own asyncio task
(granian's default task implementation creates one per request, and a task
runs in a copy of the context it was created in), and the pipeline accounts
for a request in that request's task (a stream when the server closes it, a
coalesced follower in its own task). :func:`take` resets what it found, so a
task that serves several requests one after another (tests) does not carry
one's facts into the next.
"""

from __future__ import annotations

import time
from contextvars import ContextVar

from gandalf.domain import UsageRecord

__all__ = ["cached", "first_chunk", "observe", "take"]

_FACTS: ContextVar[UsageRecord | None] = ContextVar("gandalf_request_facts", default=None)
_CACHE: ContextVar[str | None] = ContextVar("gandalf_request_cache", default=None)
_FIRST: ContextVar[float] = ContextVar("gandalf_request_first_chunk", default=0.0)

_facts = _FACTS.get


def observe(record: UsageRecord) -> None:
    """The pipeline's ``observe`` hook: ``record`` is this request's."""
    _FACTS.set(record)


def cached(result: str) -> None:
    """The response cache's verdict on this request (``hit``, ``miss``, ...)."""
    _CACHE.set(result)


def first_chunk() -> None:
    """This request's stream relayed its first chunk now."""
    _FIRST.set(time.perf_counter())


def take() -> tuple[UsageRecord | None, str | None, float]:
    """(record, cache verdict, first chunk's ``perf_counter()`` or 0.0) of the
    request ending in this task, each reset for the next."""
    record = _facts()
    if record is None:
        return None, None, 0.0
    _FACTS.set(None)
    cache = _CACHE.get()
    if cache is not None:
        _CACHE.set(None)
    first = _FIRST.get()
    if first:
        _FIRST.set(0.0)
    return record, cache, first
