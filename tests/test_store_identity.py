"""The store's JWT issuers, users and stored responses (migrations 8 and 9),
on every backend (``store_dsn``: an SQLite file, then a fresh PostgreSQL
database): the same calls give the same answers on both."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from gandalf.domain import JwtIssuer, StoredResponse, UsageRecord, User
from gandalf.storage.protocol import Store
from tests.stores import make_store

T0 = 1_800_000_000.0 - 1_800_000_000.0 % 86400  # a UTC midnight


def run(dsn: str, test: Callable[[Store, list[float]], Awaitable[None]]) -> None:
    """``test(store, now)`` on a fresh store whose clock reads ``now[0]``."""
    now = [T0 + 3600.0]

    async def main() -> None:
        store = make_store(dsn, clock=lambda: now[0])
        await store.open()
        try:
            await test(store, now)
        finally:
            await store.close()

    asyncio.run(main())


def issuer(url: str, source: str = "config", audience: str = "gandalf") -> JwtIssuer:
    return JwtIssuer(issuer=url, audience=(audience,), source=source)


# --------------------------------------------------------------------------- issuers


def test_issuers_are_listed_by_url_with_their_source_and_each_change_logged(
    store_dsn: str,
) -> None:
    async def check(store: Store, now: list[float]) -> None:
        assert await store.list_issuers() == []
        version = await store.change_version()
        await store.upsert_issuer(issuer("https://b.example", source="api"))
        await store.upsert_issuer(issuer("https://a.example", source="api"))
        # Upper case sorts first in byte order, whatever the database's collation.
        await store.upsert_issuer(issuer("https://Z.example", source="api"))
        listed = await store.list_issuers()
        assert [i.issuer for i in listed] == [
            "https://Z.example",
            "https://a.example",
            "https://b.example",
        ]
        assert {i.source for i in listed} == {"api"}
        changes = await store.changes_since(version)
        assert [c.kind for c in changes] == ["issuers"] * 3
        version = await store.change_version()
        await store.upsert_issuer(issuer("https://a.example", source="api"))  # the same again
        assert await store.change_version() == version  # unchanged: nothing logged
        await store.upsert_issuer(issuer("https://a.example", source="api", audience="other"))
        assert await store.change_version() == version + 1
        a = (await store.list_issuers())[1]
        assert (a.issuer, a.audience) == ("https://a.example", ("other",))
        assert await store.delete_issuer("https://a.example")
        assert not await store.delete_issuer("https://a.example")
        assert await store.change_version() == version + 2
        assert [i.issuer for i in await store.list_issuers()] == [
            "https://Z.example",
            "https://b.example",
        ]

    run(store_dsn, check)


def test_reconcile_makes_the_config_issuers_exactly_these(store_dsn: str) -> None:
    async def check(store: Store, now: list[float]) -> None:
        await store.upsert_issuer(issuer("https://api.example", source="api"))
        await store.upsert_issuer(issuer("https://taken.example", source="api"))
        await store.reconcile_issuers(
            [issuer("https://one.example"), issuer("https://taken.example")]
        )
        listed = {i.issuer: i.source for i in await store.list_issuers()}
        assert listed == {
            "https://api.example": "api",  # API-made: left alone
            "https://one.example": "config",
            "https://taken.example": "config",  # taken over by the config
        }
        version = await store.change_version()
        await store.reconcile_issuers(
            [issuer("https://one.example"), issuer("https://taken.example")]
        )
        assert await store.change_version() == version  # nothing changed, nothing logged
        await store.reconcile_issuers([issuer("https://two.example")])
        listed = {i.issuer: i.source for i in await store.list_issuers()}
        assert listed == {"https://api.example": "api", "https://two.example": "config"}
        changes = await store.changes_since(version)
        assert [c.kind for c in changes] == ["issuers"]  # one reconcile, one change
        await store.reconcile_issuers([])
        assert [i.issuer for i in await store.list_issuers()] == ["https://api.example"]

    run(store_dsn, check)


# --------------------------------------------------------------------------- users


def test_a_user_is_recorded_on_first_sight_and_updated_after(store_dsn: str) -> None:
    async def check(store: Store, now: list[float]) -> None:
        first = T0 + 3600.0
        await store.record_user(User(id="usr_b", issuer="https://i", subject="bob", org_id="o1"))
        now[0] = first + 10
        await store.record_user(
            User(id="usr_a", issuer="https://i", subject="alice", name="Alice", org_id="o2")
        )
        now[0] = first + 20
        await store.record_user(
            User(
                id="usr_b",
                issuer="https://i",
                subject="bob",
                name="Bob",
                org_id="o2",
                team_id="t",
                role="admin",
            )
        )
        users = await store.list_users()
        assert [u.id for u in users] == ["usr_b", "usr_a"]  # by first sight
        bob = users[0]
        assert (bob.name, bob.org_id, bob.team_id, bob.role) == ("Bob", "o2", "t", "admin")
        assert (bob.first_seen, bob.last_seen) == (first, first + 20)
        assert users[1] == User(
            id="usr_a",
            issuer="https://i",
            subject="alice",
            name="Alice",
            org_id="o2",
            first_seen=first + 10,
            last_seen=first + 10,
        )
        assert [u.id for u in await store.list_users("o2")] == ["usr_b", "usr_a"]
        assert await store.list_users("o1") == []

    run(store_dsn, check)


def test_usage_by_key_names_a_jwt_user(store_dsn: str) -> None:
    """Usage rows of a JWT user carry its id as key_id: the summary by key
    names the user, from raw rows and from the rollups alike."""

    async def check(store: Store, now: list[float]) -> None:
        await store.record_user(User(id="usr_1", issuer="https://i", subject="s", name="Sam"))
        for n in range(3):
            store.record_usage(
                UsageRecord(f"r{n}", "usr_1", "default", "m", "m", "p", 1, 2, 3, 1.0, 200, T0 + n)
            )
        await store.flush()
        now[0] = T0 + 2 * 86400
        for bucket in (None, "hour", "day"):
            rows = await store.usage_summary("key", T0, T0 + 86400, bucket=bucket)
            assert [(r.group, r.name, r.requests) for r in rows] == [("usr_1", "Sam", 3)], bucket

    run(store_dsn, check)


# --------------------------------------------------------------------------- stored responses


def stored(response_id: str, key_id: str, expires_at: float | None) -> StoredResponse:
    return StoredResponse(
        id=response_id,
        key_id=key_id,
        created_at=T0,
        expires_at=expires_at,
        input=b"[]",
        response=b'{"id":"' + response_id.encode() + b'","output":[]}',
    )


def test_responses_are_kept_per_key_until_they_expire(store_dsn: str) -> None:
    async def check(store: Store, now: list[float]) -> None:
        now[0] = 1000.0
        await store.save_response(stored("resp_a", "key1", 1100.0))
        await store.save_response(stored("resp_b", "key1", None))
        await store.save_response(stored("resp_b", "key2", None))  # same id, another key
        assert await store.delete_response("resp_b", "key2")
        assert await store.get_response("resp_a", "key1") == stored("resp_a", "key1", 1100.0)
        assert await store.get_response("resp_a", "key2") is None
        assert not await store.delete_response("resp_a", "key2")
        # Saving again replaces the row of the same key and id.
        replaced = stored("resp_b", "key1", None)
        replaced.response = b'{"id":"resp_b","output":[1]}'
        await store.save_response(replaced)
        assert await store.get_response("resp_b", "key1") == replaced
        now[0] = 1100.0  # resp_a expired
        assert await store.get_response("resp_a", "key1") is None
        assert await store.get_response("resp_b", "key1") is not None
        assert await store.delete_response("resp_b", "key1")
        assert await store.get_response("resp_b", "key1") is None

    run(store_dsn, check)


def test_pruning_an_expired_response_keeps_another_keys_of_the_same_id(store_dsn: str) -> None:
    async def check(store: Store, now: list[float]) -> None:
        now[0] = 1000.0
        await store.save_response(stored("resp_x", "key1", 1100.0))
        await store.save_response(stored("resp_x", "key2", None))
        now[0] = 1200.0
        await store.save_response(stored("resp_y", "key1", None))  # prunes key1's resp_x
        assert await store.get_response("resp_x", "key2") == stored("resp_x", "key2", None)
        now[0] = 1000.0  # key1's is gone for good, not just hidden by its expiry
        assert await store.get_response("resp_x", "key1") is None

    run(store_dsn, check)
