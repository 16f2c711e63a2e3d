"""Rate limits and budgets shared by every worker and instance, in Redis.

:class:`RedisGovernor` implements the pipeline's
:class:`~gandalf.app.governance.SharedGovernor`: the same token buckets as
app/limits.py and the same reserve-then-settle budgets as app/budget.py, with
the state in Redis and every check-and-take in one Lua script, so no two
requests anywhere can both pass a check only one of them fits.

Per request: :meth:`RedisGovernor.admit_shared` is one EVALSHA (one round
trip) that checks every budget level, then every bucket, and takes from all
of them only when everything fits. The reply carries the bucket levels, from
which the same ``x-ratelimit-*`` headers and the same 429 bodies as the local
governor's are made here (app/limits.py's and app/budget.py's own code, on
Bucket and Spend objects whose levels come from Redis). ``settle`` and
``release`` are synchronous for the caller: they queue a correction that a
background task sends in batches (one pipelined round trip per batch), and
keep it for the next try while Redis is down.

The buckets refill against Redis's clock (``TIME`` inside the script), so
instances whose clocks disagree still share one bucket. Limits are whole
(no per-worker share): every worker and instance draws on the same bucket.
A bucket's key expires once it would be full again (a missing bucket is a
full one), and a budget period's key expires a day after the period ends.

Budgets survive Redis restarts and start from the store: at start (and for a
budget an admin sets later) :meth:`rebuild` raises each level's ``spent`` to
what the usage table recorded in the current period, if that is more.

When Redis does not answer within ``redis.timeout`` (see scaleout/connection.py),
``on_error: open`` serves the request under the in-process governor (this
worker's share of every limit and budget, as without Redis) and ``closed``
refuses it with a 503 ``limits_unavailable``. Known gap: reservations of a
process that dies between admit and settle stay reserved until the period's
key expires (a crash leaks at most its requests in flight).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from gandalf.app.budget import Spend, SpendSource, period_bounds
from gandalf.app.governance import Estimate, Ticket
from gandalf.app.governor import Grant, LocalGovernor
from gandalf.app.limits import Rate, RateLimits
from gandalf.domain import Scope
from gandalf.errors import LimitsUnavailable
from gandalf.scaleout.connection import RedisLink, is_redis_failure
from gandalf.scaleout.resp import ReplyError

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

logger = logging.getLogger("gandalf.redis")

# Seconds a budget period's key outlives the period (settles in flight land in it).
BUDGET_GRACE = 86400
# Corrections kept while Redis is down (beyond them the oldest are dropped).
MAX_PENDING = 100_000
_INF = float("inf")

# KEYS: per rate level its rpm and tpm bucket, then per budget level its period key.
# ARGV: R, B, tokens, usd, then per rate level rpm and tpm limits (0: none), then
# per budget level its limit (USD) and the unix time its key expires (0: never).
# Reply: {1, level...} taken (2 per rate level, after the take; "" where no bucket);
# {0, level...} a bucket refused (levels before any take); {2, j, spent, reserved,
# level...} budget level j refused (the levels as they stand: nothing taken).
ADMIT = """
local R = tonumber(ARGV[1])
local B = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
local usd = tonumber(ARGV[4])
local base = 4 + 2 * R
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local levels = {}
local fits = true
for n = 1, 2 * R do
  local limit = tonumber(ARGV[4 + n])
  if limit > 0 then
    local v = redis.call('HMGET', KEYS[n], 'level', 'stamp')
    local level = tonumber(v[1])
    if level == nil then
      level = limit
    else
      local elapsed = now - tonumber(v[2])
      if elapsed > 0 then level = level + elapsed * limit / 60 end
      if level > limit then level = limit end
    end
    local need = tokens
    if n % 2 == 1 then need = 1 end
    if level < need then fits = false end
    levels[n] = level
  else
    levels[n] = false
  end
end
for j = 1, B do
  local limit = tonumber(ARGV[base + 2 * j - 1])
  local v = redis.call('HMGET', KEYS[2 * R + j], 'spent', 'reserved')
  local spent = tonumber(v[1]) or 0
  local reserved = tonumber(v[2]) or 0
  local committed = spent + reserved
  if committed >= limit or committed + usd > limit then
    local refused = {2, j, tostring(spent), tostring(reserved)}
    for n = 1, 2 * R do
      refused[n + 4] = levels[n] and tostring(levels[n]) or ''
    end
    return refused
  end
