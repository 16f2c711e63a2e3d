"""The Redis connection of one worker process and what it knows of its health.

One :class:`RedisLink` per worker: one pipelined connection for the request
path's admission script (scaleout/resp.py: measured 15x cheaper per call
than redis-py's client), and one redis-py client over one connection pool (a
``BlockingConnectionPool``: a burst larger than the pool waits for a
connection, bounded by the timeout, instead of failing), every command
bounded by ``redis.timeout`` (connect and read), and one immediate retry on
a connection error only (a pooled connection that a restarted Redis closed
is replaced at once), never on a timeout (that would multiply a dead
server's wait).

:class:`RedisLink` also tracks outages for every user of the link (governor,
cache, notifications): after a failure it reports Redis down for
``retry_interval`` seconds, during which callers skip Redis altogether (no
request waits on a dead server twice), then lets the next call try again.
An outage is logged once when it starts and once when it ends, never per
request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gandalf.scaleout.resp import PipelinedConnection, ReplyError, supports

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger("gandalf.redis")

Clock = Callable[[], float]


class RedisLink:
    """A worker's Redis client plus its outage state.

    ``prefix``: put before every key and channel. ``clock``: monotonic
    seconds (injectable for tests)."""

    __slots__ = (
        "_clock",
        "_dropping",
        "client",
        "down",
        "down_until",
        "failures",
        "fast",
        "prefix",
        "retry_interval",
    )

    def __init__(
        self,
        client: Redis,
        prefix: str,
        *,
        retry_interval: float = 1.0,
        clock: Clock = time.monotonic,
        fast: PipelinedConnection | None = None,
    ) -> None:
        """``fast``: the pipelined connection of the request path (the
        admission script), None to send it through ``client`` too."""
        self.client = client
        self.fast = fast
        self.prefix = prefix
        self.retry_interval = retry_interval
        self._clock = clock
        self.down = False  # an outage is going on (logged once)
        self.down_until = 0.0  # monotonic time before which Redis is not asked
        self.failures = 0  # commands that failed (tests and diagnostics)
        self._dropping: asyncio.Task[None] | None = None

    def skip(self) -> bool:
        """True while Redis is known down and not due for another try."""
        return self.down and self._clock() < self.down_until

    def failed(self, exc: BaseException, what: str) -> None:
        """A command failed: Redis counts as down for ``retry_interval``
        (the first failure of an outage is logged, the rest are not)."""
        self.failures += 1
        self.down_until = self._clock() + self.retry_interval
        if not self.down:
            self.down = True
            # The idle pooled connections are dead too (a killed or restarted
            # Redis): dropped now, so recovery starts from fresh ones.
            with contextlib.suppress(RuntimeError):  # no running loop: nothing pooled
                self._dropping = asyncio.get_running_loop().create_task(self._drop_idle())
            logger.warning(
                "Redis is unreachable (%s: %s: %s); retrying every %gs, "
                "shared limits, cache and notifications follow redis.on_error meanwhile",
                what,
                type(exc).__name__,
                exc,
                self.retry_interval,
            )

    async def _drop_idle(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.connection_pool.disconnect(inuse_connections=False)

    def succeeded(self) -> None:
        """A command succeeded: an outage, if any, is over."""
        if self.down:
            self.down = False
            logger.warning("Redis answers again: shared limits, cache and notifications resumed")

    async def close(self) -> None:
        if self.fast is not None:
            await self.fast.close()
        await self.client.aclose()


def connect(
    url: str, *, timeout: float, pool_size: int, prefix: str, retry_interval: float
) -> RedisLink:
    """A :class:`RedisLink` for ``url`` (no connection is made until the
    first command). Imports redis-py: call only when ``redis:`` is set."""
    from redis.asyncio import BlockingConnectionPool, Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=timeout,  # waiting for a free connection
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    client = Redis.from_pool(pool)  # the client owns (and closes) the pool
    fast = PipelinedConnection(url, timeout) if supports(url) else None
    return RedisLink(client, prefix, retry_interval=retry_interval, fast=fast)


def is_redis_failure(exc: BaseException) -> bool:
    """Redis did not answer (connection refused or lost, timeout, a server
    error), as opposed to a bug here: only the former follows the
    ``on_error`` policy."""
    from redis.exceptions import RedisError

    return isinstance(exc, RedisError | ReplyError | OSError | TimeoutError)
