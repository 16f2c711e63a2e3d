"""The seam between the request pipeline and limits/budgets.

The pipeline calls, per model call:

    ticket = governor.admit(identity.scopes, estimate)      # may raise 429s
    ... the upstream call ...
    governor.settle(ticket, usage_total_tokens, cost_usd)   # served
    governor.release(ticket)                                 # failed: give it all back

``admit`` is synchronous and does all its checks and reservations in one go
(no ``await`` between check and take, so concurrent requests on one event
loop cannot both pass a check that only one of them fits). It raises
``errors.RateLimited`` or ``errors.QuotaExceeded``. ``ticket.headers`` are
the ``x-ratelimit-*`` response headers of the tightest level (empty when no
level sets rpm/tpm).

With a governor shared by several instances (Redis) the check-and-take is a
round trip: such a governor is a :class:`SharedGovernor`, whose
``admit_shared`` the pipeline awaits instead (``Pipeline.local`` False);
without one the request path has no extra ``await``.

When ``identity.scopes`` is empty nothing is limited: the pipeline skips the
governor entirely (a feature that is off costs nothing).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import msgspec

from gandalf.domain import Scope


class Estimate(msgspec.Struct, frozen=True):
    """What a request may cost at worst, known before the upstream call."""

    tokens: int  # prompt estimate + max output tokens (charged to TPM up front)
    usd: float | None  # worst-case cost reserved against budgets; None: unpriced


class Ticket(Protocol):
    @property
    def headers(self) -> list[tuple[bytes, bytes]]: ...

    # False once settled or released, or when admit took nothing to settle
    # (rpm alone): the pipeline then calls neither.
    @property
    def open(self) -> bool: ...


class Governor(Protocol):
    def admit(self, scopes: tuple[Scope, ...], estimate: Estimate) -> Ticket: ...

    def settle(self, ticket: Ticket, tokens: int, usd: float | None) -> None: ...

    def release(self, ticket: Ticket) -> None: ...


@runtime_checkable
class SharedGovernor(Governor, Protocol):
    """A governor whose state lives outside the process: ``admit_shared``
    does what ``admit`` does (the same checks, headers and 429s) in one
    awaited round trip, atomic across every instance."""

    async def admit_shared(self, scopes: tuple[Scope, ...], estimate: Estimate) -> Ticket: ...
