"""Upstream answers are read at most ``max_response_bytes``; SSE buffering is linear."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from gandalf.config import parse_config
from gandalf.domain import NativeRequest, ProviderConfig
from gandalf.errors import ConfigError, UpstreamTooLarge
from gandalf.provider import transport
from gandalf.provider.native import NativeClient
from gandalf.provider.openai import OpenAIProvider
from tests.test_timeouts import call, on_error
from tests.upstream import MockUpstream

CAP = 100_000


def config(mock: MockUpstream, **fields: object) -> ProviderConfig:
    return ProviderConfig(
        name="p",
        type="openai",
        base_url=mock.base_url,
        api_key="k",
        max_response_bytes=CAP,
        **fields,  # type: ignore[arg-type]
    )


async def chat(mock: MockUpstream, model: str) -> bytes:
    adapter = OpenAIProvider(config(mock))
    await adapter.start()
    try:
        return (await adapter.chat(call(model))).body
    finally:
        await adapter.close()


@pytest.mark.parametrize("kind", ["big", "chunked"])
def test_an_answer_over_the_cap_is_a_502_naming_it(mock: MockUpstream, kind: str) -> None:
    with pytest.raises(UpstreamTooLarge) as caught:
        asyncio.run(chat(mock, f"{kind}-{CAP}"))
    error = caught.value
    assert (error.status, error.type, error.code) == (
        502,
        "upstream_error",
        "upstream_response_too_large",
    )
    assert f"max_response_bytes={CAP}" in error.message
    # Under the cap, with or without a Content-Length, the whole answer comes back.
    body = asyncio.run(chat(mock, f"{kind}-{CAP - 100}"))
    assert msgspec.json.decode(body) == {"pad": "x" * (CAP - 100)}


def test_post_json_and_native_bodies_are_capped(mock: MockUpstream) -> None:
    cfg = config(mock)
    errors = transport.UpstreamErrors.for_config(cfg)

    async def main() -> None:
        session = transport.new_session(cfg)
        try:
            with pytest.raises(UpstreamTooLarge):
                await transport.post_json(
                    session,
                    mock.base_url + "/chat/completions",
                    call(f"chunked-{2 * CAP}").body,
                    {},
                    errors,
                    on_error,
                )
        finally:
            await session.close()
        native = NativeClient(cfg)
        await native.start()
        try:
            request = NativeRequest(
                api="azure",
                method="POST",
                path="/v1/chat/completions",
                headers={"content-type": "application/json"},
                body=call(f"big-{2 * CAP}").body,
            )
            with pytest.raises(UpstreamTooLarge):
                await native.send(request)
            request.body = call("big-100").body
            assert (await native.send(request)).status == 200
        finally:
            await native.close()

    asyncio.run(main())


def test_the_cap_is_configurable_and_validated() -> None:
    text = "providers:\n  - {name: p, type: openai, api_key: k, max_response_bytes: %s}\n"
    assert parse_config(text % "2048", source="t").providers[0].max_response_bytes == 2048
    default = parse_config("providers:\n  - {name: p, type: openai, api_key: k}\n", source="t")
    assert default.providers[0].max_response_bytes == 32 * 1024 * 1024
    with pytest.raises(ConfigError, match="max_response_bytes"):
        parse_config(text % "0", source="t")
