"""The admin web UI in a real headless Chromium (Debian's, driven by Playwright)
against a real ``gandalf serve`` with two workers: log in, see the overview
charts drawn from requests this test made, create a key and see its plaintext
once, edit and revoke it, a viewer sees no write controls and its forced write
is refused, CSV export, a phone-width layout, logout.

Skips with a message when no Chromium is installed (``tests/services.py``);
CI installs one. ``GANDALF_UI_SCREENSHOT=path.png`` writes the overview page's
screenshot there (the README's ``bench/ui-overview.png`` is made this way).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gandalf.auth.apikey import generate_key
from tests.serve import GandalfServer, route, wait_until
from tests.services import chromium_path

playwright_sync = pytest.importorskip("playwright.sync_api")

ADMIN = generate_key()
VIEWER = generate_key()
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hello there"}]}
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GandalfServer]:
    tmp = tmp_path_factory.mktemp("ui")
    config = {
        # Two workers: a session made by one must work in the other.
        "server": {"access_log": False, "workers": 2},
        "providers": [{"name": "fake", "type": "fake"}],
        "routes": [route("fake-model", "fake", "fake-1")],
        "keys": [
            {"name": "admin", "key": ADMIN, "role": "admin"},
            {"name": "viewer", "key": VIEWER, "role": "viewer"},
        ],
    }
    with GandalfServer(tmp, config) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    with playwright_sync.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def login(page: Any, gateway: GandalfServer, key: str) -> None:
    page.goto(gateway.url + "/ui/")
    assert page.url.endswith("/ui/login"), page.url  # no session yet: the login page
    page.fill("#key", key)
    page.click("#login")
    page.wait_for_url(gateway.url + "/ui/")
    page.wait_for_selector("#who:not(:empty)")


def api(gateway: GandalfServer, key: str = ADMIN) -> httpx.Client:
    return httpx.Client(
        base_url=gateway.url, headers={"authorization": f"Bearer {key}"}, timeout=10.0
    )


def test_overview_charts_draw_the_requests_this_test_made(
    gateway: GandalfServer, page: Any
) -> None:
    # The only test of this module that makes chat requests: the charts must count exactly these.
    made = 3
    with api(gateway) as client:
        for _ in range(made):
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200

        def recorded() -> bool:  # the writer batches: wait for the rows
            reply = client.get("/admin/v1/usage", params={"since": "1h"}).json()
            return bool(reply["data"]) and reply["data"][0]["requests"] == made

        wait_until(recorded, 10.0, "the usage rows of the chat requests")
        tokens = client.get("/admin/v1/usage", params={"since": "1h"}).json()["data"][0]
    login(page, gateway, ADMIN)
    page.wait_for_selector("#chart-requests circle.point")
    points = page.eval_on_selector_all(
        "#chart-requests circle.point", "cs => cs.map(c => Number(c.dataset.value))"
    )
    assert sum(points) == made, points  # one point per hour that has requests
    bucket = page.eval_on_selector("#chart-requests circle.point", "c => Number(c.dataset.bucket)")
    assert (
        bucket == int(time.time()) // 3600 * 3600 or bucket == (int(time.time()) // 3600 - 1) * 3600
    )
    token_points = page.eval_on_selector_all(
        "#chart-tokens circle.point", "cs => cs.map(c => Number(c.dataset.value))"
    )
    assert sum(token_points) == tokens["prompt_tokens"] + tokens["completion_tokens"] > 0
    # Per route: the alias the requests asked for (its upstream model is fake-1).
    per_route = page.eval_on_selector_all(
        "#chart-routes circle.point",
        "cs => cs.map(c => [c.dataset.series, Number(c.dataset.value)])",
    )
    assert per_route and {s for s, _ in per_route} == {"fake-model"}
    assert sum(v for _, v in per_route) == made
    per_provider = page.eval_on_selector_all(
        "#chart-providers circle.point", "cs => cs.map(c => c.dataset.series)"
    )
    assert set(per_provider) == {"fake"}
    assert page.inner_text(".tiles .tile:first-child .v") == str(made)
    # The session is a cookie the page's script cannot read, and the key is nowhere in the page.
    cookies = page.context.cookies()
    session = [c for c in cookies if c["name"] == "gandalf_session"]
    assert len(session) == 1 and session[0]["httpOnly"] and session[0]["sameSite"] == "Strict"
    assert ADMIN not in session[0]["value"]
    assert page.evaluate("document.cookie") == ""
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    assert ADMIN not in page.content() and ADMIN not in page.url
    shot = os.environ.get("GANDALF_UI_SCREENSHOT")
    if shot:
        page.screenshot(path=shot, full_page=True)


def test_create_a_key_see_it_once_edit_and_revoke_it(gateway: GandalfServer, page: Any) -> None:
    login(page, gateway, ADMIN)
    # The login page of a live session goes back to the console (a link from another
    # site arrives without the SameSite=Strict cookie and lands there).
    page.goto(gateway.url + "/ui/login")
    page.wait_for_url(gateway.url + "/ui/")
    page.click("a[data-page=keys]")
    page.wait_for_selector("#create-key")
    page.fill("#create-key input[name=name]", "browser-key")
    page.fill("#create-key input[name=rpm]", "60")
    page.click("#create-key button[type=submit]")
    secret = page.inner_text("#new-key-secret").strip()
    assert secret.startswith("gnd_")
    with api(gateway, secret) as user:
        assert user.get("/v1/models").status_code == 200  # the shown plaintext is the real key
    row = page.locator("#keys tr", has_text="browser-key")
    assert row.get_attribute("data-status") == "active"
    key_id = row.get_attribute("data-key")
    # Shown once: the list, reloaded, never shows it again.
    page.reload()
    page.wait_for_selector("#keys")
    assert page.locator("#new-key-secret").count() == 0
    assert secret not in page.content()
    # Edit: a budget; the row then shows spend against it.
    page.click(f"button.edit[data-key='{key_id}']")
    page.fill("#edit-key input[name=budget_usd]", "5")
    page.click("#edit-key button[type=submit]")
    page.wait_for_selector(f"#keys tr[data-key='{key_id}']")
    assert "$0.00 / $5.00 monthly" in page.inner_text(f"#keys tr[data-key='{key_id}']")
    with api(gateway) as client:
        stored = client.get(f"/admin/v1/keys/{key_id}").json()
        assert stored["budget"] == {"usd": 5.0, "period": "monthly"} and stored["rpm"] == 60
    # Revoke: two clicks (arm, confirm).
    page.click(f"button.revoke[data-key='{key_id}']")
    page.click(f"button.revoke[data-key='{key_id}']")
    page.wait_for_selector(f"#keys tr[data-key='{key_id}'][data-status=revoked]")
    with api(gateway, secret) as user:
        assert user.get("/v1/models").status_code == 401


def test_a_viewer_sees_no_write_controls_and_its_forced_write_is_refused(
    gateway: GandalfServer, page: Any
) -> None:
    login(page, gateway, VIEWER)
    page.click("a[data-page=keys]")
    page.wait_for_selector("#keys tbody tr")
    assert page.locator("#create-key").count() == 0
    assert page.locator("button.revoke, button.edit").count() == 0
    page.click("a[data-page=tenants]")
    page.wait_for_selector("#orgs")
    assert page.locator("main form").count() == 0
    assert page.locator("main button.danger").count() == 0
    forced = page.evaluate(
        """async () => {
            const s = await (await fetch('/ui/session')).json();
            const post = (headers) => fetch('/admin/v1/keys', {method: 'POST',
                headers: {'content-type': 'application/json', ...headers},
                body: JSON.stringify({name: 'sneaky', role: 'admin'})});
            const withToken = await post({'x-csrf-token': s.csrf});
            const without = await post({});
            return [s.can_write, withToken.status, (await withToken.json()).error.code,
                    without.status];
        }"""
    )
    assert forced == [False, 403, "permission_denied", 403]
    with api(gateway) as client:
        names = [k["name"] for k in client.get("/admin/v1/keys").json()["data"]]
    assert "sneaky" not in names


def test_usage_explorer_exports_csv(gateway: GandalfServer, page: Any) -> None:
    login(page, gateway, ADMIN)
    page.click("a[data-page=usage]")
    page.wait_for_selector("#usage-form")
    page.select_option("#usage-form select[name=group_by]", "provider")
    page.click("#usage-form button[type=submit]")
    page.wait_for_selector("#usage tbody tr")
    with page.expect_download() as info:
        page.click("#csv")
    path = info.value.path()
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("group,name,bucket,requests,errors")
    with api(gateway) as client:
        rows = client.get("/admin/v1/usage", params={"group_by": "provider", "since": "7d"})
    assert len(lines) == 1 + len(rows.json()["data"])


def test_providers_page_and_a_phone_width(gateway: GandalfServer, browser: Any) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        login(page, gateway, ADMIN)
        page.wait_for_selector("#chart-requests svg")
        # Nothing wider than the phone's screen but the scrollable tables' own boxes.
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.click("a[data-page=providers]")
        page.wait_for_selector("#providers tr[data-provider=fake]")
        assert "closed" in page.inner_text("#providers tr[data-provider=fake]")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        context.close()


def test_logout_ends_the_session(gateway: GandalfServer, page: Any) -> None:
    login(page, gateway, ADMIN)
    page.click("#logout")
    page.wait_for_url(gateway.url + "/ui/login")
    assert [c for c in page.context.cookies() if c["name"] == "gandalf_session"] == []
    assert page.evaluate("fetch('/ui/session').then(r => r.status)") == 401
    assert page.evaluate("fetch('/admin/v1/keys').then(r => r.status)") == 401
    page.goto(gateway.url + "/ui/")
    assert page.url.endswith("/ui/login")


def test_orgs_and_teams_created_edited_and_deleted(gateway: GandalfServer, page: Any) -> None:
    login(page, gateway, ADMIN)
    page.click("a[data-page=tenants]")
    page.wait_for_selector("#orgs")
    org_form = page.locator("main form").nth(0)
    org_form.locator("input[name=id]").fill("ui-org")
    org_form.locator("button[type=submit]").click()
    page.wait_for_selector("#orgs tr[data-id=ui-org]")
    team_form = page.locator("main form").nth(1)
    team_form.locator("input[name=id]").fill("ui-team")
    team_form.locator("input[name=org]").fill("ui-org")
    team_form.locator("input[name=budget_usd]").fill("20")
    team_form.locator("button[type=submit]").click()
    page.wait_for_selector("#teams tr[data-id=ui-team]")
    assert "$0.00 / $20.00 monthly" in page.inner_text("#teams tr[data-id=ui-team]")
    page.click("#teams button.edit[data-id=ui-team]")
    page.fill("#edit-tenant input[name=rpm]", "30")
    page.select_option("#edit-tenant select[name=budget_period]", "weekly")
    page.click("#edit-tenant button[type=submit]")
    page.wait_for_selector("#teams tr[data-id=ui-team]")
    with api(gateway) as client:
        team = client.get("/admin/v1/teams/ui-team").json()
    assert team["rpm"] == 30 and team["budget"] == {"usd": 20.0, "period": "weekly"}
    page.click("#teams button.danger[data-id=ui-team]")
    page.wait_for_selector("#teams tr[data-id=ui-team]", state="detached")
    page.click("#orgs button.danger[data-id=ui-org]")
    page.wait_for_selector("#orgs tr[data-id=ui-org]", state="detached")
    with api(gateway) as client:
        assert client.get("/admin/v1/orgs/ui-org").status_code == 404
