"""What the Governor costs per model call, in process.

    python bench/governor_micro.py

Prints microseconds per ``admit`` + ``settle`` pair (best of 5 repeats) for:

- ``3 scopes``: a key (rpm, tpm, daily budget), its team (tpm, monthly
  budget) and its org (rpm, monthly budget): every bucket and budget path,
  with the x-ratelimit-* headers built;
- ``budgets only``: the same three levels with budgets and no rpm/tpm (no
  headers);
- ``1 scope, rpm``: a key with an rpm limit only.

Limits are set high enough that nothing is refused, the clocks are the real
ones. A refusal costs more (it builds an exception and its message) but is
not the path a served request takes.
"""

from __future__ import annotations

import timeit

from gandalf.app.governance import Estimate
from gandalf.app.governor import LocalGovernor
from gandalf.domain import Budget, Scope

N = 100_000


def _scopes(rates: bool) -> tuple[Scope, ...]:
    big = 10**12 if rates else 0
    return (
        Scope(kind="key", id="key-1", rpm=big, tpm=big, budget=Budget(usd=1e12, period="daily")),
        Scope(kind="team", id="backend", tpm=big, budget=Budget(usd=1e12, period="monthly")),
        Scope(kind="org", id="acme", rpm=big, budget=Budget(usd=1e12, period="monthly")),
    )


def measure(scopes: tuple[Scope, ...]) -> float:
    """Best microseconds per admit + settle over 5 repeats of N."""
    gov = LocalGovernor()
    estimate = Estimate(tokens=1200, usd=0.004)
    admit, settle = gov.admit, gov.settle

    def once() -> None:
        settle(admit(scopes, estimate), 900, 0.003)

    best = min(timeit.repeat(once, number=N, repeat=5))
    return best / N * 1e6


def main() -> None:
    print(f"3 scopes:      {measure(_scopes(True)):.2f} us per admit + settle")
    print(f"budgets only:  {measure(_scopes(False)):.2f} us per admit + settle")
    one = (Scope(kind="key", id="key-1", rpm=10**12),)
    print(f"1 scope, rpm:  {measure(one):.2f} us per admit + settle")


if __name__ == "__main__":
    main()
