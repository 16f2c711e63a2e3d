"""Request coalescing: identical in-flight requests share one upstream call.

Only for routes that turn it on (``coalesce: true``), only for non-streamed
chat completions, and only for requests whose answer is meant to be the same
every time (:func:`is_deterministic`: ``temperature`` 0 or a ``seed``, and one
choice). The first such request (the leader) starts the call in a task of its
own; identical requests arriving while it runs (the followers) wait for the
same task. Every waiter awaits it through ``asyncio.shield``: a waiter that is
cancelled (its client went away) stops waiting without cancelling the call for
the others. When the last waiter has gone the call is cancelled, since nobody
wants its answer. The entry leaves the map when the call ends, so only
requests that overlap in time share; this is not a cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import msgspec

__all__ = ["Coalescer", "is_deterministic"]

_T = TypeVar("_T")


class _Sampling(msgspec.Struct):
    """The body fields that decide whether two identical requests get one answer."""

    temperature: float | None = None
    seed: int | None = None
    n: int | None = None


_sampling = msgspec.json.Decoder(_Sampling)


def is_deterministic(body: bytes, max_temperature: float = 0.0) -> bool:
    """Does this chat body ask for a reproducible answer (``temperature`` at
    most ``max_temperature``, or a ``seed``) with one choice (``n`` absent or
    1)? False when unreadable. Coalescing asks for ``temperature`` 0; the
    response cache (app/cache.py) for the contract's ``<= 0.3``. A request
    without ``temperature`` samples at the provider's default (1): not
    deterministic."""
    try:
        sampling = _sampling.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return False
    if sampling.n not in (None, 1):
        return False
    if sampling.seed is not None:
        return True
    temperature = sampling.temperature
    return temperature is not None and 0 <= temperature <= max_temperature


class _Flight(Generic[_T]):
    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Task[_T]) -> None:
        self.task = task
        self.waiters = 0


class Coalescer(Generic[_T]):
    """Key -> the call in flight for it."""

    __slots__ = ("_flights", "started")

    def __init__(self) -> None:
        self._flights: dict[Hashable, _Flight[_T]] = {}
        self.started = 0  # calls started (leaders) since start-up

    def __len__(self) -> int:
        return len(self._flights)

    async def join(self, key: Hashable, start: Callable[[], Awaitable[_T]]) -> tuple[_T, bool]:
        """The result of the call for ``key`` (started with ``start()`` unless
        one is in flight), and whether this caller started it. The call's
        exception, if it raises, is raised to every waiter."""
        flights = self._flights
        flight = flights.get(key)
        leader = flight is None
        if flight is None:
            task: asyncio.Task[_T] = asyncio.ensure_future(start())
            flight = flights[key] = _Flight(task)
            self.started += 1
            task.add_done_callback(lambda done: self._landed(key, flight, done))
        flight.waiters += 1
        try:
            result = await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            flight.waiters -= 1
            task = flight.task
            if not task.done() and flight.waiters == 0:
                # This waiter was cancelled (the call was not: it is still
                # running) and nobody else wants the answer any more.
                if flights.get(key) is flight:
                    del flights[key]  # a newcomer must not join a dying call
                task.cancel()
            raise
        flight.waiters -= 1
        return result, leader

    def _landed(self, key: Hashable, flight: _Flight[_T], task: asyncio.Task[_T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved: a failure nobody waited for is not logged as lost
