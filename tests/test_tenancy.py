"""Tenancy: ``limits``/``orgs``/``teams`` config, the allowed-models chain, Identity.scopes."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from gandalf import bootstrap
from gandalf.app.keys import KeyManager
from gandalf.auth.apikey import KeyCache, hash_key
from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry, Limits, parse_config
from gandalf.domain import (
    ApiKey,
    Budget,
    Identity,
    Organization,
    ProviderConfig,
    Route,
    Scope,
    Target,
    Team,
    Tenancy,
    allowed_chain,
)
from gandalf.errors import ConfigError
from gandalf.storage.protocol import StorageError, TenantInUse
from gandalf.wiring import create_app, load_tenancy
from tests.asgi_client import Reply, call
from tests.serve import GandalfServer, render_config, route, wait_until
from tests.stores import make_store

KEY = "gnd_" + "k" * 43
KEY_B = "gnd_" + "b" * 43

CONTRACT = """\
providers: [{ name: fake, type: fake }]
routes:
  - { model_alias: gpt-4o, targets: [{ provider: fake, model: m }] }
  - { model_alias: claude-3-opus, targets: [{ provider: fake, model: m }] }
limits:   { rpm: 0, tpm: 0 }           # default per key; 0 = unlimited
orgs:
  - { id: acme, name: Acme, allowed_models: [gpt-4o, "claude-*"], rpm: 1000, tpm: 200000,
      budget: { usd: 500, period: monthly } }     # period: daily | weekly | monthly | total
teams:
  - { id: backend, org: acme, tpm: 50000, budget: { usd: 100, period: monthly } }
keys:
  - { name: svc, key: "${SVC_KEY}", role: service_account, org: acme, team: backend, rpm: 100,
      budget: { usd: 10, period: daily }, allowed_models: [gpt-4o] }
