"""The admin API (/admin/v1) in process, through the whole app (ASGI and RSGI):
auth and roles, every resource, validation and error shapes, secrets never
returned, config objects read-only, audit rows, pagination, usage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gandalf.app.cache import CachedAnswer, InProcessCache, ResponseCache
from gandalf.auth.apikey import generate_key
from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry, ServerConfig
from gandalf.domain import Organization, ProviderConfig, Route, Target, Team, Usage, UsageRecord
from gandalf.server.asgi import GandalfApp
from gandalf.server.rsgi import RSGIApp
from gandalf.wiring import create_app
from tests.asgi_client import Reply, call
from tests.rsgi_client import rsgi_call

ADMIN = generate_key()
MEMBER = generate_key()
VIEWER = generate_key()
SECRET = "sk-test-THIS-MUST-NEVER-SHOW-" + "x" * 20
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hello"}]}


def make_config(db: str = ":memory:") -> GandalfConfig:
    return GandalfConfig(
        server=ServerConfig(),
        database=DatabaseConfig(dsn=db),
        providers=(
            ProviderConfig(name="fake", type="fake"),
            ProviderConfig(
                name="openai",
                type="openai",
                base_url="http://127.0.0.1:9/v1",
                api_key=SECRET,
                api_key_ref="${OPENAI_API_KEY}",
            ),
        ),
        routes=(
            Route(model_alias="fake-model", targets=(Target(provider="fake", model="fake-1"),)),
        ),
        orgs=(Organization(id="acme", name="Acme", source="config"),),
        teams=(Team(id="backend", org_id="acme", name="Backend", source="config"),),
        keys=(
            KeyEntry(name="admin", key=ADMIN, role="admin"),
            KeyEntry(name="member", key=MEMBER, role="member"),
            KeyEntry(name="viewer", key=VIEWER, role="viewer"),
        ),
        source="/etc/gandalf/gandalf.yaml",
    )


Scenario = Callable[[GandalfApp], Awaitable[None]]


def run(scenario: Scenario, cache: ResponseCache | None = None) -> None:
    async def main() -> None:
        app = create_app(make_config(), access_log=False, response_cache=cache)
        await app.startup()
        try:
            await scenario(app)
        finally:
            await app.shutdown()

    asyncio.run(main())


async def admin(
    app: GandalfApp,
    method: str,
    path: str,
    key: str | None = ADMIN,
    *,
    json: Any = None,
    body: bytes = b"",
    query: str = "",
) -> Reply:
    headers = [("authorization", f"Bearer {key}")] if key is not None else []
    if json is not None or body:
        headers.append(("content-type", "application/json"))
    return await call(
        app, method, "/admin/v1" + path, headers=headers, json=json, body=body, query=query
    )


async def chat(app: GandalfApp, headers: list[tuple[str, str]]) -> Reply:
    return await call(app, "POST", "/v1/chat/completions", headers=headers, json=CHAT)


def assert_error(reply: Reply, status: int, code: str | None = None) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.header("content-type") == "application/json"
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    return dict(error)


# --------------------------------------------------------------------------- auth


def test_auth_none_member_viewer_admin() -> None:
    async def scenario(app: GandalfApp) -> None:
        assert_error(await admin(app, "GET", "/keys", None), 401, "invalid_api_key")
        assert_error(await admin(app, "GET", "/keys", "gnd_" + "a" * 43), 401, "invalid_api_key")
        assert_error(await admin(app, "GET", "/keys", MEMBER), 403, "permission_denied")
        assert (await admin(app, "GET", "/keys", VIEWER)).status == 200
        assert (await admin(app, "GET", "/keys", ADMIN)).status == 200
        # writes: admin only
        reply = await admin(app, "POST", "/keys", VIEWER, json={"name": "x"})
        assert_error(reply, 403, "permission_denied")
        assert (await admin(app, "POST", "/keys", ADMIN, json={"name": "x"})).status == 201
        # x-api-key works too
        reply = await call(app, "GET", "/admin/v1/orgs", headers=[("x-api-key", VIEWER)])
        assert reply.status == 200

    run(scenario)


def test_unknown_paths_wrong_methods_and_bad_bodies_answer_in_the_error_shape() -> None:
    async def scenario(app: GandalfApp) -> None:
        assert_error(await admin(app, "GET", "/nope"), 404, "not_found")
        reply = await admin(app, "PUT", "/keys")
        assert_error(reply, 405, "method_not_allowed")
        assert sorted((reply.header("allow") or "").split(", ")) == ["GET", "HEAD", "POST"]
        head = await admin(app, "HEAD", "/keys")
        assert head.status == 200 and head.body == b""
        error = assert_error(await admin(app, "POST", "/keys", body=b"{not json"), 400)
        assert error["type"] == "invalid_request_error"
        error = assert_error(await admin(app, "POST", "/keys", json={"name": "a", "nope": 1}), 400)
        assert error["param"] == "nope"
        error = assert_error(await admin(app, "POST", "/keys", json={"name": "a", "rpm": -1}), 400)
        assert error["param"] == "rpm"
        assert_error(await admin(app, "POST", "/keys", json={"role": "admin"}), 400)
        assert_error(await admin(app, "GET", "/keys", query="limit=0"), 400)
        assert_error(await admin(app, "GET", "/keys", query="limit=abc"), 400)
        assert_error(await admin(app, "GET", "/usage", query="since=yesterday"), 400)
        assert_error(await admin(app, "GET", "/usage", query="group_by=color"), 400)

    run(scenario)


def test_the_openapi_document_is_served_without_a_key_and_lists_every_operation() -> None:
    async def scenario(app: GandalfApp) -> None:
        reply = await call(app, "GET", "/admin/v1/openapi.json")
        assert reply.status == 200
        doc = reply.json()
        assert doc["openapi"] == "3.1.0"
        paths = doc["paths"]
        assert set(paths["/admin/v1/keys"]) == {"get", "post"}
        assert set(paths["/admin/v1/keys/{key_id}"]) == {"get", "patch", "delete"}
        assert set(paths["/admin/v1/routes/{alias}"]) == {"get", "put", "delete"}
        for path in ("/usage", "/audit", "/providers/health", "/cache/purge", "/orgs", "/teams"):
            assert "/admin/v1" + path in paths
        post = paths["/admin/v1/keys"]["post"]
        assert {"201", "400", "401", "403"} <= set(post["responses"])
        assert "KeyCreate" in doc["components"]["schemas"]
        usage = {p["name"]: p for p in paths["/admin/v1/usage"]["get"]["parameters"]}
        assert {"group_by", "since", "until", "bucket", "limit", "offset"} <= set(usage)
        groups = {"key", "team", "org", "model", "provider", "route"}
        assert set(usage["group_by"]["schema"]["enum"]) == groups

    run(scenario)


# --------------------------------------------------------------------------- keys


def test_a_key_created_over_http_works_then_is_refused_once_revoked() -> None:
    async def scenario(app: GandalfApp) -> None:
        reply = await admin(
            app, "POST", "/keys", json={"name": "svc", "org": "acme", "team": "backend", "rpm": 5}
        )
        assert reply.status == 201
        created = reply.json()
        plaintext = created["key"]
        assert plaintext.startswith("gnd_") and created["source"] == "api"
        assert created["org"] == "acme" and created["team"] == "backend"
        assert "key_hash" not in created and created["status"] == "active"
        auth = [("authorization", f"Bearer {plaintext}")]
        assert (await call(app, "POST", "/v1/chat/completions", headers=auth, json=CHAT)).status
        ok = await call(app, "POST", "/v1/chat/completions", headers=auth, json=CHAT)
        assert ok.status == 200
        # GET never shows the hash nor the plaintext again
        got = (await admin(app, "GET", f"/keys/{created['id']}")).json()
        assert "key" not in got and "key_hash" not in got and got["prefix"] == plaintext[:8]
        listed = (await admin(app, "GET", "/keys")).body
        assert plaintext.encode() not in listed and b"key_hash" not in listed
        # revoke: refused at once in this worker (its key cache entry is dropped)
        revoked = await admin(app, "DELETE", f"/keys/{created['id']}")
        assert revoked.status == 200 and revoked.json()["status"] == "revoked"
        refused = await call(app, "POST", "/v1/chat/completions", headers=auth, json=CHAT)
        assert_error(refused, 401, "invalid_api_key")
        assert_error(await admin(app, "DELETE", "/keys/key_nope"), 404)

    run(scenario)


def test_patch_blocks_and_unblocks_a_key_and_changes_its_limits() -> None:
    async def scenario(app: GandalfApp) -> None:
        created = (await admin(app, "POST", "/keys", json={"name": "p"})).json()
        auth = [("authorization", f"Bearer {created['key']}")]
        assert (
            await call(app, "POST", "/v1/chat/completions", headers=auth, json=CHAT)
        ).status == 200
        path = f"/keys/{created['id']}"
        reply = await admin(app, "PATCH", path, json={"blocked": True})
        assert reply.status == 200 and reply.json()["status"] == "blocked"
        refused = await call(app, "POST", "/v1/chat/completions", headers=auth, json=CHAT)
        assert_error(refused, 401, "invalid_api_key")
        reply = await admin(app, "PATCH", path, json={"blocked": False, "rpm": 7, "tpm": 9000})
        assert reply.json()["status"] == "active"
        assert (
            await call(app, "POST", "/v1/chat/completions", headers=auth, json=CHAT)
        ).status == 200
        reply = await admin(
            app,
            "PATCH",
            path,
            json={"budget_usd": 3.5, "allowed_models": ["fake-model"], "expires_at": 4e9},
        )
        key = reply.json()
        assert key["rpm"] == 7 and key["tpm"] == 9000 and key["expires_at"] == 4e9
        assert key["budget"] == {"usd": 3.5, "period": "monthly"}
        assert key["allowed_models"] == ["fake-model"]
        key = (await admin(app, "PATCH", path, json={"budget_period": "daily"})).json()
        assert key["budget"] == {"usd": 3.5, "period": "daily"}
        key = (
            await admin(app, "PATCH", path, json={"budget_usd": None, "expires_at": None})
        ).json()
        assert key["budget"] is None and key["expires_at"] is None and key["rpm"] == 7
        assert_error(await admin(app, "PATCH", path, json={"expires_at": 1.0}), 400)
        assert_error(await admin(app, "PATCH", "/keys/key_nope", json={"rpm": 1}), 404)
        await admin(app, "DELETE", path)
        assert_error(await admin(app, "PATCH", path, json={"rpm": 1}), 409, "conflict")

    run(scenario)


def test_a_config_key_can_be_blocked_but_its_limits_belong_to_the_file() -> None:
    async def scenario(app: GandalfApp) -> None:
        keys = (await admin(app, "GET", "/keys")).json()["data"]
        member = next(k for k in keys if k["name"] == "member")
        assert member["source"] == "config"
        error = assert_error(
            await admin(app, "PATCH", f"/keys/{member['id']}", json={"rpm": 10}), 409, "conflict"
        )
        assert "/etc/gandalf/gandalf.yaml" in error["message"]
        reply = await admin(app, "PATCH", f"/keys/{member['id']}", json={"blocked": True})
        assert reply.status == 200
        refused = await call(
            app,
            "POST",
            "/v1/chat/completions",
            headers=[("authorization", f"Bearer {MEMBER}")],
            json=CHAT,
        )
        assert_error(refused, 401)

    run(scenario)


def test_a_config_key_stays_blocked_or_revoked_across_restarts(tmp_path: Any) -> None:
    db = str(tmp_path / "g.db")

    async def main() -> None:
        app = create_app(make_config(db), access_log=False)
        await app.startup()
        try:
            keys = (await admin(app, "GET", "/keys")).json()["data"]
            member = next(k for k in keys if k["name"] == "member")
            await admin(app, "PATCH", f"/keys/{member['id']}", json={"blocked": True})
        finally:
            await app.shutdown()
        app = create_app(make_config(db), access_log=False)
        await app.startup()
        try:
            got = (await admin(app, "GET", f"/keys/{member['id']}")).json()
            assert got["blocked"] is True
            viewer = next(k for k in keys if k["name"] == "viewer")
            assert (await admin(app, "DELETE", f"/keys/{viewer['id']}")).status == 200
        finally:
            await app.shutdown()
        app = create_app(make_config(db), access_log=False)
        await app.startup()
        try:
            # still in the file, still revoked: a revocation is never undone by a restart
            got = (await admin(app, "GET", f"/keys/{viewer['id']}")).json()
            assert got["status"] == "revoked"
            assert_error(await admin(app, "GET", "/keys", VIEWER), 401)
        finally:
            await app.shutdown()

    asyncio.run(main())


def test_key_creation_checks_the_team_and_org() -> None:
    async def scenario(app: GandalfApp) -> None:
        error = assert_error(
            await admin(app, "POST", "/keys", json={"name": "a", "team": "x"}), 400
        )
        assert error["param"] == "team"
        body = {"name": "a", "team": "backend", "org": "default"}
        assert assert_error(await admin(app, "POST", "/keys", json=body), 400)["param"] == "team"
        # A typo must not make a new tenant with no limits.
        typo_org = {"name": "a", "org": "acmee"}
        error = assert_error(await admin(app, "POST", "/keys", json=typo_org), 400)
        assert error["param"] == "org" and "acmee" in error["message"]
        assert (await admin(app, "GET", "/orgs/acmee")).status == 404
        named = {"name": "a", "org": "default"}
        assert (await admin(app, "POST", "/keys", json=named)).status == 201
        typo = {"name": "a", "allowed_models": ["fake-model", "fake-modle"]}
        error = assert_error(await admin(app, "POST", "/keys", json=typo), 400)
        assert error["param"] == "allowed_models[1]"
        globbed = {"name": "g", "allowed_models": ["fake-*"]}
        assert (await admin(app, "POST", "/keys", json=globbed)).status == 201
        assert_error(
            await admin(
                app, "POST", "/keys", json={**globbed, "name": "h", "allowed_models": ["gpt-*"]}
            ),
            400,
        )
        assert (await admin(app, "POST", "/keys", json={"name": "dup"})).status == 201
        assert_error(await admin(app, "POST", "/keys", json={"name": "dup"}), 409, "conflict")

    run(scenario)


def test_keys_are_paginated_and_filtered() -> None:
    async def scenario(app: GandalfApp) -> None:
        for i in range(5):
            await admin(app, "POST", "/keys", json={"name": f"k{i}", "org": "acme"})
        page = (await admin(app, "GET", "/keys", query="org=acme&limit=2")).json()
        assert [k["name"] for k in page["data"]] == ["k0", "k1"] and page["has_more"] is True
        page = (await admin(app, "GET", "/keys", query="org=acme&limit=2&offset=4")).json()
        assert [k["name"] for k in page["data"]] == ["k4"] and page["has_more"] is False
        page = (await admin(app, "GET", "/keys", query="team=backend")).json()
        assert page["data"] == []

    run(scenario)


# --------------------------------------------------------------------------- orgs, teams


def test_orgs_and_teams_made_over_http_and_config_ones_read_only() -> None:
    async def scenario(app: GandalfApp) -> None:
        reply = await admin(app, "POST", "/orgs", json={"id": "beta", "rpm": 10, "budget_usd": 5})
        assert reply.status == 201
        org = reply.json()
        assert org["source"] == "api" and org["read_only"] is False and org["name"] == "beta"
        assert_error(await admin(app, "POST", "/orgs", json={"id": "beta"}), 409)
        reply = await admin(app, "POST", "/teams", json={"id": "ops", "org": "beta"})
        assert reply.status == 201 and reply.json()["org"] == "beta"
        assert_error(await admin(app, "POST", "/teams", json={"id": "t", "org": "none"}), 400)
        teams = (await admin(app, "GET", "/teams", query="org=beta")).json()["data"]
        assert [t["id"] for t in teams] == ["ops"]
        assert (await admin(app, "GET", "/orgs/beta")).json()["rpm"] == 10
        # in use: a team belongs to it
        assert_error(await admin(app, "DELETE", "/orgs/beta"), 409, "conflict")
        key = (await admin(app, "POST", "/keys", json={"name": "k", "team": "ops"})).json()
        assert key["org"] == "beta"
        assert_error(await admin(app, "DELETE", "/teams/ops"), 409)
        await admin(app, "DELETE", f"/keys/{key['id']}")
        assert (await admin(app, "DELETE", "/teams/ops")).status == 200
        assert (await admin(app, "DELETE", "/orgs/beta")).status == 200
        assert_error(await admin(app, "GET", "/orgs/beta"), 404)
        # config-declared: read-only
        acme = (await admin(app, "GET", "/orgs/acme")).json()
        assert acme["source"] == "config" and acme["read_only"] is True
        error = assert_error(await admin(app, "DELETE", "/orgs/acme"), 409)
        assert "gandalf.yaml" in error["message"]
        assert_error(await admin(app, "DELETE", "/teams/backend"), 409)
        assert_error(await admin(app, "DELETE", "/orgs/default"), 409)

    run(scenario)


def test_org_and_team_patch_apply_at_once_and_config_ones_are_read_only() -> None:
    async def scenario(app: GandalfApp) -> None:
        await admin(app, "POST", "/orgs", json={"id": "beta"})
        await admin(app, "POST", "/teams", json={"id": "ops", "org": "beta"})
        created = (await admin(app, "POST", "/keys", json={"name": "k", "team": "ops"})).json()
        auth = [("authorization", f"Bearer {created['key']}")]
        assert (await chat(app, auth)).status == 200
        reply = await admin(app, "PATCH", "/teams/ops", json={"allowed_models": ["other"]})
        assert reply.status == 200 and reply.json()["allowed_models"] == ["other"]
        assert_error(await chat(app, auth), 403, "permission_denied")  # at once
        patch = {"allowed_models": None, "rpm": 5, "name": "Ops", "budget_usd": 2}
        team = (await admin(app, "PATCH", "/teams/ops", json=patch)).json()
        assert team["name"] == "Ops" and team["rpm"] == 5 and team["allowed_models"] is None
        assert team["budget"] == {"usd": 2.0, "period": "monthly"}
        assert (await chat(app, auth)).status == 200
        org = (await admin(app, "PATCH", "/orgs/beta", json={"budget_usd": 0})).json()
        assert org["budget"] == {"usd": 0.0, "period": "monthly"}
        assert_error(await chat(app, auth), 429, "insufficient_quota")  # at once
        org = (await admin(app, "PATCH", "/orgs/beta", json={"budget_usd": None})).json()
        assert org["budget"] is None
        assert (await chat(app, auth)).status == 200
        assert_error(await admin(app, "PATCH", "/orgs/acme", json={"rpm": 1}), 409)
        assert_error(await admin(app, "PATCH", "/teams/backend", json={"rpm": 1}), 409)
        assert_error(await admin(app, "PATCH", "/orgs/none", json={"rpm": 1}), 404)
        assert_error(await admin(app, "PATCH", "/orgs/beta", json={"budget_period": "daily"}), 400)
        assert (await admin(app, "GET", "/teams/ops")).json()["rpm"] == 5

    run(scenario)


def test_a_key_budget_set_over_http_counts_what_the_period_already_spent() -> None:
    async def scenario(app: GandalfApp) -> None:
        created = (await admin(app, "POST", "/keys", json={"name": "spender"})).json()
        auth = [("authorization", f"Bearer {created['key']}")]
        assert (await chat(app, auth)).status == 200
        store = app_store(app)
        store.record_usage(
            UsageRecord("spent", created["id"], "default", "fake-model", "fake-1", "fake",
                        1, 1, 2, 1.0, 200, time.time(), cost_usd=3.0)
        )  # fmt: skip
        await store.flush()
        patch = {"budget_usd": 2.5, "budget_period": "total"}
        assert (await admin(app, "PATCH", f"/keys/{created['id']}", json=patch)).status == 200
        assert_error(await chat(app, auth), 429, "insufficient_quota")

    run(scenario)


# --------------------------------------------------------------------------- routes


def test_routes_made_over_http_serve_and_config_routes_are_read_only() -> None:
    async def scenario(app: GandalfApp) -> None:
        routes = (await admin(app, "GET", "/routes")).json()["data"]
        assert [(r["model_alias"], r["source"], r["read_only"]) for r in routes] == [
            ("fake-model", "config", True)
        ]
        body = {"model_alias": "mine", "targets": [{"provider": "fake", "model": "fake-9"}]}
        reply = await admin(app, "POST", "/routes", json=body)
        assert reply.status == 201 and reply.json()["source"] == "api"
        assert_error(await admin(app, "POST", "/routes", json=body), 409)
        # live in this worker at once
        auth = [("authorization", f"Bearer {ADMIN}")]
        chat = {**CHAT, "model": "mine"}
        served = await call(app, "POST", "/v1/chat/completions", headers=auth, json=chat)
        assert served.status == 200, served.body
        put = {"targets": [{"provider": "fake", "model": "fake-8"}], "strategy": "weighted"}
        reply = await admin(app, "PUT", "/routes/mine", json=put)
        assert reply.json()["strategy"] == "weighted"
        bad = {"targets": [{"provider": "nope", "model": "m"}]}
        error = assert_error(await admin(app, "PUT", "/routes/mine", json=bad), 400)
        assert error["param"] == "targets[0].provider"
        assert_error(await admin(app, "PUT", "/routes/mine", json={"targets": []}), 400)
        bad_strategy = {**put, "strategy": "random"}
        assert_error(await admin(app, "PUT", "/routes/mine", json=bad_strategy), 400)
        # config route: read-only, naming the file
        error = assert_error(await admin(app, "PUT", "/routes/fake-model", json=put), 409)
        assert "/etc/gandalf/gandalf.yaml" in error["message"]
        assert_error(await admin(app, "DELETE", "/routes/fake-model"), 409)
        clash = {**body, "model_alias": "fake-model"}
        assert_error(await admin(app, "POST", "/routes", json=clash), 409)
        assert (await admin(app, "DELETE", "/routes/mine")).status == 200
        assert_error(await admin(app, "GET", "/routes/mine"), 404)
        gone = await call(app, "POST", "/v1/chat/completions", headers=auth, json=chat)
        assert_error(gone, 404, "model_not_found")

    run(scenario)


def test_a_route_made_over_http_is_priced_so_budgets_bound_it() -> None:
    """A target no start-up route had gets its price at once: a request that
    cannot fit the key's budget is refused before the upstream call (429),
    not sent upstream unpriced (here the upstream is down: a 502)."""

    async def scenario(app: GandalfApp) -> None:
        key = {"name": "b", "budget_usd": 0.000001, "budget_period": "total"}
        created = (await admin(app, "POST", "/keys", json=key)).json()
        body = {"model_alias": "mini", "targets": [{"provider": "openai", "model": "gpt-4o-mini"}]}
        assert (await admin(app, "POST", "/routes", json=body)).status == 201
        auth = [("authorization", f"Bearer {created['key']}")]
        reply = await call(
            app,
            "POST",
            "/v1/chat/completions",
            headers=auth,
            json={**CHAT, "model": "mini", "max_tokens": 1000},
        )
        assert_error(reply, 429, "insufficient_quota")

    run(scenario)


# --------------------------------------------------------------------------- providers


def test_providers_never_return_a_secret() -> None:
    async def scenario(app: GandalfApp) -> None:
        for path in ("/providers", "/providers/openai", "/providers/health", "/openapi.json"):
            reply = await admin(app, "GET", path)
            assert reply.status == 200
            assert SECRET.encode() not in reply.body
            assert b'"api_key"' not in reply.body
        provider = (await admin(app, "GET", "/providers/openai")).json()
        assert provider["has_api_key"] is True and provider["type"] == "openai"
        assert_error(await admin(app, "GET", "/providers/nope"), 404)

    run(scenario)


def test_provider_health_shows_each_breaker() -> None:
    async def scenario(app: GandalfApp) -> None:
        auth = [("authorization", f"Bearer {ADMIN}")]
        await call(app, "POST", "/v1/chat/completions", headers=auth, json=CHAT)
        rows = (await admin(app, "GET", "/providers/health", VIEWER)).json()["data"]
        fake = next(r for r in rows if r["provider"] == "fake")
        assert fake["state"] == "closed" and fake["samples"] >= 1
        assert fake["latency_ms"] is None  # a priority route does not track latency

    run(scenario)


# --------------------------------------------------------------------------- usage


def test_usage_group_by_bucket_since_until_and_pages() -> None:
    async def scenario(app: GandalfApp) -> None:
        hour = 3600.0
        base = (time.time() // 86400 - 2) * 86400  # two days ago, midnight UTC
        records = [
            UsageRecord(f"r{i}", key, "default", "fake-model", "fake-1", "fake",
                        10, 5, 15, 1.0, 200, base + offset, cost_usd=0.5)
            for i, (key, offset) in enumerate(
                [("k1", 0.0), ("k1", 10.0), ("k2", hour + 1), ("k1", 86400.0 + 5)]
            )
        ]  # fmt: skip
        sink = app_store(app)
        for r in records:
            sink.record_usage(r)
        await sink.flush()
        since = str(int(base))
        q = f"since={since}&group_by=key"
        rows = (await admin(app, "GET", "/usage", VIEWER, query=q)).json()
        assert [(r["group"], r["requests"]) for r in rows["data"]] == [("k1", 3), ("k2", 1)]
        assert rows["since"] == base and rows["data"][0]["bucket"] is None
        q = f"since={since}&group_by=key&bucket=hour"
        rows = (await admin(app, "GET", "/usage", query=q)).json()["data"]
        assert [(r["bucket"], r["group"], r["requests"]) for r in rows] == [
            (base, "k1", 2),
            (base + hour, "k2", 1),
            (base + 86400, "k1", 1),
        ]
        q = f"since={since}&bucket=day"
        rows = (await admin(app, "GET", "/usage", query=q)).json()["data"]
        assert [(r["bucket"], r["group"], r["requests"]) for r in rows] == [
            (base, None, 3),
            (base + 86400, None, 1),
        ]
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(base + 86400))
        q = f"since={since}&until={until}"
        total = (await admin(app, "GET", "/usage", query=q)).json()["data"]
        assert [(r["requests"], r["cost_usd"]) for r in total] == [(3, 1.5)]
        q = f"since={since}&group_by=key&bucket=hour&limit=2&offset=1"
        page = (await admin(app, "GET", "/usage", query=q)).json()
        assert [r["requests"] for r in page["data"]] == [1, 1] and page["has_more"] is False
        q = f"since={since}&group_by=key&bucket=hour&limit=1"
        assert (await admin(app, "GET", "/usage", query=q)).json()["has_more"] is True
        assert_error(await admin(app, "GET", "/usage", query="since=1d&until=2d"), 400)

    run(scenario)


def test_usage_group_by_route_is_the_alias_asked_for() -> None:
    """Two routes answered by the same upstream model: per model they are one
    group, per route two (and a request that reached no target still has its
    route); hour buckets per route come from the same rollups."""

    async def scenario(app: GandalfApp) -> None:
        base = (time.time() // 86400 - 1) * 86400  # yesterday, midnight UTC
        asked = [("fast", "gpt-x", 0.0), ("smart", "gpt-x", 60.0), ("smart", "gpt-x", 4000.0),
                 ("smart", None, 4100.0)]  # fmt: skip
        sink = app_store(app)
        for i, (alias, model, offset) in enumerate(asked):
            sink.record_usage(
                UsageRecord(f"r{i}", "k1", "default", alias, model, "fake",
                            10, 5, 15, 1.0, 200 if model else 502, base + offset, cost_usd=0.5)
            )  # fmt: skip
        await sink.flush()
        q = f"since={int(base)}&group_by=route"
        rows = (await admin(app, "GET", "/usage", VIEWER, query=q)).json()
        assert rows["group_by"] == "route"
        assert [(r["group"], r["requests"], r["errors"]) for r in rows["data"]] == [
            ("smart", 3, 1),
            ("fast", 1, 0),
        ]
        q = f"since={int(base)}&group_by=model"
        rows = (await admin(app, "GET", "/usage", VIEWER, query=q)).json()
        assert [(r["group"], r["requests"]) for r in rows["data"]] == [("gpt-x", 3), ("smart", 1)]
        q = f"since={int(base)}&group_by=route&bucket=hour"
        rows = (await admin(app, "GET", "/usage", VIEWER, query=q)).json()
        assert [(r["bucket"], r["group"], r["requests"]) for r in rows["data"]] == [
            (base, "fast", 1),
            (base, "smart", 1),
            (base + 3600, "smart", 2),
        ]

    run(scenario)


def app_store(app: GandalfApp) -> Any:
    """The worker's store, found through the admin services (tests only)."""
    runtime = app.core._runtime
    assert runtime is not None
    for prefix, endpoint in runtime.prefixes:
        if prefix == "/admin/v1/":
            handler = next(iter(endpoint.methods.values()))
            starlette = handler.app  # type: ignore[attr-defined]
            for route in starlette.routes:
                endpoint_fn = getattr(route, "endpoint", None)
                owner = getattr(endpoint_fn, "__self__", None)
                if owner is not None:
                    return next(iter(owner.methods.values())).services.store
    raise AssertionError("no admin mount")


