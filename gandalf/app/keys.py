"""KeyManager: create, list, update and revoke API keys (the CLI's and the admin API's).

The plaintext key exists only in the return value of :meth:`KeyManager.create`;
storage sees its SHA-256 hex and an 8-character display prefix.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import msgspec

from gandalf.auth.apikey import display_prefix, generate_key, hash_key
from gandalf.domain import BUDGET_PERIODS, ROLES, ApiKey, Budget
from gandalf.errors import Conflict, InvalidRequest


class Unset:
    """No change asked (a PATCH that leaves a field out); None means "clear it"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset()


class KeyStore(Protocol):
    async def create_key(self, key: ApiKey) -> None: ...

    async def get_key(self, key_id: str) -> ApiKey | None: ...

    async def update_key(self, key: ApiKey) -> bool: ...

    async def list_keys(self, org_id: str | None = None) -> list[ApiKey]: ...

    async def revoke_key(self, key_id: str) -> bool: ...

    async def ensure_org(self, org_id: str, name: str) -> None: ...


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


class KeyManager:
    __slots__ = ("_clock", "_store")

    def __init__(self, store: KeyStore, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    async def create(
        self,
        *,
        name: str,
        role: str = "member",
        org_id: str = "default",
        team_id: str | None = None,
        allowed_models: Sequence[str] | None = None,
        expires_at: float | None = None,
        source: str = "cli",
        rpm: int = 0,
        tpm: int = 0,
        budget: Budget | None = None,
    ) -> tuple[ApiKey, str]:
        """Store a new key; returns it and its plaintext (shown once, never stored).

        Refuses (``InvalidRequest``) an empty name, an unknown role, an expiry in the
        past, and a name an active (neither revoked nor expired) key of the same
        organization already has: names are how operators tell keys apart when they
        rotate or revoke one. Also refuses negative ``rpm``/``tpm`` and a bad budget.
        The caller checks that ``team_id`` names a team of ``org_id``.
        """
        _check_limits(rpm, tpm, budget)
        if not name.strip():
            raise InvalidRequest("A key needs a non-empty name.", param="name")
        if role not in ROLES:
            raise InvalidRequest(
                f"Unknown role '{role}'; use one of {', '.join(ROLES)}.", param="role"
            )
        now = self._clock()
        if expires_at is not None and expires_at <= now:
            raise InvalidRequest("expires_at is in the past.", param="expires_at")
        for other in await self._store.list_keys(org_id):
            if (
                other.name == name
                and not other.revoked
                and (other.expires_at is None or other.expires_at > now)
            ):
                raise Conflict(
                    f"An active key named {name!r} already exists in organization "
                    f"{org_id!r} ({other.id}); choose another name, or revoke that key first.",
                    param="name",
                )
        plaintext = generate_key()
        key = ApiKey(
            id=new_key_id(),
            name=name,
            key_hash=hash_key(plaintext),
            prefix=display_prefix(plaintext),
            org_id=org_id,
            team_id=team_id,
            role=role,
            allowed_models=tuple(allowed_models) if allowed_models is not None else None,
            expires_at=expires_at,
            created_at=now,
            source=source,
            rpm=rpm,
            tpm=tpm,
            budget=budget,
        )
        await self._store.ensure_org(org_id, org_id)
        await self._store.create_key(key)
        return key, plaintext

    async def update(
        self,
        key_id: str,
        *,
        allowed_models: Sequence[str] | Unset | None = UNSET,
        expires_at: float | Unset | None = UNSET,
        rpm: int | None = None,
        tpm: int | None = None,
        budget: Budget | Unset | None = UNSET,
        blocked: bool | None = None,
    ) -> ApiKey | None:
        """Change what may change of a key after creation; returns it as stored
        now, or None if there is no such key. Left out (``UNSET``/None for the
        counts and ``blocked``): unchanged; ``allowed_models``/``expires_at``/
        ``budget`` None: cleared. Validated like :meth:`create` (an expiry in
        the past is refused: block or revoke a key to stop it now)."""
        key = await self._store.get_key(key_id)
        if key is None:
            return None
        changes: dict[str, object] = {}
        if not isinstance(allowed_models, Unset):
            changes["allowed_models"] = None if allowed_models is None else tuple(allowed_models)
        if not isinstance(expires_at, Unset):
            if expires_at is not None and expires_at <= self._clock():
                raise InvalidRequest("expires_at is in the past.", param="expires_at")
            changes["expires_at"] = expires_at
        if rpm is not None:
            changes["rpm"] = rpm
        if tpm is not None:
            changes["tpm"] = tpm
        if not isinstance(budget, Unset):
            changes["budget"] = budget
        if blocked is not None:
            changes["blocked"] = blocked
        updated = msgspec.structs.replace(key, **changes)
        _check_limits(updated.rpm, updated.tpm, updated.budget)
        if updated != key and not await self._store.update_key(updated):
            return None  # revoked and deleted meanwhile? keys are never deleted; be safe
        return updated

    async def get(self, key_id: str) -> ApiKey | None:
        return await self._store.get_key(key_id)

    async def list(self, org_id: str | None = None) -> list[ApiKey]:
        return await self._store.list_keys(org_id)

    async def revoke(self, key_id: str) -> bool:
        return await self._store.revoke_key(key_id)


def _check_limits(rpm: int, tpm: int, budget: Budget | None) -> None:
    """InvalidRequest unless the counts are >= 0 and the budget is sound."""
    for param, value in (("rpm", rpm), ("tpm", tpm)):
        if value < 0:
            raise InvalidRequest(f"{param} must be 0 (unlimited) or more.", param=param)
    if budget is not None and (
        not 0 <= budget.usd < float("inf") or budget.period not in BUDGET_PERIODS
    ):
        raise InvalidRequest(
            f"A budget needs usd >= 0 and a period of {', '.join(BUDGET_PERIODS)}.",
            param="budget",
        )