end
local out = {fits and 1 or 0}
for n = 1, 2 * R do
  local level = levels[n]
  if level then
    if fits then
      local limit = tonumber(ARGV[4 + n])
      if n % 2 == 1 then level = level - 1 else level = level - tokens end
      redis.call('HSET', KEYS[n], 'level', tostring(level), 'stamp', tostring(now))
      redis.call('PEXPIRE', KEYS[n], math.ceil((limit - level) * 60000 / limit) + 1000)
    end
    out[n + 1] = tostring(level)
  else
    out[n + 1] = ''
  end
end
if fits and usd > 0 then
  for j = 1, B do
    local key = KEYS[2 * R + j]
    redis.call('HINCRBYFLOAT', key, 'reserved', usd)
    local expires = tonumber(ARGV[base + 2 * j])
    if expires > 0 then redis.call('EXPIREAT', key, expires) end
  end
end
return out
"""

# KEYS: the tpm buckets to correct, then the budget period keys.
# ARGV: T, B, delta tokens (charged; negative refunds), reserved usd (given
# back), spent usd (charged), per tpm bucket its limit, per budget key its
# expiry (0: never).
SETTLE = """
local T = tonumber(ARGV[1])
local B = tonumber(ARGV[2])
local delta = tonumber(ARGV[3])
local reserved = tonumber(ARGV[4])
local usd = tonumber(ARGV[5])
if delta ~= 0 and T > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  for i = 1, T do
    local limit = tonumber(ARGV[5 + i])
    local v = redis.call('HMGET', KEYS[i], 'level', 'stamp')
    local level = tonumber(v[1])
    if level == nil then
      level = limit
    else
      local elapsed = now - tonumber(v[2])
      if elapsed > 0 then level = level + elapsed * limit / 60 end
      if level > limit then level = limit end
    end
    level = level - delta
    if level > limit then level = limit end
    redis.call('HSET', KEYS[i], 'level', tostring(level), 'stamp', tostring(now))
    redis.call('PEXPIRE', KEYS[i], math.ceil((limit - level) * 60000 / limit) + 1000)
  end
end
for j = 1, B do
  local key = KEYS[T + j]
  if reserved > 0 then
    local left = tonumber(redis.call('HINCRBYFLOAT', key, 'reserved', -reserved))
    if left < 0 then redis.call('HSET', key, 'reserved', '0') end
  end
  if usd > 0 then redis.call('HINCRBYFLOAT', key, 'spent', usd) end
  local expires = tonumber(ARGV[5 + T + j])
  if expires > 0 then redis.call('EXPIREAT', key, expires) end
