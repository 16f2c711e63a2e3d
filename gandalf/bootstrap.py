"""Reconcile the configuration into storage at start-up.

Every start makes the database agree with gandalf.yaml: providers and routes
from the config are upserted (source ``config``) and config-owned rows that
left the file are removed; objects created by the CLI or the admin API are left
alone. Bootstrap keys are seeded idempotently (by hash). When there is no key
at all, :func:`first_admin_key` creates one and returns its plaintext so the
CLI can print it once.

Provider secrets never reach storage: the database keeps the ``${ENV}``
reference (or nothing); the runtime provider list takes secrets from the
loaded config, or resolves a stored reference from the environment.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

import msgspec

from gandalf.app.keys import KeyManager, KeyStore, new_key_id
from gandalf.auth.apikey import display_prefix, hash_key
from gandalf.config import GandalfConfig
from gandalf.domain import (
    TYPES_NEEDING_KEY,
    ApiKey,
    JwtIssuer,
    Organization,
    ProviderConfig,
    Route,
    Team,
)

logger = logging.getLogger("gandalf")


class BootstrapStore(KeyStore, Protocol):
    async def reconcile(
        self, providers: Sequence[ProviderConfig], routes: Sequence[Route]
    ) -> None: ...

    async def upsert_config_key(self, key: ApiKey) -> bool: ...

    async def upsert_config_tenants(
        self, orgs: Sequence[Organization], teams: Sequence[Team]
    ) -> None: ...

    async def prune_config_tenants(
        self, org_ids: Sequence[str], team_ids: Sequence[str]
    ) -> list[str]: ...

    async def count_keys(self) -> int: ...

    async def reconcile_issuers(self, issuers: Sequence[JwtIssuer]) -> None: ...

    async def revoke_config_keys_except(self, key_hashes: Sequence[str]) -> int: ...


async def reconcile(store: BootstrapStore, config: GandalfConfig) -> int:
    """Make storage match the config. Returns how many bootstrap keys were new.

    Keys are reconciled like providers and routes: every ``keys`` entry and
    ``auth.admin_key`` is seeded (source ``config``), and every active
    config-sourced key that is no longer in the config (removed, or its secret
    changed) is revoked. Keys made by ``gandalf keys create`` or the first-start
    admin key are left alone. A revoked key stays revoked even if it comes back
    to the config: a revocation is never undone by a file.

    Orgs and teams are reconciled the same way (upserted before the keys,
    pruned after them, see ``prune_config_tenants``), except that one that left
    the config while keys still belong to it is kept as it was (logged):
    removing it must not widen what those keys may do.
    The ``default`` org always exists. A config key's limits, budget, team and
    allowed models are updated to the file's on every reconcile.
    """
    await store.ensure_org("default", "Default")
    await store.reconcile([_storable(p) for p in config.providers], config.routes)
    await store.upsert_config_tenants(config.orgs, config.teams)
    await store.reconcile_issuers(config.auth.jwt)
    added = 0
    now = time.time()
    hashes: list[str] = []
    for entry in config.keys:  # their orgs and teams are declared (config.py checks)
        key = ApiKey(
            id=new_key_id(),
            name=entry.name,
            key_hash=hash_key(entry.key),
            prefix=display_prefix(entry.key),
            org_id=entry.org_id,
            team_id=entry.team_id,
            role=entry.role,
            allowed_models=tuple(entry.allowed_models)
            if entry.allowed_models is not None
            else None,
            expires_at=entry.expires_at,
            created_at=now,
            source="config",
            rpm=entry.rpm,
            tpm=entry.tpm,
            budget=entry.budget,
        )
        hashes.append(key.key_hash)
        if await store.upsert_config_key(key):
            added += 1
    revoked = await store.revoke_config_keys_except(hashes)
    if revoked:
        logger.warning("revoked %d API key(s) that are no longer in %s", revoked, config.source)
    kept = await store.prune_config_tenants(
        [o.id for o in config.orgs], [t.id for t in config.teams]
    )
    for problem in kept:
        logger.warning("%s: %s", config.source, problem)
    return added


async def first_admin_key(store: BootstrapStore) -> str | None:
    """Create an admin key when the key table is empty; its plaintext, else None."""
    if await store.count_keys() > 0:
        return None
    _, plaintext = await KeyManager(store).create(name="first-admin", role="admin")
    return plaintext


_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def resolve_ref(ref: str, env: Mapping[str, str]) -> str:
    """The value of a stored ``${VAR}`` / ``${VAR:-default}`` reference."""
    match = _REF.fullmatch(ref)
    if match is None:
        return ""
    value = env.get(match.group(1), "")
    return value if value else (match.group(2) or "")


def _storable(provider: ProviderConfig) -> ProviderConfig:
    """``provider`` as the database may see it: a ``base_url`` built from ``${VAR}``
    references is stored as the references (its expanded form may hold secrets)."""
    if provider.base_url_ref is None:
        return provider
    return msgspec.structs.replace(provider, base_url=provider.base_url_ref)


def resolve_refs(text: str, env: Mapping[str, str]) -> str:
    """``text`` with every ``${VAR}`` / ``${VAR:-default}`` replaced by its value."""
    if "${" not in text:
        return text
    return _REF.sub(lambda m: resolve_ref(m.group(0), env), text)


def runtime_providers(
    config: GandalfConfig,
    stored: Sequence[ProviderConfig],
    env: Mapping[str, str] | None = None,
) -> list[ProviderConfig]:
    """The providers to run: the config's (with their secrets), then stored
    providers created outside the config, their secrets resolved from the environment."""
    env = os.environ if env is None else env
    result = list(config.providers)
    names = {p.name for p in result}
    for provider in stored:
        if provider.name in names or provider.source == "config":
            continue
        secret = resolve_ref(provider.api_key_ref, env) if provider.api_key_ref else ""
        provider = msgspec.structs.replace(provider, base_url=resolve_refs(provider.base_url, env))
        if not secret and provider.type in TYPES_NEEDING_KEY and provider.enabled:
            provider = msgspec.structs.replace(
                provider, enabled=False, disabled_reason=f"set {provider.api_key_ref or 'api_key'}"
            )
        result.append(msgspec.structs.replace(provider, api_key=secret))
    return result
