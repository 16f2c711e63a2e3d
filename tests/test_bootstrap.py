"""bootstrap: config-seeded keys follow the config; provider secrets stay out of the database."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec

from gandalf import bootstrap
from gandalf.app.keys import KeyManager
from gandalf.auth.apikey import generate_key
from gandalf.config import GandalfConfig, parse_config
from gandalf.storage.sqlite import SqliteStore
from gandalf.wiring import create_app
from tests.asgi_client import call
from tests.stores import make_store

MODELS = "/v1/models"


def config_text(db: Path | str, keys: dict[str, str], admin: str) -> str:
    entries = "".join(f"  - {{name: {name}, key: {key}}}\n" for name, key in keys.items())
    return (
        f"database: {{dsn: {db}}}\n"
        f"auth: {{admin_key: {admin}}}\n"
        "providers: [{name: fake, type: fake}]\n"
        "routes: [{model_alias: m, targets: [{provider: fake, model: f}]}]\n"
        + (f"keys:\n{entries}" if entries else "")
    )


def statuses(config: GandalfConfig, keys: list[str]) -> list[int]:
    """The status of GET /v1/models with each key, from a freshly started app."""

    async def main() -> list[int]:
        app = create_app(config, access_log=False)
        await app.startup()
        try:
            out = []
            for key in keys:
                reply = await call(app, "GET", MODELS, headers=[("authorization", f"Bearer {key}")])
                out.append(reply.status)
            return out
        finally:
            await app.shutdown()

    return asyncio.run(main())


def test_keys_that_leave_the_config_are_revoked_at_the_next_start(store_dsn: str) -> None:
    db = store_dsn
    key_a, key_b, admin_x, admin_y = (generate_key() for _ in range(4))
    first = parse_config(config_text(db, {"a": key_a, "b": key_b}, admin_x), source="g.yaml")
    assert statuses(first, [key_a, key_b, admin_x]) == [200, 200, 200]

    async def cli_key() -> str:
        store = make_store(db)
        await store.open()
        try:
            _, plaintext = await KeyManager(store).create(name="from-cli")
            return plaintext
        finally:
            await store.close()

    made_by_cli = asyncio.run(cli_key())

    # a removed, b's secret changed, admin key X replaced by Y.
    key_b2 = generate_key()
    second = parse_config(config_text(db, {"b": key_b2}, admin_y), source="g.yaml")
    got = statuses(second, [key_a, key_b, admin_x, admin_y, key_b2, made_by_cli])
    assert got == [401, 401, 401, 200, 200, 200]


def test_the_first_admin_key_is_not_revoked_by_a_config_without_keys(store_dsn: str) -> None:
    db = store_dsn
    config = parse_config(
        f"database: {{dsn: {db}}}\nproviders: [{{name: fake, type: fake}}]\n", source="g.yaml"
    )

    async def first() -> str | None:
        store = make_store(db)
        await store.open()
        try:
            await bootstrap.reconcile(store, config)
            return await bootstrap.first_admin_key(store)
        finally:
            await store.close()

    admin = asyncio.run(first())
    assert admin is not None
    assert statuses(config, [admin]) == [200]


def test_secrets_expanded_into_a_base_url_never_reach_the_database(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    user_secret = "s3cr3t-userinfo-" + generate_key()[4:20]
    query_secret = "s3cr3t-query-" + generate_key()[4:20]
    default_secret = "s3cr3t-default-" + generate_key()[4:20]
    text = (
        f"database: {{dsn: {db}}}\n"
        "providers:\n"
        "  - name: up\n"
        "    type: openai\n"
        "    api_key: sk-x\n"
        '    base_url: "https://user:${SECRET}@127.0.0.1:9/v1?k=${SECRET2}&d=${UNSET_'
        + f'VAR_XYZ:-{default_secret}}}"\n'
    )
    env = {"SECRET": user_secret, "SECRET2": query_secret}
    config = parse_config(text, source=str(tmp_path / "g.yaml"), env=env)
    assert user_secret in config.providers[0].base_url  # the running provider gets the value
    assert user_secret not in repr(config.providers[0])  # what a log line would show

    async def seed() -> list[str]:
        store = SqliteStore(str(db))
        await store.open()
        try:
            await bootstrap.reconcile(store, config)
            stored = await store.list_providers()
            # A stored reference resolves from the environment again (other sources).
            others = [msgspec.structs.replace(p, source="api") for p in stored]
            again = bootstrap.runtime_providers(GandalfConfig(), others, env)
            return [p.base_url for p in stored + again]
        finally:
            await store.close()

    stored_url, resolved_url = asyncio.run(seed())
    assert stored_url == "https://user:${SECRET}@127.0.0.1:9/v1?k=${SECRET2}&d=${UNSET_VAR_XYZ}"
    assert resolved_url == f"https://user:{user_secret}@127.0.0.1:9/v1?k={query_secret}&d="
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("g.db"))
    for secret in (user_secret, query_secret, default_secret):
        assert secret.encode() not in raw