end
return 1
"""

# KEYS[1]: a budget period key; ARGV: what the store recorded, the key's expiry.
LOAD = """
local total = tonumber(ARGV[1])
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent')) or 0
if total > spent then redis.call('HSET', KEYS[1], 'spent', tostring(total)) end
local expires = tonumber(ARGV[2])
if expires > 0 then redis.call('EXPIREAT', KEYS[1], expires) end
return tostring(math.max(total, spent))
"""


class _Plan:
    """One scopes tuple's levels, resolved once: the Rate/Bucket and Spend
    objects the headers and refusals are made from, the keys and the fixed
    script arguments. Budget keys name the period, so they are recomputed
    when the earliest period ends (``until``)."""

    __slots__ = (
        "_rate_args",
        "_rate_keys",
        "args",
        "budget_args",
        "budget_keys",
        "head",
        "keys",
        "nkeys",
        "prefix",
        "rates",
        "spends",
        "tpm_args",
        "tpm_keys",
        "until",
    )

    def __init__(self, prefix: str, rates: list[Rate], spends: list[Spend], now: float) -> None:
        self.prefix = prefix
        self.rates = rates
        self.spends = spends
        rate_keys: list[str] = []
        rate_args: list[int] = []
        self.tpm_keys: list[str] = []
        self.tpm_args: list[int] = []
        for rate in rates:
            base = f"{prefix}rl:{rate.kind}:{rate.id}:"
            rate_keys += (base + "rpm", base + "tpm")
            rate_args += (
                rate.rpm.limit if rate.rpm is not None else 0,
                rate.tpm.limit if rate.tpm is not None else 0,
            )
            if rate.tpm is not None:
                self.tpm_keys.append(base + "tpm")
                self.tpm_args.append(rate.tpm.limit)
        self.head = (len(rates), len(spends))
        self._rate_keys = rate_keys
        self._rate_args = rate_args
        self.budget_keys: list[str] = []
        self.budget_args: list[float] = []
        self.keys: list[str] = []
        self.nkeys = 0
        self.args: list[float] = []
        self.until = _INF
        self.roll(now)

    def roll(self, now: float) -> None:
        """The budget keys of the periods holding ``now`` (wall-clock seconds)."""
        keys: list[str] = []
        args: list[float] = []
        until = _INF
        for spend in self.spends:
            key, limit, expires, end = budget_key(self.prefix, spend, now)
            keys.append(key)
            args += (limit, expires)
            until = min(until, end)
        self.budget_keys = keys
        self.budget_args = [args[i] for i in range(1, len(args), 2)]
        self.keys = [*self._rate_keys, *keys]
        self.nkeys = len(self.keys)
        self.args = [*self._rate_args, *args]
        self.until = until


def budget_key(prefix: str, spend: Spend, now: float) -> tuple[str, float, int, float]:
    """A budget level's key in the period holding ``now``, its limit, the
    unix time the key expires (0: never) and the period's end."""
    budget = spend.budget
    start, end = period_bounds(budget.period, now)
    key = f"{prefix}budget:{spend.kind}:{spend.id}:{budget.period}:{int(start)}"
    expires = 0 if end == _INF else int(end) + BUDGET_GRACE
    return key, budget.usd, expires, end


def _read_levels(rates: list[Rate], reply: Any, first: int) -> None:
    """Set each bucket of ``rates`` to its level in ``reply`` (ADMIT's: two
    per rate level from ``first``, rpm then tpm)."""
    n = first
    for rate in rates:
        if rate.rpm is not None:
            rate.rpm.level = float(reply[n])
        if rate.tpm is not None:
            rate.tpm.level = float(reply[n + 1])
        n += 2


class RedisTicket:
    """What admit took (for settle / release) and the response's headers."""

    __slots__ = ("budget_args", "budget_keys", "headers", "open", "plan", "tokens", "usd")

    def __init__(
        self, headers: list[tuple[bytes, bytes]], plan: _Plan, tokens: int, usd: float
    ) -> None:
        self.headers = headers
        self.plan = plan
        self.tokens = tokens
        self.usd = usd
        self.budget_keys = plan.budget_keys  # the period it reserved in
        self.budget_args = plan.budget_args
        self.open = True