# --------------------------------------------------------------------------- audit, cache


def test_every_write_is_audited_with_who_what_and_refusals_too() -> None:
    async def scenario(app: GandalfApp) -> None:
        created = (await admin(app, "POST", "/keys", json={"name": "audited"})).json()
        await admin(app, "PATCH", f"/keys/{created['id']}", json={"rpm": 3})
        await admin(app, "DELETE", "/routes/fake-model")  # refused: 409
        await admin(app, "POST", "/orgs", VIEWER, json={"id": "v"})  # refused: 403
        rows = (await admin(app, "GET", "/audit", VIEWER)).json()["data"]
        keys = (await admin(app, "GET", "/keys")).json()["data"]
        admin_id = next(k["id"] for k in keys if k["name"] == "admin")
        viewer_id = next(k["id"] for k in keys if k["name"] == "viewer")
        seen = [
            (r["actor"], r["action"], r["resource"], r["resource_id"], r["status"]) for r in rows
        ]
        assert seen == [
            (viewer_id, "create", "orgs", None, 403),
            (admin_id, "delete", "routes", "fake-model", 409),
            (admin_id, "update", "keys", created["id"], 200),
            (admin_id, "create", "keys", created["id"], 201),
        ]
        assert rows[2]["detail"] == {"request": {"rpm": 3}}
        assert rows[0]["detail"]["error"]
        # the plaintext never reaches the audit log
        everything = (await admin(app, "GET", "/audit", query="limit=1000")).body
        assert created["key"].encode() not in everything
        page = (await admin(app, "GET", "/audit", query="limit=1&offset=1")).json()
        assert len(page["data"]) == 1 and page["has_more"] is True
        assert page["data"][0]["status"] == 409
        assert all(r["ts"] > 0 for r in rows)

    run(scenario)


