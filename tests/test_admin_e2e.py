"""The admin API end to end: a real ``gandalf serve`` (both granian
interfaces, one worker) spoken to over HTTP with httpx."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from gandalf.auth.apikey import generate_key
from tests.serve import GandalfServer, route

ADMIN = generate_key()
VIEWER = generate_key()
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture(scope="module", params=["asgi", "rsgi"])
def gateway(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[GandalfServer]:
    tmp = tmp_path_factory.mktemp(f"admin-{request.param}")
    config = {
        "server": {"interface": request.param, "access_log": False, "workers": 1},
        "providers": [{"name": "fake", "type": "fake"}],
        "routes": [route("fake-model", "fake", "fake-1")],
        "keys": [
            {"name": "admin", "key": ADMIN, "role": "admin"},
            {"name": "viewer", "key": VIEWER, "role": "viewer"},
        ],
    }
    with GandalfServer(tmp, config) as server:
        yield server


def client(server: GandalfServer, key: str | None = ADMIN) -> httpx.Client:
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=10.0)


def test_create_a_key_use_it_revoke_it_and_it_is_refused_at_once(gateway: GandalfServer) -> None:
    with client(gateway) as admin:
        reply = admin.post("/admin/v1/keys", json={"name": "e2e", "rpm": 100})
        assert reply.status_code == 201, reply.text
        created = reply.json()
        with client(gateway, created["key"]) as user:
            assert user.post("/v1/chat/completions", json=CHAT).status_code == 200
            assert admin.delete(f"/admin/v1/keys/{created['id']}").status_code == 200
            refused = user.post("/v1/chat/completions", json=CHAT)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "invalid_api_key"
        audit = admin.get("/admin/v1/audit", params={"limit": 2}).json()["data"]
        assert [(r["action"], r["resource_id"]) for r in audit] == [
            ("revoke", created["id"]),
            ("create", created["id"]),
        ]


def test_a_route_made_over_http_serves_and_the_viewer_only_reads(gateway: GandalfServer) -> None:
    body = {"model_alias": "e2e-route", "targets": [{"provider": "fake", "model": "fake-2"}]}
    with client(gateway) as admin, client(gateway, VIEWER) as viewer:
        assert viewer.post("/admin/v1/routes", json=body).status_code == 403
        assert admin.post("/admin/v1/routes", json=body).status_code == 201
        chat = admin.post("/v1/chat/completions", json={**CHAT, "model": "e2e-route"})
        assert chat.status_code == 200, chat.text
        routes = viewer.get("/admin/v1/routes").json()["data"]
        assert {r["model_alias"]: r["source"] for r in routes} == {
            "e2e-route": "api",
            "fake-model": "config",
        }
        assert admin.delete("/admin/v1/routes/e2e-route").status_code == 200


def test_the_openapi_document_and_error_shapes_over_http(gateway: GandalfServer) -> None:
    with client(gateway, None) as anonymous:
        doc = anonymous.get("/admin/v1/openapi.json")
        assert doc.status_code == 200 and doc.json()["openapi"] == "3.1.0"
        refused = anonymous.get("/admin/v1/keys")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert refused.headers["x-request-id"]
    with client(gateway) as admin:
        missing = admin.get("/admin/v1/nothing")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/json"
        assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
        wrong = admin.put("/admin/v1/usage")
        assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
