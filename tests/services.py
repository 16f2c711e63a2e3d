"""The real servers some tests need: PostgreSQL, Redis and a Chromium browser.

`.ci/services start` runs PostgreSQL and Redis on 127.0.0.1 and prints the variables read here;
`.ci/run` installs all three from Debian's packages and sets ``GANDALF_TEST_SERVICES_REQUIRED=1``,
so in CI a missing one fails its tests instead of skipping them. Elsewhere those tests skip with a
message that says how to get the server.
"""

from __future__ import annotations

import os

import pytest

_HOW = (
    'run `eval "$(bash .ci/services start)"` first '
    "(Debian packages: postgresql redis-server chromium chromium-driver)"
)


def _absent(what: str, var: str) -> None:
    message = f"{what} is not available: {var} is unset; {_HOW}"
    if os.environ.get("GANDALF_TEST_SERVICES_REQUIRED") == "1":
        pytest.fail(message + " (required in CI)", pytrace=False)
    pytest.skip(message)


def postgres_dsn() -> str:
    """The DSN of a PostgreSQL server in which the tests may create databases of their own."""
    dsn = os.environ.get("GANDALF_TEST_POSTGRES", "")
    if not dsn:
        _absent("PostgreSQL", "GANDALF_TEST_POSTGRES")
    return dsn


def postgres_wanted() -> bool:
    """Should a test that runs on either engine take PostgreSQL? Yes when its
    server is given, and always in CI (where :func:`postgres_dsn` then fails
    if it is missing); else SQLite."""
    return bool(os.environ.get("GANDALF_TEST_POSTGRES")) or (
        os.environ.get("GANDALF_TEST_SERVICES_REQUIRED") == "1"
    )


def redis_url() -> str:
    """The URL of a Redis server the tests may use (each test takes keys under its own prefix)."""
    url = os.environ.get("GANDALF_TEST_REDIS", "")
    if not url:
        _absent("Redis", "GANDALF_TEST_REDIS")
    return url


def chromium_path() -> str:
    """The path of a Chromium binary (Debian's /usr/bin/chromium), with chromedriver beside it."""
    path = os.environ.get("GANDALF_TEST_CHROMIUM", "")
    if not path or not os.path.exists(path):
        _absent("Chromium", "GANDALF_TEST_CHROMIUM")
    return path
