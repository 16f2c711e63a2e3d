"""The official SDKs against Gandalf in process (issue 13): what they call and
read, with Gandalf's ASGI app behind ``httpx.ASGITransport`` and the mock
upstreams on 127.0.0.1.

- ``client.models.retrieve`` / ``models.list`` in the openai and anthropic
  SDKs, Gemini's model get and Ollama's ``/api/show`` and ``/api/version``;
- ``x-should-retry: false`` once Gandalf spent its attempts: the SDK's own
  retries do not multiply them;
- upstream headers relayed on ``/v1/chat/completions``; the fake provider's
  reply in the OpenAPI document's shape; 404s in each API's shape;
  ``request-id`` on Anthropic paths.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import httpx2 as httpx  # the SDKs here are built on httpx2 (an httpx fork)
import openai
import pytest

from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry
from gandalf.domain import ProviderConfig, Resilience, Route, Target
from gandalf.server.asgi import GandalfApp
from gandalf.wiring import create_app
from tests.mock_anthropic import MockAnthropic
from tests.mock_gemini import MockGemini
from tests.upstream import MockUpstream, running_upstream

KEY = "gnd_" + "s" * 40
LIMITED = "gnd_" + "t" * 40  # may use "gpt" only


@pytest.fixture(scope="module")
def openai_mock() -> Iterator[MockUpstream]:
    with running_upstream() as mock:
        yield mock


def _config(mock: MockUpstream, claude: MockAnthropic, gemini: MockGemini) -> GandalfConfig:
    root = f"http://127.0.0.1:{mock.port}"
    return GandalfConfig(
        database=DatabaseConfig(dsn=":memory:"),
        providers=(
            ProviderConfig(name="up", type="openai", base_url=root + "/v1", api_key="sk-up"),
            ProviderConfig(name="fake", type="fake"),
            ProviderConfig(
                name="claude", type="anthropic", base_url=claude.base_url, api_key="sk-ant"
            ),
            ProviderConfig(name="gem", type="gemini", base_url=gemini.base_url, api_key="g"),
            ProviderConfig(name="ol", type="ollama", base_url=root + "/v1", models=("unused",)),
        ),
        routes=(
            Route(model_alias="gpt", targets=(Target(provider="up", model="ok-model"),)),
            Route(model_alias="busy", targets=(Target(provider="up", model="busy"),)),
            Route(
                model_alias="busy-once",
                targets=(Target(provider="up", model="busy"),),
                max_attempts=1,
            ),
            Route(model_alias="fake-model", targets=(Target(provider="fake", model="fake-1"),)),
            Route(model_alias="claude", targets=(Target(provider="claude", model="claude-ok"),)),
            Route(model_alias="gemini", targets=(Target(provider="gem", model="gemini-ok"),)),
            Route(model_alias="llama", targets=(Target(provider="ol", model="llama3.2:1b"),)),
        ),
        keys=(
            KeyEntry(name="app", key=KEY, role="member"),
            KeyEntry(name="limited", key=LIMITED, role="member", allowed_models=("gpt",)),
        ),
        # Quick retries so a test sees every attempt without waiting.
        resilience=Resilience(max_attempts=3, backoff_base=0.001, backoff_cap=0.01),
    )


Scenario = Callable[[GandalfApp, httpx.AsyncClient], Awaitable[None]]


@pytest.fixture
def run(
    openai_mock: MockUpstream, anthropic_mock: MockAnthropic, gemini_mock: MockGemini
) -> Callable[[Scenario], None]:
    """``run(scenario)``: start the app, give the scenario it and an httpx
    client on it, stop the app."""

    def runner(scenario: Scenario) -> None:
        async def main() -> None:
            app = create_app(_config(openai_mock, anthropic_mock, gemini_mock), access_log=False)
            await app.startup()
            try:
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://gandalf"
                ) as http:
                    await scenario(app, http)
            finally:
                await app.shutdown()

        openai_mock.clear()
        asyncio.run(main())

    return runner


@asynccontextmanager
async def openai_client(
    http: httpx.AsyncClient, key: str = KEY, **options: Any
) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url="http://gandalf/v1", api_key=key, http_client=http, **options
    )
    yield client


def anthropic_client(http: httpx.AsyncClient, key: str = KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url="http://gandalf", api_key=key, http_client=http)


def upstream_calls(mock: MockUpstream, model: str) -> int:
    return sum(1 for r in mock.received if r.json().get("model") == model)


# ---------------------------------------------------------------------------- retries


def test_the_sdk_does_not_multiply_gandalfs_retries(
    run: Callable[[Scenario], None], openai_mock: MockUpstream
) -> None:
    """A default openai client (max_retries=2) against an upstream that always
    answers 429: Gandalf makes its 3 attempts, says ``x-should-retry: false``,
    and the SDK does not send the request again (9 upstream calls before)."""

    async def scenario(app: GandalfApp, http: httpx.AsyncClient) -> None:
        async with openai_client(http) as client:
            assert client.max_retries == 2
            with pytest.raises(openai.RateLimitError) as raised:
                await client.chat.completions.create(
                    model="busy", messages=[{"role": "user", "content": "hi"}]
                )
        response = raised.value.response
        assert response.headers["x-should-retry"] == "false"
        assert response.headers["x-gandalf-attempts"] == "3"

    run(scenario)
    assert upstream_calls(openai_mock, "busy") == 3


def test_one_attempt_leaves_the_retry_to_the_sdk(
    run: Callable[[Scenario], None], openai_mock: MockUpstream
) -> None:
    """``max_attempts: 1``: Gandalf does not retry, so the SDK's retry is the
    only one there is, and nothing forbids it."""

    async def scenario(app: GandalfApp, http: httpx.AsyncClient) -> None:
        async with openai_client(http, max_retries=1) as client:
            with pytest.raises(openai.RateLimitError) as raised:
                await client.chat.completions.create(
                    model="busy-once", messages=[{"role": "user", "content": "hi"}]
                )
        assert "x-should-retry" not in raised.value.response.headers

    run(scenario)
    assert upstream_calls(openai_mock, "busy") == 2