def test_cache_purge_empties_the_workers_response_cache() -> None:
    cache = InProcessCache(100, 1 << 20)

    async def with_cache(app: GandalfApp) -> None:
        for key in (b"a", b"b"):
            await cache.put(key, CachedAnswer(b"{}", Usage(), "fake", "fake-1"), 60.0)
        assert_error(await admin(app, "POST", "/cache/purge", VIEWER), 403)
        reply = await admin(app, "POST", "/cache/purge")
        assert reply.status == 200 and reply.json() == {"purged": 2}
        assert await cache.get(b"a") is None and await cache.get(b"b") is None

    run(with_cache, cache)

    async def without(app: GandalfApp) -> None:
        assert (await admin(app, "POST", "/cache/purge")).json() == {"purged": 0}

    run(without)


def test_the_admin_api_answers_through_the_rsgi_adapter() -> None:
    async def scenario(app: GandalfApp) -> None:
        rsgi = RSGIApp(app)
        auth = [("authorization", f"Bearer {ADMIN}")]
        reply = await rsgi_call(rsgi, "POST", "/admin/v1/keys", headers=auth, json={"name": "r"})
        assert reply.status == 201, reply.body
        assert reply.json()["key"].startswith("gnd_")
        reply = await rsgi_call(rsgi, "GET", "/admin/v1/keys", headers=auth, query="limit=1")
        assert reply.status == 200 and len(reply.json()["data"]) == 1
        reply = await rsgi_call(rsgi, "GET", "/admin/v1/nope", headers=auth)
        assert_error(reply, 404, "not_found")
        reply = await rsgi_call(rsgi, "GET", "/admin/v1/keys")
        assert_error(reply, 401, "invalid_api_key")

    run(scenario)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_admin_v1_without_a_slash_is_a_404(method: str) -> None:
    async def scenario(app: GandalfApp) -> None:
        assert_error(await call(app, method, "/admin/v1"), 404)

    run(scenario)


