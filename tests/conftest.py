"""Mock upstreams shared by the test modules: one of each per module that asks;
``store_dsn``: each storage backend in turn."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mock_anthropic import MockAnthropic, running_anthropic
from tests.mock_gemini import MockGemini, running_gemini
from tests.stores import BACKENDS, backend_dsn
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


@pytest.fixture(params=BACKENDS)
def store_dsn(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database of each backend in turn (tests/stores.py): an SQLite
    file, then a new PostgreSQL database (skipped without a server)."""
    with backend_dsn(request.param, str(tmp_path)) as dsn:
        yield dsn
