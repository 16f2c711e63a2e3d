"""A client cannot make its own usage under-report, however it spells its JSON.

Streams report usage only when ``stream_options.include_usage`` asks for it,
so the gateway always asks the upstream and hides the extra usage event from a
client that did not ask. What the client asked is what msgspec decodes (JSON
semantics: escaped keys unescaped, the last of repeated keys wins); the body
sent upstream must then ask for usage unambiguously, whatever parser reads it.
Driven in process through the ASGI app against the mock upstream (which reads
the body with Python's json, and reports usage only when asked); the usage
rows are read from the SQLite file once the app has flushed them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry, ServerConfig
from gandalf.domain import ProviderConfig, Route, Target
from gandalf.server.asgi import GandalfApp
from gandalf.wiring import create_app
from tests.asgi_client import Reply, call
from tests.upstream import MockUpstream

KEY = "gnd_" + "u" * 43
VERSION = "api-version=2024-10-21"
_counter = itertools.count()

# (extra members, what the client asked: msgspec's reading of them)
SPELLINGS: list[tuple[bytes, bool]] = [
    (b"", False),
    (b'"stream_options":null', False),
    (b'"stream\\u005foptions":{"include_usage":false}', False),
    (b'"stream\\u005foptions":{"include_usage":true}', True),
    (b'"stream_options":{"include_usage":true},"stream_options":{"include_usage":false}', False),
    (
        b'"stream_options":{"include_usage":false},"stream\\u005foptions":{"include_usage":true}',
        True,
    ),
    (b'"stream_options":{"include_usage":true},"stream_options":null', False),
    (b'"stream_options":{"include\\u005fusage":true}', True),
    (b'"stream_options":{"include_usage":true,"include_usage":false}', False),
    (b'"stream_options":{"include_usage":false,"include_usage":true}', True),
    (b'  "stream_options"  :  {  "include_usage"  :  false  }  ', False),
    (b'"stream_options":{"include_usage":true}', True),
]
IDS = [
    "absent",
    "null",
    "escaped-false",
    "escaped-true",
    "repeated-true-false",
    "repeated-false-escaped-true",
    "repeated-true-null",
    "inner-escaped-true",
    "inner-repeated-true-false",
    "inner-repeated-false-true",
    "whitespace-false",
    "plain-true",
]


def config(mock: MockUpstream, db: str) -> GandalfConfig:
    root = f"http://127.0.0.1:{mock.port}"
    return GandalfConfig(
        server=ServerConfig(access_log=False),
        database=DatabaseConfig(dsn=db),
        providers=(
            ProviderConfig(name="up", type="openai", base_url=root + "/v1", api_key="sk-up"),
            ProviderConfig(name="az", type="azure", base_url=root, api_key="az-secret"),
        ),
        routes=(
            # The alias is the target's model: the body goes up without a model rewrite.
            Route(model_alias="stream-3", targets=(Target(provider="up", model="stream-3"),)),
            Route(model_alias="renamed", targets=(Target(provider="up", model="stream-3"),)),
            Route(model_alias="az-stream", targets=(Target(provider="az", model="stream-3"),)),
        ),
        keys=(KeyEntry(name="k", key=KEY, role="member"),),
    )


def run(mock: MockUpstream, db: Path, scenario: Callable[[GandalfApp], Awaitable[None]]) -> None:
    async def main() -> None:
        app = create_app(config(mock, str(db)), access_log=False)
        await app.startup()
        try:
            await scenario(app)
        finally:
            await app.shutdown()  # flushes the usage rows

    asyncio.run(main())


def body_with(head: dict[str, Any], extra: bytes, *, first: bool = False) -> bytes:
    """``head`` as JSON with the raw ``extra`` members added (first or last)."""
    body = orjson.dumps(head)
    if not extra:
        return body
    if first:
        return b"{" + extra + b"," + body[1:]
    return body[:-1] + b"," + extra + b"}"


def usage_events(reply: Reply) -> list[dict[str, Any]]:
    assert reply.status == 200, reply.body[:300]
    events = [e[6:] for e in reply.body.split(b"\n\n") if e.startswith(b"data: {")]
    assert reply.body.endswith(b"data: [DONE]\n\n")
    return [p for p in map(orjson.loads, events) if p.get("usage")]


def usage_row(db: Path, request_id: str) -> tuple[int, int, int]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT prompt_tokens, completion_tokens, total_tokens FROM usage_records "
            "WHERE request_id = ?",
            (request_id,),
        ).fetchall()
    assert len(rows) == 1, rows
    prompt, completion, total = rows[0]
    return prompt, completion, total


def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object hook that refuses repeated keys: parsers differ on them."""
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), f"repeated keys sent upstream: {keys}"
    return dict(pairs)


