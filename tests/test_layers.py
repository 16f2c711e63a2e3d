"""DESIGN.md's import direction, checked by walking every module's imports.

cli -> wiring -> server -> app/auth -> domain/errors; provider and storage
import only domain and errors; server never imports aiohttp, aiosqlite,
provider or storage; domain imports nothing from gandalf; asyncpg only in
storage, redis only in scaleout.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gandalf"

# layer -> gandalf layers it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "domain": set(),
    "errors": set(),
    "config": {"domain", "errors"},
    "provider": {"domain", "errors"},
    "storage": {"domain", "errors"},
    "auth": {"domain", "errors"},
    "app": {"domain", "errors", "auth"},
    "server": {"domain", "errors", "app", "auth", "observability"},
    # The admin API sits beside server: storage only through its Protocol.
    "admin": {"domain", "errors", "app", "auth"},
    # metrics, log format, request facts: read by the server core, built by wiring
    "observability": {"domain", "errors"},
    "bootstrap": {"domain", "errors", "config", "app", "auth"},
    # The Redis adapters (shared limits, budgets, cache, notifications): they
    # implement app's Protocols on app's own limit and budget types, so they
    # import app (storage may not); wiring imports them only when configured.
    "scaleout": {"domain", "errors", "app"},
    "wiring": {
        "domain",
        "errors",
        "config",
        "app",
        "auth",
        "server",
        "admin",
        "provider",
        "storage",
        "bootstrap",
        "observability",
        "scaleout",
    },
    "cli": {
        "domain",
        "errors",
        "config",
        "app",
        "auth",
        "server",
        "provider",
        "storage",
        "bootstrap",
        "wiring",
        "observability",
        "benchkit",
    },
    "__main__": {"cli"},
    "healthcheck": {"config"},
    # gandalf bench: a load-generating client for any OpenAI-compatible server, so it
    # imports nothing of the gateway (cli reaches it; nothing else does).
    "benchkit": set(),  # the container's HEALTHCHECK: stdlib urllib + split_addr
    "__init__": set(),
}
FORBIDDEN_THIRD_PARTY: dict[str, set[str]] = {
    # starlette: the admin API mounts through a plain ASGI bridge (server/mount.py).
    "server": {"aiohttp", "aiosqlite", "starlette", "opentelemetry"},
    "admin": {"aiohttp", "aiosqlite", "granian"},
    "domain": {"aiohttp", "aiosqlite", "granian", "yaml"},
    "app": {"aiohttp", "aiosqlite", "granian", "opentelemetry"},
    "auth": {"aiohttp", "aiosqlite", "granian"},
    # opentelemetry only in observability/tracing.py, imported lazily by wiring
    "observability": {"aiohttp", "aiosqlite", "granian"},
    "scaleout": {"aiohttp", "aiosqlite", "granian", "starlette"},
}
# The PostgreSQL and Redis clients stay behind their adapters: asyncpg only in
# storage (postgres.py), redis only in scaleout. Every other layer, wiring and
# cli included, reaches them through those packages (imported when configured).
CLIENT_HOMES: dict[str, str] = {"asyncpg": "storage", "redis": "scaleout"}
for _layer in ALLOWED:
    FORBIDDEN_THIRD_PARTY.setdefault(_layer, set()).update(
        client for client, home in CLIENT_HOMES.items() if home != _layer
    )


def layer_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "gandalf":
                found.update(
                    f"gandalf.{alias.name}" for alias in node.names if alias.name != "__version__"
                )
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path: Path) -> None:
    layer = layer_of(path)
    assert layer in ALLOWED, f"{path}: unknown layer {layer!r}; add it to test_layers.py"
    for name in imports_of(path):
        top, _, rest = name.partition(".")
        if top == "gandalf":
            if not rest:
                continue  # `import gandalf` / `from gandalf import __version__`
            target = rest.split(".")[0]
            if target == layer:
                continue
            assert target in ALLOWED[layer] or target == "__init__", (
                f"{path.relative_to(PACKAGE)} ({layer}) must not import gandalf.{target}"
            )
        else:
            assert top not in FORBIDDEN_THIRD_PARTY.get(layer, set()), (
                f"{path.relative_to(PACKAGE)} ({layer}) must not import {top}"
            )


def test_the_walk_sees_the_whole_package() -> None:
    layers = {layer_of(p) for p in MODULES}
    assert {"domain", "server", "app", "auth", "provider", "storage", "wiring", "admin"} <= layers


def test_a_violation_would_be_caught(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from gandalf.storage.sqlite import SqliteStore\nimport aiohttp\n")
    assert {"gandalf.storage.sqlite", "aiohttp"} <= imports_of(bad)


def test_database_and_redis_clients_stay_in_their_packages() -> None:
    assert "asyncpg" not in FORBIDDEN_THIRD_PARTY["storage"]
    assert "redis" not in FORBIDDEN_THIRD_PARTY["scaleout"]
    for layer in set(ALLOWED) - {"storage", "scaleout"}:
        assert {"asyncpg", "redis"} <= FORBIDDEN_THIRD_PARTY[layer], layer
    assert "redis" in FORBIDDEN_THIRD_PARTY["storage"]
    assert "asyncpg" in FORBIDDEN_THIRD_PARTY["scaleout"]
