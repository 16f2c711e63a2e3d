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

import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

import msgspec

from gandalf.app.keys import KeyManager, KeyStore, new_key_id
from gandalf.auth.apikey import display_prefix, hash_key
from gandalf.config import GandalfConfig
from gandalf.domain import TYPES_NEEDING_KEY, ApiKey, ProviderConfig, Route


class BootstrapStore(KeyStore, Protocol):
    async def reconcile(
        self, providers: Sequence[ProviderConfig], routes: Sequence[Route]
    ) -> None: ...

    async def upsert_config_key(self, key: ApiKey) -> bool: ...

    async def count_keys(self) -> int: ...


async def reconcile(store: BootstrapStore, config: GandalfConfig) -> int:
    """Make storage match the config. Returns how many bootstrap keys were new."""
    await store.ensure_org("default", "Default")
    await store.reconcile(config.providers, config.routes)
    added = 0
    now = time.time()
    for entry in config.keys:
        if entry.org_id != "default":
            await store.ensure_org(entry.org_id, entry.org_id)
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
        )
        if await store.upsert_config_key(key):
            added += 1
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
        if not secret and provider.type in TYPES_NEEDING_KEY and provider.enabled:
            provider = msgspec.structs.replace(
                provider, enabled=False, disabled_reason=f"set {provider.api_key_ref or 'api_key'}"
            )
        result.append(msgspec.structs.replace(provider, api_key=secret))
    return result