"""


def parse(text: str) -> GandalfConfig:
    return parse_config(text, source="g.yaml", env={"SVC_KEY": KEY})


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message and KEY not in message
    return message


# ---------------------------------------------------------------------------- config


def test_the_contract_example_is_accepted_as_written() -> None:
    cfg = parse(CONTRACT)
    assert cfg.limits == Limits(rpm=0, tpm=0)
    assert cfg.orgs == (
        Organization(
            id="acme",
            name="Acme",
            allowed_models=("gpt-4o", "claude-*"),
            rpm=1000,
            tpm=200000,
            budget=Budget(usd=500, period="monthly"),
            source="config",
        ),
    )
    assert cfg.teams == (
        Team(
            id="backend",
            org_id="acme",
            name="backend",
            tpm=50000,
            budget=Budget(usd=100, period="monthly"),
            source="config",
        ),
    )
    (key,) = cfg.keys
    assert (key.org_id, key.team_id, key.rpm, key.tpm) == ("acme", "backend", 100, 0)
    assert key.budget == Budget(usd=10, period="daily")
    assert key.allowed_models == ("gpt-4o",)
    assert cfg.warnings == ()


def test_a_key_naming_only_a_team_is_in_the_teams_org() -> None:
    cfg = parse(CONTRACT.replace("org: acme, team: backend", "team: backend"))
    assert (cfg.keys[0].org_id, cfg.keys[0].team_id) == ("acme", "backend")


def test_org_id_and_team_id_stay_accepted_as_synonyms() -> None:
    cfg = parse(CONTRACT.replace("org: acme, team: backend", "org_id: acme, team_id: backend"))
    assert (cfg.keys[0].org_id, cfg.keys[0].team_id) == ("acme", "backend")
    same = parse(CONTRACT.replace("account, org: acme,", "account, org: acme, org_id: acme,"))
    assert same.keys[0].org_id == "acme"


def test_the_default_org_always_exists() -> None:
    cfg = parse(
        "teams: [{ id: ops }]\n"
        f"keys: [{{ name: a, key: {KEY}, org: default }}, {{ name: b, key: {KEY_B}, team: ops }}]\n"
    )
    assert [(k.org_id, k.team_id) for k in cfg.keys] == [("default", None), ("default", "ops")]
    assert cfg.teams[0].org_id == "default"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "org: acme, team",
            "org: acme, org_id: other, team",
            "g.yaml: keys[0].org_id: 'other' differs from org 'acme'",
        ),
        ("team: backend, rpm", "team: nope, rpm", "g.yaml: keys[0].team: unknown team 'nope'"),
        ("org: acme, team: backend", "org: nope", "g.yaml: keys[0].org: unknown org 'nope'"),
        (
            "org: acme, team: backend",
            "org: default, team: backend",
            "g.yaml: keys[0].team: team 'backend' belongs to org 'acme', not 'default'",
        ),
        ("{ id: backend, org: acme", "{ id: backend, org: zz", "g.yaml: teams[0].org: unknown org"),
        ("rpm: 1000", "rpm: -1", "g.yaml: orgs[0].rpm: expected integer >= 0"),
        ("tpm: 50000", "tpm: -5", "g.yaml: teams[0].tpm: expected integer >= 0"),
        ("rpm: 100,", "rpm: -100,", "g.yaml: keys[0].rpm: expected integer >= 0"),
        ("limits:   { rpm: 0", "limits:   { rpm: -1", "g.yaml: limits.rpm: expected integer >= 0"),
        ("usd: 10,", "usd: -10,", "g.yaml: keys[0].budget.usd: expected number >= 0"),
        ("usd: 500", "usd: .inf", "g.yaml: orgs[0].budget.usd: expected a finite number"),
        (
            "period: daily }",
            "period: hourly }",
            "g.yaml: keys[0].budget.period: expected one of daily, weekly, monthly, total, "
            "got 'hourly'",
        ),
        ("{ usd: 500, period", "{ usd: 500, perod", "g.yaml: orgs[0].budget.perod: unknown key"),
        ("teams:\n", "teams:\n  - { id: backend }\n", "g.yaml: teams[1].id: duplicate id"),
        ("teams:\n", "teams:\n  - { id: '' }\n", "g.yaml: teams[0].id: must not be empty"),
        ("orgs:\n", "orgs:\n  - { id: acme }\n", "g.yaml: orgs[1].id: duplicate id 'acme'"),
        (
            "allowed_models: [gpt-4o]",
            "allowed_models: ['']",
            "g.yaml: keys[0].allowed_models[0]: must",
        ),
    ],
)
def test_refused_with_one_line_naming_the_path(old: str, new: str, expected: str) -> None:
    text = CONTRACT.replace(old, new, 1)
    assert text != CONTRACT
    assert refused(text).startswith(expected)


def test_a_glob_matching_no_route_warns_and_a_matching_one_does_not() -> None:
    cfg = parse(CONTRACT.replace('"claude-*"', '"gemini-*"'))
    assert cfg.warnings == (
        "g.yaml: orgs[0].allowed_models: no route has a model alias matching 'gemini-*'",
    )
    assert parse(CONTRACT).warnings == ()


# ---------------------------------------------------------------------------- the chain


def key(**kw: object) -> ApiKey:
    fields: dict[str, object] = {"id": "k1", "name": "k", "key_hash": hash_key(KEY), "prefix": "p"}
    fields.update(kw)
    return ApiKey(**fields)  # type: ignore[arg-type]


def acme(org_models: tuple[str, ...] | None, team_models: tuple[str, ...] | None = None) -> Tenancy:
    return Tenancy(
        [Organization(id="acme", name="Acme", allowed_models=org_models)],
        [Team(id="backend", org_id="acme", name="b", allowed_models=team_models)],
    )


def test_a_model_the_key_allows_but_the_org_does_not_is_refused() -> None:
    identity = Identity.from_key(
        key(org_id="acme", allowed_models=("gpt-4o",)), acme(("claude-*",))
    )
    assert not identity.may_use("gpt-4o")
    assert not identity.may_use("claude-3-opus")


def test_no_restriction_anywhere_allows_everything_with_one_attribute_test() -> None:
    identity = Identity.from_key(key(org_id="acme", team_id="backend"), acme(None))
    assert identity.allowed_models is None and identity.model_pattern is None
    assert identity.may_use("anything") and identity.may_use("claude-*")


def test_globs_narrow_the_chain_level_by_level() -> None:
    tenancy = acme(("gpt-4o", "claude-*"), ("claude-3*",))
    identity = Identity.from_key(key(org_id="acme", team_id="backend"), tenancy)
    assert identity.may_use("claude-3-opus") and identity.may_use("claude-3")
    assert not identity.may_use("claude-2") and not identity.may_use("gpt-4o")
    assert not identity.may_use("xclaude-3") and not identity.may_use("CLAUDE-3-opus")
    # The key narrows further with a literal: the allowed set is exactly its literals.
    narrow = Identity.from_key(
        key(org_id="acme", team_id="backend", allowed_models=("claude-3-haiku", "gpt-4o")), tenancy
    )
    assert narrow.allowed_models == frozenset({"claude-3-haiku"}) and narrow.model_pattern is None
    assert narrow.may_use("claude-3-haiku") and not narrow.may_use("claude-3-opus")


def test_glob_metacharacters_in_an_exact_alias() -> None:
    identity = Identity.from_key(key(allowed_models=("fast[beta]", "model?", "a*")))
    # An alias spelled exactly like an entry is allowed, though the entry is a glob...
    assert identity.may_use("fast[beta]") and identity.may_use("model?")
    assert identity.may_use("a*") and identity.may_use("abc")
    # ... and the glob reading holds too: [beta] is one of b, e, t, a.
    assert identity.may_use("fastb") and identity.may_use("model2")
    assert not identity.may_use("fast[beta]x") and not identity.may_use("fastbeta")
    exact = Identity.from_key(key(allowed_models=("gpt-4o",)))
    assert exact.allowed_models == frozenset({"gpt-4o"}) and exact.model_pattern is None


def test_allowed_chain_shapes() -> None:
    assert allowed_chain([None, None, None]) == (None, None)
    assert allowed_chain([(), None, ("a*",)]) == (frozenset(), None)
    exact, pattern = allowed_chain([("a*", "b"), None, ("ab*", "b")])
    assert exact == frozenset({"ab*", "b"}) and pattern is not None
    assert pattern.match("abc") and not pattern.match("ac") and not pattern.match("b2")


# ---------------------------------------------------------------------------- scopes


def test_a_key_without_any_limit_has_no_scopes() -> None:
    assert Identity.from_key(key()).scopes == ()
    assert Identity.from_key(key(org_id="acme", team_id="backend"), acme(None)).scopes == ()


def test_scopes_are_key_team_org_with_the_default_per_key() -> None:
    daily = Budget(usd=10, period="daily")
    tenancy = Tenancy(
        [Organization(id="acme", name="Acme", rpm=1000, budget=Budget(usd=500))],
        [Team(id="backend", org_id="acme", name="b", tpm=50000)],
        rpm=60,
        tpm=1000,
    )
    identity = Identity.from_key(
        key(org_id="acme", team_id="backend", tpm=5, budget=daily), tenancy
    )
    assert identity.scopes == (
        Scope(kind="key", id="k1", name="k", rpm=60, tpm=5, budget=daily),  # rpm: limits:
        Scope(kind="team", id="backend", name="b", tpm=50000),
        Scope(kind="org", id="acme", name="Acme", rpm=1000, budget=Budget(usd=500)),
    )
    # The default alone makes a key scope; an unlimited org/team adds none.
    plain = Identity.from_key(key(), Tenancy(rpm=60))
    assert plain.scopes == (Scope(kind="key", id="k1", name="k", rpm=60),)


# ---------------------------------------------------------------------------- the key cache


class Lookup:
    def __init__(self, *keys: ApiKey) -> None:
        self.keys = {k.key_hash: k for k in keys}

    async def get_key_by_hash(self, key_hash: str) -> ApiKey | None:
        return self.keys.get(key_hash)


def test_the_cache_builds_identities_against_its_tenancy_and_a_reload_rebuilds_them() -> None:
    stored = key(org_id="acme", allowed_models=("gpt-4o",))
    cache = KeyCache(Lookup(stored), tenancy=acme(None))

    async def scenario() -> None:
        first = await cache.load(KEY)
        assert first.may_use("gpt-4o") and first.scopes == ()
        assert cache.cached(KEY) is first
        cache.set_tenancy(
            Tenancy([Organization(id="acme", name="A", allowed_models=("claude-*",), rpm=7)])
        )
        assert cache.cached(KEY) is None  # dropped: the new limits apply at once
        second = await cache.load(KEY)
        assert not second.may_use("gpt-4o")
        assert second.scopes == (Scope(kind="org", id="acme", name="A", rpm=7),)

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- over HTTP

GLOBBED = "gnd_" + "g" * 43


def tenancy_config() -> GandalfConfig:
    fake = (Target(provider="fake", model="fake-1"),)
    return GandalfConfig(
        database=DatabaseConfig(dsn=":memory:"),
        providers=(ProviderConfig(name="fake", type="fake"),),
        routes=(
            Route(model_alias="gpt-4o", targets=fake),
            Route(model_alias="claude-3-opus", targets=fake),
            Route(model_alias="claude-3-haiku", targets=fake),
        ),
        orgs=(Organization(id="acme", name="Acme", allowed_models=("gpt-4o", "claude-*"), rpm=9),),
        teams=(Team(id="backend", org_id="acme", name="B", allowed_models=("claude-3-o*",)),),
        keys=(KeyEntry(name="svc", key=GLOBBED, org_id="acme", team_id="backend"),),
    )


def test_a_model_refused_by_a_glob_is_403_and_unlisted_over_http() -> None:
    async def scenario() -> None:
        app = create_app(tenancy_config(), access_log=False)
        await app.startup()
        try:
            headers = [("authorization", f"Bearer {GLOBBED}")]

            async def chat(model: str) -> Reply:
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                return await call(app, "POST", "/v1/chat/completions", headers=headers, json=body)

            refused = await chat("claude-3-haiku")  # the org allows it; the team does not
            assert refused.status == 403, refused.body
            error = refused.json()["error"]
            assert (error["type"], error["code"], error["param"]) == (
                "permission_denied",
                "permission_denied",
                "model",
            )
            assert "claude-3-haiku" in error["message"]
            assert (await chat("gpt-4o")).status == 403  # the team's glob refuses it
            assert (await chat("claude-3-opus")).status == 200
            listed = await call(app, "GET", "/v1/models", headers=headers)
            assert [m["id"] for m in listed.json()["data"]] == ["claude-3-opus"]
        finally:
            await app.shutdown()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- store and reconcile


def test_orgs_and_teams_keep_their_limits_and_refuse_deletion_while_keys_live(
    store_dsn: str,
) -> None:
    async def scenario() -> None:
        store = make_store(store_dsn)
        await store.open()
        try:
            org = Organization(
                id="acme", name="Acme", allowed_models=("gpt-*",), rpm=5, tpm=6,
                budget=Budget(usd=1.5, period="weekly"), created_at=1.0,
            )  # fmt: skip
            team = Team(id="red", org_id="acme", name="Red", tpm=7, created_at=2.0)
            await store.create_org(org)
            await store.create_team(team)
            assert await store.get_org("acme") == org and await store.list_teams() == [team]
            with pytest.raises(StorageError, match="organization 'acme'"):
                await store.create_org(org)
            limited = ApiKey(
                id="k1", name="k", key_hash="h1", prefix="p", org_id="acme", team_id="red",
                rpm=3, tpm=4, budget=Budget(usd=2, period="daily"),
            )  # fmt: skip
            await store.create_key(limited)
            assert await store.get_key("k1") == msgspec.structs.replace(
                limited, created_at=(await store.get_key("k1") or limited).created_at
            )
            with pytest.raises(TenantInUse, match="team 'red' still has 1 live key"):
                await store.delete_team("red")
            with pytest.raises(TenantInUse, match="1 live key\\(s\\) and 1 team"):
                await store.delete_org("acme")
            await store.revoke_key("k1")
            assert await store.delete_team("red") and not await store.delete_team("red")
            assert await store.delete_org("acme") and await store.get_org("acme") is None
        finally:
            await store.close()

    asyncio.run(scenario())


def reconciled_config(db: str, orgs: str, teams: str, keys: str) -> GandalfConfig:
    return parse_config(
        f"database: {{dsn: {db}}}\nproviders: [{{name: fake, type: fake}}]\n"
        f"orgs: [{orgs}]\nteams: [{teams}]\nkeys: [{keys}]\n",
        source="g.yaml",
        env={},
    )


def test_reconcile_at_start_and_reload(store_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    db = store_dsn
    budget = "{ usd: 10, period: daily }"
    svc = f"{{ name: svc, key: {KEY}, team: backend, rpm: 100, budget: {budget} }}"
    first = reconciled_config(
        db,
        "{ id: acme, rpm: 1000, allowed_models: ['claude-*'] }, { id: gone }",
        "{ id: backend, org: acme, tpm: 50 }",
        svc,
    )
    # The reload: acme's limits change, the team and its key's limits go, "gone" goes.
    second = reconciled_config(
        db, "{ id: acme, tpm: 5 }", "", f"{{ name: svc, key: {KEY}, org: acme }}"
    )

    async def scenario() -> None:
        store = make_store(db)
        await store.open()
        try:
            await store.create_org(Organization(id="mine", name="Mine", rpm=1))  # the CLI's
            await bootstrap.reconcile(store, first)
            acme = await store.get_org("acme")
            assert acme is not None and acme.source == "config"
            assert (acme.rpm, acme.allowed_models) == (1000, ("claude-*",))
            assert await store.get_org("gone") is not None
            (team,) = await store.list_teams()
            assert (team.id, team.org_id, team.tpm, team.source) == (
                "backend",
                "acme",
                50,
                "config",
            )
            key = await store.get_key_by_hash(hash_key(KEY))
            assert key is not None
            assert (key.org_id, key.team_id, key.rpm) == ("acme", "backend", 100)
            assert key.budget == Budget(usd=10, period="daily")
            identity = Identity.from_key(key, await load_tenancy(store, first))
            assert [s.kind for s in identity.scopes] == ["key", "team", "org"]
            assert not identity.may_use("gpt-4o") and identity.may_use("claude-3")

            await bootstrap.reconcile(store, second)
            acme = await store.get_org("acme")
            assert acme is not None and (acme.rpm, acme.tpm, acme.allowed_models) == (0, 5, None)
            assert await store.get_org("gone") is None and await store.list_teams() == []
            key = await store.get_key_by_hash(hash_key(KEY))
            assert key is not None and (key.team_id, key.rpm, key.budget) == (None, 0, None)
            identity = Identity.from_key(key, await load_tenancy(store, second))
            assert identity.scopes == (Scope(kind="org", id="acme", name="acme", tpm=5),)
            assert identity.may_use("gpt-4o")
            mine = await store.get_org("mine")
            assert mine is not None and (mine.rpm, mine.source) == (1, "cli")  # untouched

            # acme leaves the config while a CLI key still belongs to it: kept as it was.
            await KeyManager(store).create(name="cli-key", org_id="acme")
            with caplog.at_level(logging.WARNING, logger="gandalf"):
                await bootstrap.reconcile(store, reconciled_config(db, "", "", ""))
            kept = await store.get_org("acme")
            assert kept is not None and (kept.tpm, kept.source) == (5, "cli")
            assert "org 'acme' left the config but 1 live key(s)" in caplog.text
        finally:
            await store.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- SIGHUP, end to end


def test_a_sighup_reload_applies_new_org_restrictions_to_cached_keys(tmp_path: Path) -> None:
    def config(org: dict[str, Any]) -> dict[str, Any]:
        return {
            "server": {"access_log": False},
            "providers": [{"name": "fake", "type": "fake"}],
            "routes": [route("gpt-4o", "fake", "f"), route("claude-3", "fake", "f")],
            "orgs": [org],
            "keys": [{"name": "svc", "key": KEY, "org": "acme"}],
        }

    def status(client: httpx.Client, model: str) -> int:
        try:  # a new connection each time: the reload replaces the worker under a kept one
            reply = client.post(
                "/v1/chat/completions",
                headers={"authorization": f"Bearer {KEY}", "connection": "close"},
                json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
            )
        except httpx.TransportError:
            return 0
        return reply.status_code

    first = config({"id": "acme", "allowed_models": ["claude-*"]})
    with (
        GandalfServer(tmp_path, first) as server,
        httpx.Client(base_url=server.url, timeout=10.0) as client,
    ):
        assert server.process is not None
        assert status(client, "claude-3") == 200  # the identity is cached now
        assert status(client, "gpt-4o") == 403
        server.config_path.write_text(render_config(config({"id": "acme"}), server.port, tmp_path))
        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: status(client, "gpt-4o") == 200, 30.0, "the org's models to widen")
        assert "Traceback" not in server.stderr()


def test_an_identity_knows_whether_some_level_sets_a_budget() -> None:
    from gandalf.domain import ApiKey, Budget, Identity

    plain = ApiKey(id="k", name="k", key_hash="h", prefix="gnd_abcd", rpm=5)
    assert Identity.from_key(plain).budgeted is False
    funded = msgspec.structs.replace(plain, budget=Budget(usd=1.0, period="daily"))
    assert Identity.from_key(funded).budgeted is True
