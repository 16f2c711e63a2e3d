"""Request coalescing: identical in-flight requests share one upstream call.

Only for routes that turn it on (``coalesce: true``), only for non-streamed
chat completions, and only for requests whose answer is meant to be the same
every time (:func:`is_deterministic`: ``temperature`` 0 or a ``seed``, and one
choice). The first such request (the leader) makes the call itself, in its own
task, as an uncoalesced request would (no task, future or shield of its own:
most requests meet nobody, and they pay one dict entry); identical requests
arriving while it runs (the followers) wait for its result on a future,
through ``asyncio.shield``, so a follower whose client goes away stops waiting
without disturbing anyone. When the leader's client goes away its call is
cancelled with it, and the followers start again: one of them leads a new
call, the others follow it. The entry leaves the map when the call ends, so
only requests that overlap in time share; this is not a cache.
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


class _Again:
    """What followers get when the leader's call was cancelled: start again."""


_AGAIN = _Again()


class _Flight(Generic[_T]):
    __slots__ = ("future",)

    def __init__(self) -> None:
        # Made by the first follower: a leader nobody joined never needs one.
        self.future: asyncio.Future[_T | _Again] | None = None


class Coalescer(Generic[_T]):
    """Key -> the call in flight for it."""

    __slots__ = ("_flights", "started")

    def __init__(self) -> None:
        self._flights: dict[Hashable, _Flight[_T]] = {}
        self.started = 0  # calls started (leaders) since start-up

    def __len__(self) -> int:
        return len(self._flights)

    async def join(self, key: Hashable, start: Callable[[], Awaitable[_T]]) -> tuple[_T, bool]:
        """The result of the call for ``key`` (made here with ``start()``
        unless one is in flight), and whether this caller made it. The call's
        exception, if it raises, is raised to every waiter."""
        flights = self._flights
        while True:
            flight = flights.get(key)
            if flight is None:
                return await self._lead(key, start), True
            future = flight.future
            if future is None:
                future = flight.future = asyncio.get_running_loop().create_future()
            result = await asyncio.shield(future)
            if not isinstance(result, _Again):
                return result, False
            # The leader's client left and took its call along: start again.

    async def _lead(self, key: Hashable, start: Callable[[], Awaitable[_T]]) -> _T:
        flights = self._flights
        flight: _Flight[_T] = _Flight()
        flights[key] = flight
        self.started += 1
        try:
            result = await start()
        except BaseException as exc:
            if flights.get(key) is flight:
                del flights[key]
            future = flight.future
            if future is not None and not future.done():
                if isinstance(exc, asyncio.CancelledError):
                    future.set_result(_AGAIN)
                else:
                    future.set_exception(exc)
                    future.exception()  # retrieved: followers that left never will
            raise
        if flights.get(key) is flight:
            del flights[key]
        future = flight.future
        if future is not None and not future.done():
            future.set_result(result)
        return result
