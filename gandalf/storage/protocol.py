"""The ``Store`` Protocol: everything the gateway asks of its database, and the
errors every implementation raises.

Two implementations: :class:`~gandalf.storage.sqlite.SqliteStore` (one
machine, the default) and :class:`~gandalf.storage.postgres.PostgresStore`
(several instances on one PostgreSQL). Only ``wiring.py`` names them
(``make_store``); everything else types against :class:`Store`, and one test
suite (tests/test_store_contract.py) holds both to the same behaviour.

Shared semantics, whatever the engine:

- Lifecycle: construct, ``await open()`` (connects, applies missing schema
  migrations, starts the single writer task), use, ``await close()`` (drains
  what was queued first). Methods are called from the loop that opened it.
- Usage: ``record_usage`` never blocks and never raises; one writer task
  batches records into one transaction each, adding their sums into the
  hourly and daily rollups in that same transaction.
- Change log: every write that changes keys, orgs, teams, routes,
  providers or JWT issuers appends a ``Change`` in its own transaction, with versions that
  become visible in increasing order (a poller that read up to ``v`` never
  later sees a new change numbered ``<= v``). The newest
  :data:`CHANGE_LOG_KEEP` are kept.
- Errors: :class:`StorageError` for everything the engine reports; a create
  that breaks a constraint raises :class:`CannotCreate` (also a
  :class:`~gandalf.errors.Clash`); deleting a tenant still in use raises
  :class:`TenantInUse` (also an :class:`~gandalf.errors.InUse`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol

from gandalf.domain import (
    ApiKey,
    AuditEntry,
    Change,
    JwtIssuer,
    Organization,
    ProviderConfig,
    Route,
    StoredResponse,
    Team,
    UsageRecord,
    UsageSummary,
    User,
)
from gandalf.errors import Clash, InUse

__all__ = ["CHANGE_LOG_KEEP", "CannotCreate", "StorageError", "Store", "TenantInUse"]

CHANGE_LOG_KEEP: Final = 1000


class StorageError(Exception):
    """The store cannot do what was asked (not open, constraint violated, engine error)."""


class CannotCreate(StorageError, Clash):
    """An insert broke a constraint: the id exists (a concurrent create), or
    what it refers to does not (a team's organization)."""


class TenantInUse(StorageError, InUse):
    """An organization or team cannot be deleted: keys (or teams) still belong to it."""


class Store(Protocol):
    """Gandalf's persistent state. See the module docstring for the shared
    semantics and :class:`~gandalf.storage.sqlite.SqliteStore` for each
    method's contract, which every implementation follows."""

    # lifecycle
    async def open(self) -> None: ...

    async def close(self, timeout: float = 10.0) -> None: ...  # noqa: ASYNC109 bounds the drain

    async def ping(self) -> bool: ...

    # usage
    def record_usage(self, rec: UsageRecord) -> None: ...

    @property
    def dropped_usage(self) -> int: ...

    @property
    def usage_written(self) -> int: ...

    @property
    def usage_failed(self) -> int: ...

    async def flush(self) -> None: ...

    async def list_usage(self, limit: int = 1000) -> list[UsageRecord]: ...

    async def usage_summary(
        self,
        by: str | None,
        since: float,
        until: float | None = None,
        *,
        bucket: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[UsageSummary]: ...

    async def spend_since(self, kind: str, id: str, since: float) -> float: ...

    async def prune_usage(self, batch: int = 5000) -> int: ...

    # live changes
    async def log_cache_purge(self) -> None: ...

    async def change_version(self) -> int: ...

    async def changes_since(self, version: int, limit: int = 100) -> list[Change]: ...

    # keys
    async def get_key_by_hash(self, key_hash: str) -> ApiKey | None: ...

    async def get_key(self, key_id: str) -> ApiKey | None: ...

    async def create_key(self, key: ApiKey) -> None: ...

    async def list_keys(self, org_id: str | None = None) -> list[ApiKey]: ...

    async def revoke_key(self, key_id: str) -> bool: ...

    async def update_key(self, key: ApiKey) -> bool: ...

    async def count_keys(self) -> int: ...

    async def upsert_config_key(self, key: ApiKey) -> bool: ...

    async def revoke_config_keys_except(self, key_hashes: Sequence[str]) -> int: ...

    # providers and routes
    async def reconcile(
        self, providers: Sequence[ProviderConfig], routes: Sequence[Route]
    ) -> None: ...

    async def list_providers(self) -> list[ProviderConfig]: ...

    async def upsert_provider(self, p: ProviderConfig) -> None: ...

    async def delete_provider(self, name: str) -> bool: ...

    async def list_routes(self) -> list[Route]: ...

    async def upsert_route(self, r: Route) -> None: ...

    async def delete_route(self, alias: str) -> bool: ...

    # organizations and teams
    async def ensure_org(self, org_id: str, name: str) -> None: ...

    async def create_org(self, org: Organization) -> None: ...

    async def get_org(self, org_id: str) -> Organization | None: ...

    async def list_orgs(self) -> list[Organization]: ...

    async def delete_org(self, org_id: str) -> bool: ...

    async def update_org(self, org: Organization) -> bool: ...

    async def create_team(self, team: Team) -> None: ...

    async def get_team(self, team_id: str) -> Team | None: ...

    async def list_teams(self, org_id: str | None = None) -> list[Team]: ...

    async def delete_team(self, team_id: str) -> bool: ...

    async def update_team(self, team: Team) -> bool: ...

    async def upsert_config_tenants(
        self, orgs: Sequence[Organization], teams: Sequence[Team]
    ) -> None: ...

    async def prune_config_tenants(
        self, org_ids: Sequence[str], team_ids: Sequence[str]
    ) -> list[str]: ...

    # audit
    async def record_audit(self, entry: AuditEntry) -> None: ...

    async def list_audit(self, limit: int = 100, offset: int = 0) -> list[AuditEntry]: ...

    # JWT issuers and users (migration 9)
    async def list_issuers(self) -> list[JwtIssuer]: ...

    async def upsert_issuer(self, issuer: JwtIssuer) -> None: ...

    async def delete_issuer(self, issuer: str) -> bool: ...

    async def reconcile_issuers(self, issuers: Sequence[JwtIssuer]) -> None: ...

    async def record_user(self, user: User) -> None: ...

    async def list_users(self, org_id: str | None = None) -> list[User]: ...

    # stored responses (migration 8)
    async def save_response(self, stored: StoredResponse) -> None: ...

    async def get_response(self, response_id: str, key_id: str) -> StoredResponse | None: ...

    async def delete_response(self, response_id: str, key_id: str) -> bool: ...
