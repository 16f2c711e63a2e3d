"""Mock upstreams shared by the test modules: one of each per module that asks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.mock_anthropic import MockAnthropic, running_anthropic
from tests.mock_gemini import MockGemini, running_gemini
from tests.upstream import MockUpstream, running_upstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    """The mock OpenAI upstream (also Ollama's and Azure's paths)."""
    with running_upstream() as mock:
        yield mock


@pytest.fixture(scope="module")
def mock(upstream: MockUpstream) -> MockUpstream:
    """The same, under the name the end-to-end modules use."""
    return upstream


@pytest.fixture(scope="module")
def anthropic_mock() -> Iterator[MockAnthropic]:
    with running_anthropic() as mock:
        yield mock


@pytest.fixture(scope="module")
def gemini_mock() -> Iterator[MockGemini]:
    with running_gemini() as mock:
        yield mock