def check(
    mock: MockUpstream, text: str, reply: Reply, client_asked: bool
) -> tuple[str, tuple[int, int, int]]:
    """What the client saw, and what the upstream was asked and reported: the
    request id and the usage its row must hold."""
    shown = usage_events(reply)
    assert len(shown) == (1 if client_asked else 0), shown
    log = mock.stream_log(text)
    assert log.include_usage, "the gateway must ask the upstream for usage"
    assert log.usage is not None and log.done
    expected = (
        log.usage["prompt_tokens"],
        log.usage["completion_tokens"],
        log.usage["total_tokens"],
    )
    assert expected[0] > 0 and expected[1] == 3
    [sent] = [r for r in list(mock.received) if text.encode() in r.body]
    options = json.loads(sent.body, object_pairs_hook=no_repeats)["stream_options"]
    assert options["include_usage"] is True  # however the upstream's parser reads repeats
    request_id = reply.header("x-request-id")
    assert request_id is not None
    if client_asked:
        usage = shown[0]["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == expected[:2]
    return request_id, expected


@pytest.mark.parametrize("alias", ["stream-3", "renamed"], ids=["same-model", "model-rewrite"])
@pytest.mark.parametrize("first", [False, True], ids=["options-last", "options-first"])
@pytest.mark.parametrize(("extra", "client_asked"), SPELLINGS, ids=IDS)
def test_chat_stream_usage_is_recorded_however_the_option_is_spelled(
    upstream: MockUpstream,
    tmp_path: Path,
    alias: str,
    first: bool,
    extra: bytes,
    client_asked: bool,
) -> None:
    db = tmp_path / "g.db"
    text = f"spelling {next(_counter)} " + "long prompt " * 50
    head = {"model": alias, "messages": [{"role": "user", "content": text}], "stream": True}
    rows: list[tuple[str, tuple[int, int, int]]] = []

    async def scenario(app: GandalfApp) -> None:
        reply = await call(
            app,
            "POST",
            "/v1/chat/completions",
            headers=[("authorization", f"Bearer {KEY}")],
            body=body_with(head, extra, first=first),
            stay=True,
        )
        rows.append(check(upstream, text, reply, client_asked))

    run(upstream, db, scenario)
    [(request_id, expected)] = rows
    assert usage_row(db, request_id) == expected


@pytest.mark.parametrize(("extra", "client_asked"), SPELLINGS, ids=IDS)
def test_azure_native_stream_usage_is_recorded_without_include_usage(
    upstream: MockUpstream, tmp_path: Path, extra: bytes, client_asked: bool
) -> None:
    db = tmp_path / "g.db"
    text = f"azure spelling {next(_counter)} " + "long prompt " * 50
    head = {"messages": [{"role": "user", "content": text}], "stream": True}
    rows: list[tuple[str, tuple[int, int, int]]] = []

    async def scenario(app: GandalfApp) -> None:
        reply = await call(
            app,
            "POST",
            "/openai/deployments/az-stream/chat/completions",
            headers=[("api-key", KEY)],
            body=body_with(head, extra),
            query=VERSION,
            stay=True,
        )
        rows.append(check(upstream, text, reply, client_asked))

    run(upstream, db, scenario)
    [(request_id, expected)] = rows
    assert usage_row(db, request_id) == expected