class RedisGovernor:
    """The shared governor (see the module doc). ``fallback``: the in-process
    governor used while Redis is down under ``on_error: open`` (None: closed,
    a limited request is refused with 503). ``wall``: wall-clock seconds (the
    budget periods)."""

    __slots__ = (
        "_admit",
        "_closed",
        "_flusher",
        "_flushing",
        "_link",
        "_load",
        "_pending",
        "_plans",
        "_settle",
        "_wake",
        "fallback",
        "limits",
        "wall",
    )

    def __init__(self, link: RedisLink, *, fallback: LocalGovernor | None) -> None:
        self._link = link
        self.fallback = fallback
        client = link.client
        self._admit: AsyncScript = client.register_script(ADMIT)
        self._settle: AsyncScript = client.register_script(SETTLE)
        self._load: AsyncScript = client.register_script(LOAD)
        # Bucket and Spend objects only carry limits, names and the levels Redis
        # answered (for headers and refusals): share 1, the limit is whole.
        self.limits = RateLimits(share=1)
        self.wall = fallback.budgets.clock if fallback is not None else time.time
        self._plans: dict[tuple[Scope, ...], _Plan] = {}
        self._pending: list[tuple[list[str], list[float]]] = []
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        # One flush at a time: a flush returns once what was queued before it
        # has been sent (the background one's batch included).
        self._flushing = asyncio.Lock()

    # ------------------------------------------------------------------ admit

    def admit(self, scopes: tuple[Scope, ...], estimate: Estimate) -> Ticket:
        """The synchronous Governor method: what an outage answers (the
        pipeline calls :meth:`admit_shared` when this governor is set)."""
        return self._unavailable(scopes, estimate)

    async def admit_shared(self, scopes: tuple[Scope, ...], estimate: Estimate) -> Ticket:
        """Reserve one request, ``estimate.tokens`` tokens and ``estimate.usd``
        at every level of ``scopes`` in Redis (one round trip), or raise the
        local governor's QuotaExceeded / RateLimited (taking nothing). While
        Redis is down: the ``on_error`` policy."""
        link = self._link
        if link.down and link.skip():
            return self._unavailable(scopes, estimate)
        plan = self._plans.get(scopes)
        if plan is None:
            plan = self._plans[scopes] = self._plan(scopes)
        usd = estimate.usd or 0.0
        if plan.spends:
            now = self.wall()
            if now >= plan.until:
                plan.roll(now)
        tokens = estimate.tokens
        fast = link.fast
        try:
            if fast is not None:
                try:
                    reply: Any = await fast.call(
                        b"EVALSHA", self._admit.sha, plan.nkeys, *plan.keys, *plan.head,
                        tokens, usd, *plan.args,
                    )  # fmt: skip
                except ReplyError as exc:
                    if not str(exc).startswith("NOSCRIPT"):
                        raise
                    reply = await fast.call(
                        b"EVAL", ADMIT, plan.nkeys, *plan.keys, *plan.head, tokens, usd,
                        *plan.args,
                    )  # fmt: skip  # EVAL also caches it for the next EVALSHA
            else:
                reply = await self._admit(
                    keys=plan.keys, args=[*plan.head, tokens, usd, *plan.args]
                )
        except Exception as exc:  # redis-py's errors and OSError alike: Redis did not answer
            if not is_redis_failure(exc):
                raise
            link.failed(exc, "admit")
            return self._unavailable(scopes, estimate)
        if link.down:
            link.succeeded()
        status = reply[0]
        rates = plan.rates
        if status == 2:
            spend = plan.spends[int(reply[1]) - 1]
            spend.spent = float(reply[2])
            spend.reserved = float(reply[3])
            refused = spend.refusal(usd)
            if rates:  # the rate limits' headers as they stand (a model call's answer)
                _read_levels(rates, reply, 4)
                refused.relayed = tuple(RateLimits.headers(rates))
            raise refused
        _read_levels(rates, reply, 1)
        if status == 0:
            self.limits.verify(rates, tokens)  # raises the level that waits longest
            raise AssertionError("Redis refused a request that fits every bucket")
        headers = RateLimits.headers(rates) if rates else []
        return RedisTicket(headers, plan, tokens, usd)

    def _plan(self, scopes: tuple[Scope, ...]) -> _Plan:
        limits = self.limits
        now = limits.clock()
        rates = [r for r in (limits.rate(scope, now) for scope in scopes) if r is not None]
        wall = self.wall()
        spends = [
            Spend(scope.kind, scope.id, scope.budget, 1, wall, scope.name)
            for scope in scopes
            if scope.budget is not None
        ]
        return _Plan(self._link.prefix, rates, spends, wall)

    def _unavailable(self, scopes: tuple[Scope, ...], estimate: Estimate) -> Ticket:
        """Redis is down: the local governor's answer (``on_error: open``) or a 503."""
        fallback = self.fallback
        if fallback is None:
            raise LimitsUnavailable(
                "Rate limits and budgets are shared through Redis, which is not answering; "
                "the gateway is configured to refuse limited requests meanwhile "
                "(redis.on_error: closed). Retry shortly."
            )
        return fallback.admit(scopes, estimate)

    # ------------------------------------------------------------------ settle / release

    def settle(self, ticket: Ticket, tokens: int, usd: float | None) -> None:
        """The request was served: its real ``tokens`` replace the estimate in
        the TPM buckets and ``usd`` its reservation (sent in the background)."""
        if type(ticket) is not RedisTicket:
            assert self.fallback is not None and isinstance(ticket, Grant)
            self.fallback.settle(ticket, tokens, usd)
            return
        if ticket.open:
            ticket.open = False
            self._correct(ticket, tokens - ticket.tokens, usd or 0.0)

    def release(self, ticket: Ticket) -> None:
        """The request failed: its tokens and reservation are given back (it
        still counts as a request for RPM)."""
        if type(ticket) is not RedisTicket:
            assert self.fallback is not None and isinstance(ticket, Grant)
            self.fallback.release(ticket)
            return
        if ticket.open:
            ticket.open = False
            self._correct(ticket, -ticket.tokens, 0.0)

    def _correct(self, ticket: RedisTicket, delta: int, usd: float) -> None:
        plan = ticket.plan
        tpm = plan.tpm_keys if delta else []
        budgets = ticket.budget_keys if ticket.usd or usd else []
        if not tpm and not budgets:
            return
        args: list[float] = [len(tpm), len(budgets), delta, ticket.usd, usd]
        args += plan.tpm_args if tpm else ()
        args += ticket.budget_args if budgets else ()
        pending = self._pending
        pending.append(([*tpm, *budgets], args))
        if len(pending) > MAX_PENDING:
            del pending[: len(pending) - MAX_PENDING]
        self._wake.set()

    async def flush(self) -> bool:
        """Send every queued correction in one pipelined round trip; False
        (and kept for the next try) when Redis did not take them."""
        async with self._flushing:
            return await self._flush()

    async def _flush(self) -> bool:
        batch = self._pending
        if not batch:
            return True
        self._pending = []
        try:
            async with self._link.client.pipeline(transaction=False) as pipe:
                for keys, args in batch:
                    await self._settle(keys=keys, args=args, client=pipe)
                await pipe.execute()
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            self._link.failed(exc, "settle")
            self._pending[:0] = batch[-MAX_PENDING:]
            return False
        self._link.succeeded()
        return True

    async def _run(self) -> None:
        link = self._link
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            if link.skip() or not await self.flush():
                # Down: try again once the link is due for another try.
                await asyncio.sleep(link.retry_interval)
                self._wake.set()

    def start(self) -> None:
        """Start the background sender of corrections."""
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._run(), name="gandalf-redis-settle")

    async def close(self) -> None:
        """Stop the sender after one last flush (bounded by the link's timeout)."""
        # A flag rather than a bare cancel: redis-py may swallow a cancellation
        # in the middle of a command, and the loop must still end.
        self._closed = True
        self._wake.set()
        task, self._flusher = self._flusher, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        if self._pending and not self._link.skip():
            await self.flush()

    # ------------------------------------------------------------------ budgets from the store

    async def rebuild(
        self, source: SpendSource, scopes: Iterable[Scope], now: float | None = None
    ) -> dict[tuple[str, str], float]:
        """Raise each budget level's spend in Redis (current period) to what
        ``source`` recorded, if more; the fallback governor loads it too.
        Redis being down only skips the Redis part (logged once)."""
        scopes = list(scopes)
        now = self.wall() if now is None else now
        spent: dict[tuple[str, str], float] = (
            await self.fallback.rebuild(source, scopes, now) if self.fallback is not None else {}
        )
        todo: list[tuple[str, float, int]] = []
        seen: set[tuple[str, str]] = set()
        for scope in scopes:
            key = (scope.kind, scope.id)
            if scope.budget is None or key in seen:
                continue
            seen.add(key)
            spend = Spend(scope.kind, scope.id, scope.budget, 1, now)
            name, _, expires, _ = budget_key(self._link.prefix, spend, now)
            total = spent.get(key)
            if total is None:
                since = period_bounds(scope.budget.period, now)[0]
                total = spent[key] = await source.spend_since(scope.kind, scope.id, since)
            todo.append((name, total, expires))
        if todo and not self._link.skip():
            try:
                async with self._link.client.pipeline(transaction=False) as pipe:
                    for name, total, expires in todo:
                        await self._load(keys=[name], args=[total, expires], client=pipe)
                    await pipe.execute()
            except Exception as exc:
                if not is_redis_failure(exc):
                    raise
                self._link.failed(exc, "budget rebuild")
        return spent