def test_a_create_that_loses_a_race_is_a_409_not_a_500() -> None:
    """Two creates of one id: the second passes the existence check, then the
    store's constraint refuses it (CannotCreate): a 409 conflict."""
    from gandalf.admin.app import create_admin_app
    from gandalf.admin.resources import Services
    from gandalf.app.keys import KeyManager
    from gandalf.domain import ApiKey, Identity
    from gandalf.server.types import Receive, Scope, Send
    from gandalf.storage.sqlite import CannotCreate, SqliteStore

    class Racing(SqliteStore):
        async def get_org(self, org_id: str) -> Organization | None:
            return None  # the other create has not committed yet

        async def create_org(self, org: Organization) -> None:
            raise CannotCreate(f"cannot create organization {org.id!r}: UNIQUE constraint")

    async def main() -> None:
        store = Racing(":memory:")
        await store.open()
        try:
            app = create_admin_app(Services(store, KeyManager(store)))
            key = ApiKey(id="key_a", name="a", key_hash="h", prefix="gnd_", role="admin")
            identity = Identity.from_key(key)

            async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
                scope["state"] = {"identity": identity}
                await app(scope, receive, send)

            reply = await call(asgi, "POST", "/admin/v1/orgs", json={"id": "x"})
            assert_error(reply, 409, "conflict")
            assert "UNIQUE" in reply.json()["error"]["message"]
        finally:
            await store.close()

    asyncio.run(main())


def test_a_route_alias_in_the_path_follows_the_bodys_rules() -> None:
    # PUT takes the alias from the path: control characters (which would reach
    # logs and metric labels) and overlong aliases are refused as in a POST body.
    async def scenario(app: GandalfApp) -> None:
        body = {"targets": [{"provider": "fake", "model": "fake-1"}]}
        for alias in ("\x1b[31m", "a" * 201):
            reply = await admin(app, "PUT", f"/routes/{alias}", json=body)
            assert_error(reply, 400)
            assert reply.json()["error"]["param"] == "model_alias"
        assert (await admin(app, "PUT", "/routes/fine", json=body)).status == 200

    run(scenario)
