"""Provider health: what a failure means, and each provider's breaker and retry budget.

:func:`classify` reads a gateway error raised by an adapter::

    error                                      failover  retry  weight
    UpstreamTimeout (connect/first byte)        yes       yes    1.5
    UpstreamTotalTimeout (timeout_ms ran out    yes       no     0
      before a non-streamed answer's headers)
    UpstreamBodyTimeout (total/silence after    no        no     0
      the headers came: the answer is long)
    UpstreamTooLarge (answer over the cap)      no        no     0
    UpstreamOverloaded (503/529, overloaded)    yes       yes    1.0
    UpstreamError (5xx, network, bad answer)    yes       yes    1.0
    UpstreamClientError 408                     yes       yes    1.0
    UpstreamClientError 429 (rate limited)      yes       yes    0.5
    UpstreamAuthError (upstream 401/403)        yes       no     1.0
    other UpstreamClientError (400/404/422...)  no        no     0
    any other GatewayError (the request's own)  no        no     0

"failover" moves to the route's next target; "retry" may try the same provider
again later in the same request (after a backoff, within its retry budget).
A timeout after the headers, ``timeout_ms`` spent, an answer over the cap and
refused credentials are not cured by sending the same request again
(``Failure.client_retry`` False): the client is told ``x-should-retry: false``.
An upstream 401/403 means the provider refused the *gateway's* credentials
(the caller's key was checked long before): the caller is not at fault and
another provider may well serve, so it fails over, but retrying the same
provider with the same credentials cannot help; it weighs as a full failure
so a provider with a revoked key gets its breaker opened and is skipped.
Anything that is not a GatewayError is a bug: it is neither retried nor
counted against the provider.

Blame. The weight says how much a failure tells about the *provider's*
health, since its breaker is shared by every tenant: a caller must not be
able to open it with requests that are merely expensive. Unhealthy: connect
failures and refusals, connect and first-byte timeouts (bounds that are not
about the answer's length: the provider is not answering), 5xx, bad answers,
rejected credentials, and (at a low weight) 429s. Not the provider's fault,
weight 0: the caller's own 4xx; ``timeout_ms`` running out, before a
non-streamed answer's headers (most providers send nothing until the answer
is complete, so a long generation and a stuck provider look alike: failed
over, so a stuck provider's callers still reach the next target, but not
retried) or after the headers (the provider is answering and the answer is
long, e.g. a huge ``max_tokens``: neither failed over nor retried, another
provider would be as slow); an answer over the size cap; a client that went
away (no outcome at all: ``CircuitBreaker.release``). Mid-stream (the stream
was returned, so no failover), the same rule holds:
:data:`STREAM_FAILURE_WEIGHTS` counts a 502 (the upstream broke the stream)
and not a 504 (a silence longer than ``timeout_ms`` after the headers).

The cost of that rule: a provider that accepts connections and then hangs
opens its breaker through streamed requests (their headers come before the
generation, so a first-byte timeout is the provider's) and through
``first_byte_timeout_ms`` when it is set below ``timeout_ms``; with only
non-streamed traffic and no first-byte bound, each such request is failed
over after ``timeout_ms`` instead.
"""

from __future__ import annotations

from collections.abc import Iterator

from gandalf.app.breaker import BreakerSnapshot, CircuitBreaker
from gandalf.app.retry import BUDGET_WINDOW, RetryBudget
from gandalf.domain import BreakerPolicy, Resilience
from gandalf.errors import (
    GatewayError,
    UpstreamAuthError,
    UpstreamBodyTimeout,
    UpstreamClientError,
    UpstreamError,
    UpstreamOverloaded,
    UpstreamTimeout,
    UpstreamTooLarge,
    UpstreamTotalTimeout,
)

__all__ = ["STREAM_FAILURE_WEIGHTS", "Failure", "HealthRegistry", "ProviderHealth", "classify"]


