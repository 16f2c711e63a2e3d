"""What a request cost: prices resolved once per (provider, model) into rates.

At start-up, every (provider, model) pair the gateway can call (route targets
and providers' ``models``) is priced: from ``pricing:`` in the config when it
names the pair, else from the ``genai-prices`` library (a maintained price
table; imported only here, only while resolving: it costs ~0.15 s and ~13 MB
to import and ~0.2 ms per lookup, none of which the request path may pay).
Each price becomes a :class:`Rates` of plain floats in USD per token, so a
request's cost is a dict lookup and a few multiplications
(:meth:`Pricing.cost`).

Cost, with the counts in OpenAI's terms (:class:`~gandalf.domain.Usage`)::

    (prompt - cached - cache_write) * input + cached * cached_input
      + cache_write * cache_write_rate
      + (completion - reasoning) * output + reasoning * reasoning_rate

Long-context tiers (a model priced higher when the prompt exceeds N tokens,
all of the request's tokens then at the higher rate, as the providers and
the library count) are kept: a :class:`Rates` carries its tiers, and the
tier is picked by ``prompt_tokens``. Time-dependent prices (the library's
conditional prices, e.g. off-peak discounts) are resolved once, at start-up;
request-context variants (service tiers, batch) are not applied.

A pair with no known price costs ``None`` (recorded as such, never guessed);
one warning per such pair is logged at start-up naming the ``pricing:`` line
that prices it. The fake provider type has no price and no warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import msgspec

from gandalf.app.router import RouteEntry
from gandalf.domain import ModelPrice, ProviderConfig, Route, Usage, UsageRecord

logger = logging.getLogger("gandalf.pricing")

_PER_MILLION = 1e-6

# Provider type -> genai-prices provider id (None: no library price, e.g. a
# local Ollama; ``pricing:`` can still price its models).
LIBRARY_PROVIDERS: Mapping[str, str | None] = {
    "openai": "openai",
    "azure": "azure",
    "anthropic": "anthropic",
    "gemini": "google",
    "ollama": None,
    "fake": None,
}
# Types whose unpriced models are expected (no warning).
_UNPRICED_TYPES = frozenset({"fake"})


class Rates(msgspec.Struct, frozen=True, kw_only=True):
    """Prices in USD per token. ``tiers``: (prompt tokens above which, the
    rates then), ascending; empty for most models."""

    input: float
    output: float
    cached_input: float
    cache_write: float
    reasoning: float
    tiers: tuple[tuple[int, Rates], ...] = ()
    source: str = "library"  # "library" | "config"

    def cost(self, usage: Usage) -> float:
        """The cost of ``usage`` in USD (pure arithmetic)."""
        return self.cost_of(
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_prompt_tokens,
            usage.cache_write_tokens,
            usage.reasoning_tokens,
        )

    def cost_of(
        self, prompt: int, completion: int, cached: int, cache_write: int, reasoning: int
    ) -> float:
        """The cost in USD of these counts (OpenAI's terms: ``prompt``
        includes ``cached`` and ``cache_write``, ``completion`` includes
        ``reasoning``)."""
        rates = self
        if self.tiers:
            for start, tier in reversed(self.tiers):
                if prompt > start:
                    rates = tier
                    break
        # Per request: plain arithmetic, no builtin calls (max() costs more).
        fresh = prompt - cached - cache_write
        answer = completion - reasoning
        return (
            (fresh if fresh > 0 else 0) * rates.input
            + cached * rates.cached_input
            + cache_write * rates.cache_write
            + (answer if answer > 0 else 0) * rates.output
            + reasoning * rates.reasoning
        )


def configured_rates(price: ModelPrice) -> Rates:
    """The rates of a ``pricing:`` entry (USD per million tokens)."""
    cached = price.input if price.cached_input is None else price.cached_input
    write = price.input if price.cache_write is None else price.cache_write
    return Rates(
        input=price.input * _PER_MILLION,
        output=price.output * _PER_MILLION,
        cached_input=cached * _PER_MILLION,
        cache_write=write * _PER_MILLION,
        reasoning=price.output * _PER_MILLION,
        source="config",
    )


class Pricing:
    """Rates per (provider name, model), built once; read per request."""

    __slots__ = ("_rates", "unpriced")

    def __init__(
        self,
        rates: Mapping[tuple[str, str], Rates] | None = None,
        unpriced: Iterable[tuple[str, str]] = (),
    ) -> None:
        nested: dict[str, dict[str, Rates]] = {}
        for (provider, model), value in (rates or {}).items():
            nested.setdefault(provider, {})[model] = value
        self._rates = nested
        # Pairs the gateway may call that have no price (their cost is None).
        self.unpriced: tuple[tuple[str, str], ...] = tuple(unpriced)

    def knows(self, provider: str, model: str) -> bool:
        """Was the pair priced, or found to have no price, when this was built?"""
        return self.rates(provider, model) is not None or (provider, model) in self.unpriced

    def adopt(self, other: Pricing) -> None:
        """Take ``other``'s rates in place (a route added at run time, by the
        admin API): the hooks bound to this object at start-up see them."""
        self._rates = other._rates
        self.unpriced = other.unpriced

    def rates(self, provider: str | None, model: str | None) -> Rates | None:
        """The rates of ``model`` served by the provider named ``provider``;
        None when unknown (the budget code then cannot bound the cost)."""
        models = self._rates.get(provider) if provider is not None else None
        if models is None or model is None:
            return None
        return models.get(model)

    def worst_case(self, entry: RouteEntry, tokens_in: int, tokens_out: int) -> float | None:
        """The most a call of ``tokens_in`` prompt and ``tokens_out`` output
        tokens may cost on ``entry`` (any target may serve it, failover
        included): the dearest priced target; None when none is priced. Only
        requests from callers with budgets ask (the pipeline's ``price``
        hook), so the route's rates are looked up once and kept on the entry
        (``RouteEntry.priced``, for these rates: :meth:`adopt` replaces
        them)."""
        memo = entry.priced
        if memo is None or memo[0] is not self._rates:
            memo = entry.priced = self._dominant(entry)
        rate_in = memo[1]
        if rate_in is not None:
            return tokens_in * rate_in + tokens_out * memo[2]
        return self._dearest(entry, tokens_in, tokens_out)

    def _dominant(self, entry: RouteEntry) -> tuple[object, float | None, float]:
        """``entry``'s memo for :meth:`worst_case`: (these rates, input,
        output) when one untiered priced target is at least as dear as every
        other on both rates (its cost is then the largest whatever the
        counts: floating-point rounding keeps the order), else (these rates,
        None, 0.0): no such target (tiers, crossing prices, or none priced),
        the dearest found per request."""
        found: list[Rates] = []
        for slot in entry.slots:
            rates = self.rates(slot.name, slot.target.model)
            if rates is not None:
                if rates.tiers:
                    return (self._rates, None, 0.0)
                found.append(rates)
        for top in found:
            if all(top.input >= r.input and top.output >= r.output for r in found):
                return (self._rates, top.input, top.output)
        return (self._rates, None, 0.0)

    def _dearest(self, entry: RouteEntry, tokens_in: int, tokens_out: int) -> float | None:
        """:meth:`worst_case` with no dominant target: every priced target's
        cost of the counts, the largest."""
        worst: float | None = None
        for slot in entry.slots:
            rates = self.rates(slot.name, slot.target.model)
            if rates is not None:
                usd = rates.cost_of(tokens_in, tokens_out, 0, 0, 0)
                if worst is None or usd > worst:
                    worst = usd
        return worst

    def cost(self, provider: str | None, model: str | None, usage: Usage) -> float | None:
        """What ``usage`` cost in USD; None when the pair has no price."""
        models = self._rates.get(provider) if provider is not None else None
        if models is None or model is None:
            return None
        rates = models.get(model)
        if rates is None:
            return None
        if rates.tiers:
            return rates.cost(usage)
        # Rates.cost_of written out for an untiered price (every priced
        # request, two Python calls saved): the same sum, term by term.
        prompt = usage.prompt_tokens
        cached = usage.cached_prompt_tokens
        write = usage.cache_write_tokens
        reasoning = usage.reasoning_tokens
        fresh = prompt - cached - write
        answer = usage.completion_tokens - reasoning
        return (
            (fresh if fresh > 0 else 0) * rates.input
            + cached * rates.cached_input
            + write * rates.cache_write
            + (answer if answer > 0 else 0) * rates.output
            + reasoning * rates.reasoning
        )

    def items(self) -> list[tuple[str, str, Rates]]:
        return [(p, m, r) for p, models in self._rates.items() for m, r in models.items()]


class UsageSink(Protocol):
    def record_usage(self, record: UsageRecord) -> None: ...


LibraryLookup = Callable[[ProviderConfig, str], "Rates | None"]


def build_pricing(
    providers: Sequence[ProviderConfig],
    routes: Sequence[Route],
    prices: Sequence[ModelPrice] = (),
    *,
    library: LibraryLookup | None = None,
    warn: Callable[[str], None] = logger.warning,
) -> Pricing:
    """Price every (provider, model) pair the gateway can call.

    ``prices`` (the config's ``pricing:``) win over the library; an entry's
    ``provider`` is a provider name, or a type (then it prices that model on
    every provider of the type that has no entry by name). ``library``
    defaults to :func:`library_rates` run in a child process
    (:func:`library_in_subprocess`); tests pass their own. Warns once per
    pair with no price (never for the fake provider type). Disabled
    providers are skipped."""
    # A disabled provider serves nothing: it is neither priced nor warned about
    # (the shipped config's keyless providers must not import the library).
    by_name = {p.name: p for p in providers if p.enabled}
    pairs: dict[tuple[str, str], ProviderConfig] = {}
    for provider in by_name.values():
        for model in provider.models:
            pairs[(provider.name, model)] = provider
    for route in routes:
        for target in route.targets:
            served = by_name.get(target.provider)
            if served is not None:
                pairs[(served.name, target.model)] = served
    named: dict[tuple[str, str], ModelPrice] = {}
    typed: dict[tuple[str, str], ModelPrice] = {}
    for entry in prices:
        if entry.provider in by_name:
            named[(entry.provider, entry.model)] = entry
            pairs.setdefault((entry.provider, entry.model), by_name[entry.provider])
        else:
            typed[(entry.provider, entry.model)] = entry
    rates: dict[tuple[str, str], Rates] = {}
    unpriced: list[tuple[str, str]] = []
    asked = [
        (provider, model)
        for (name, model), provider in pairs.items()
        if (name, model) not in named
        and (provider.type, model) not in typed
        and LIBRARY_PROVIDERS.get(provider.type) is not None
    ]
    # The library, asked once for every pair without a configured price: in a
    # child process by default, so that no worker holds genai-prices (~14 MB
    # of RSS and ~0.13 s of imports each) for a table it reads once.
    looked = (
        library_in_subprocess(asked)
        if library is None
        else {(p.name, m): library(p, m) for p, m in asked}
    )
    for (name, model), provider in pairs.items():
        price = named.get((name, model)) or typed.get((provider.type, model))
        found = configured_rates(price) if price is not None else looked.get((name, model))
        if found is not None:
            rates[(name, model)] = found
            continue
        unpriced.append((name, model))
        if provider.type not in _UNPRICED_TYPES:
            warn(
                f"no price known for model {model!r} of provider {name!r}: its usage is "
                f"recorded with cost_usd null; to price it, add under pricing: in the config "
                f"- {{ provider: {name}, model: {model}, input: <USD per 1M>, "
                f"output: <USD per 1M> }}"
            )
    return Pricing(rates, unpriced)


# --------------------------------------------------------------------------- genai-prices

LIBRARY_TIMEOUT = 30.0  # seconds for the child process that reads the library


class _Asked(msgspec.Struct, array_like=True):
    type: str
    base_url: str
    model: str


_ASKED = msgspec.json.Decoder(list[_Asked])
_LOOKED = msgspec.json.Decoder(list[Rates | None])


def library_in_subprocess(
    asked: Sequence[tuple[ProviderConfig, str]],
) -> dict[tuple[str, str], Rates | None]:
    """:func:`library_rates` of every (provider, model) of ``asked``, computed
    by a child Python process (``python -m gandalf.app.pricing``), by
    (provider name, model). Nothing asked: no child. A child that fails or
    times out leaves every pair unpriced, with one warning."""
    if not asked:
        return {}
    request = msgspec.json.encode([_Asked(p.type, p.base_url or "", model) for p, model in asked])
    root = str(Path(__file__).resolve().parents[2])  # the directory holding gandalf/
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gandalf.app.pricing"],
            input=request,
            capture_output=True,
            timeout=LIBRARY_TIMEOUT,
            env=env,
            check=True,
        )
        found = _LOOKED.decode(done.stdout)
    except (OSError, subprocess.SubprocessError, msgspec.DecodeError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        logger.warning(
            "could not read model prices from genai-prices (%s%s): every model without a "
            "pricing: entry is unpriced",
            type(exc).__name__,
            ": " + detail.decode(errors="replace").strip().splitlines()[-1] if detail else "",
        )
        return {}
    return {(p.name, model): rates for (p, model), rates in zip(asked, found, strict=True)}


def _child() -> None:
    """``python -m gandalf.app.pricing``: the library's rates of the pairs on
    stdin, as JSON on stdout (see :func:`library_in_subprocess`)."""
    asked = _ASKED.decode(sys.stdin.buffer.read())
    found = [
        library_rates(ProviderConfig(name="p", type=a.type, base_url=a.base_url), a.model)
        for a in asked
    ]
    sys.stdout.buffer.write(msgspec.json.encode(found))


def library_rates(provider: ProviderConfig, model: str) -> Rates | None:
    """The library's current price of ``model`` on ``provider``, as rates;
    None when it has none. An OpenAI-compatible provider whose base URL the
    library knows (Together, Groq, OpenRouter, ...) is priced as that
    provider; any other as the provider type's own API."""
    provider_id = LIBRARY_PROVIDERS.get(provider.type)
    if provider_id is None:
        return None
    # Imported here, at start-up only: pydantic-heavy, slow per call.
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    if provider.base_url:
        # A local or unknown URL: priced as the type's own API.
        with contextlib.suppress(LookupError):
            provider_id = snapshot.find_provider(None, None, provider.base_url).id
    try:
        _, info = snapshot.find_provider_model(model, None, provider_id, None)
    except LookupError:
        return None
    return _from_library(info.get_prices(datetime.now(tz=UTC)))


def _from_library(price: Any) -> Rates | None:
    """Rates from a genai-prices ``ModelPrice`` (USD per million, Decimals or
    ``TieredPrices``); None when it has no token price at all."""
    keys = ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok")
    reasoning_key = "output_reasoning_mtok"
    values = {key: getattr(price, key, None) for key in (*keys, reasoning_key)}
    if values["input_mtok"] is None and values["output_mtok"] is None:
        return None
    starts = sorted(
        {tier.start for value in values.values() for tier in getattr(value, "tiers", None) or ()}
    )

    def rate(key: str, fallback: str | None, prompt: int) -> float:
        value = values[key]
        if value is None:
            return rate(fallback, None, prompt) if fallback is not None else 0.0
        if hasattr(value, "tiers"):
            chosen = value.base
            for tier in reversed(value.tiers):
                if prompt > tier.start:
                    chosen = tier.price
                    break
            value = chosen
        return float(value) * _PER_MILLION

    def at(prompt: int) -> Rates:
        # Without its own price, a cached or cache-write token costs an input
        # token (as the library charges it), a reasoning token an output one.
        return Rates(
            input=rate("input_mtok", None, prompt),
            output=rate("output_mtok", None, prompt),
            cached_input=rate("cache_read_mtok", "input_mtok", prompt),
            cache_write=rate("cache_write_mtok", "input_mtok", prompt),
            reasoning=rate(reasoning_key, "output_mtok", prompt),
        )

    base = at(0)
    if not starts:
        return base
    return Rates(
        input=base.input,
        output=base.output,
        cached_input=base.cached_input,
        cache_write=base.cache_write,
        reasoning=base.reasoning,
        tiers=tuple((start, at(start + 1)) for start in starts),
    )


if __name__ == "__main__":
    _child()