class Failure:
    """What one failed attempt means for routing and for the provider's breaker."""

    __slots__ = ("client_retry", "failover", "kind", "retry", "weight")

    def __init__(
        self, kind: str, weight: float, *, failover: bool, retry: bool, client_retry: bool = True
    ) -> None:
        self.kind = kind
        self.weight = weight
        self.failover = failover
        self.retry = retry
        # False: the same request sent again cannot fare better (the answer is
        # too long or too large, the gateway's credentials were refused), so the
        # client is told not to retry it (``x-should-retry: false``).
        self.client_retry = client_retry

    def __repr__(self) -> str:
        return f"Failure({self.kind!r})"


TIMEOUT = Failure("timeout", 1.5, failover=True, retry=True)
LONG = Failure("long", 0.0, failover=False, retry=False, client_retry=False)
WAITED = Failure("waited", 0.0, failover=True, retry=False, client_retry=False)
TOO_LARGE = Failure("too_large", 0.0, failover=False, retry=False, client_retry=False)
SERVER = Failure("server", 1.0, failover=True, retry=True)
OVERLOADED = Failure("overloaded", 1.0, failover=True, retry=True)
RATE_LIMITED = Failure("rate_limited", 0.5, failover=True, retry=True)
CREDENTIALS = Failure("credentials", 1.0, failover=True, retry=False, client_retry=False)
CLIENT = Failure("client", 0.0, failover=False, retry=False)


# A stream that fails after it was returned, by the status it ended with: a
# 502 (the upstream broke it) counts; a 504 is a silence after the headers
# (UpstreamBodyTimeout), a long answer: not the provider's health.
STREAM_FAILURE_WEIGHTS: dict[int, float] = {502: 1.0}


def classify(exc: GatewayError) -> Failure:
    if isinstance(exc, UpstreamTimeout):
        if isinstance(exc, UpstreamBodyTimeout):
            return LONG
        return WAITED if isinstance(exc, UpstreamTotalTimeout) else TIMEOUT
    if isinstance(exc, UpstreamTooLarge):
        return TOO_LARGE
    if isinstance(exc, UpstreamAuthError):
        return CREDENTIALS
    if isinstance(exc, UpstreamClientError):
        status = exc.status
        if status == 429:
            return RATE_LIMITED
        if status == 408 or status >= 500:
            return SERVER
        return CLIENT
    if isinstance(exc, UpstreamOverloaded):
        return OVERLOADED
    if isinstance(exc, UpstreamError):
        return SERVER
    return CLIENT


def retry_after_of(exc: GatewayError) -> str | None:
    """The upstream's Retry-After header value, when the error carries one."""
    if isinstance(exc, UpstreamClientError | UpstreamOverloaded):
        return exc.retry_after
    return None


class ProviderHealth:
    """One provider's circuit breaker and retry budget, shared by every route."""

    __slots__ = ("breaker", "budget", "name")

    def __init__(self, name: str, breaker: CircuitBreaker, budget: RetryBudget) -> None:
        self.name = name
        self.breaker = breaker
        self.budget = budget


class HealthRegistry:
    """Provider name -> ProviderHealth, kept across route-table rebuilds so a
    new table does not forget which providers are failing."""

    __slots__ = ("_providers", "resilience")

    def __init__(self, resilience: Resilience | None = None) -> None:
        self.resilience = resilience if resilience is not None else Resilience()
        self._providers: dict[str, ProviderHealth] = {}

    def provider(self, name: str, breaker: BreakerPolicy | None = None) -> ProviderHealth:
        """The health of provider ``name``, created on first use with ``breaker``
        (None: the gateway-wide policy)."""
        health = self._providers.get(name)
        if health is None:
            resilience = self.resilience
            circuit = CircuitBreaker(name, breaker if breaker is not None else resilience.breaker)
            budget = RetryBudget(
                name,
                resilience.retry_budget_ratio,
                resilience.retry_budget_min_per_second,
                min(BUDGET_WINDOW, circuit.outcomes.size),
                attempts=circuit.outcomes,  # the breaker already counts every attempt
            )
            health = self._providers[name] = ProviderHealth(name, circuit, budget)
        return health

    def snapshot(self, now: float) -> list[BreakerSnapshot]:
        """Every provider's breaker, by name."""
        return [self._providers[name].breaker.snapshot(now) for name in sorted(self._providers)]

    def __iter__(self) -> Iterator[ProviderHealth]:
        return iter(self._providers.values())
