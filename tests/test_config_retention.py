"""``database.usage_retention``: how long raw usage records are kept."""

from __future__ import annotations

import pytest

from gandalf.config import parse_config
from gandalf.errors import ConfigError

DAY = 86400.0


def retention(value: str) -> float:
    text = f"database:\n  dsn: ':memory:'\n  usage_retention: {value}\n"
    return parse_config(text, source="gandalf.yaml", env={}).database.usage_retention


def test_default_is_thirty_days() -> None:
    assert parse_config("{}", source="gandalf.yaml", env={}).database.usage_retention == 30 * DAY


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("30d", 30 * DAY), ("1.5d", 1.5 * DAY), ("12h", 12 * 3600.0), ("90m", 5400.0),
     ("3600", 3600.0), ("0", 0.0), ("none", 0.0), ("forever", 0.0), ("null", 0.0),
     ("false", 0.0)],
)  # fmt: skip
def test_values(value: str, seconds: float) -> None:
    assert retention(value) == seconds


@pytest.mark.parametrize("value", ["-1d", "soon", "0d", "[1]", "-5"])
def test_bad_values_name_the_key(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        retention(value)
    message = str(caught.value)
    assert message.startswith("gandalf.yaml: database.usage_retention: "), message
    assert "\n" not in message


def test_a_relative_file_dsn_keeps_the_retention() -> None:
    text = "database:\n  dsn: g.db\n  usage_retention: 7d\n"
    database = parse_config(text, source="/srv/gandalf/gandalf.yaml", env={}).database
    assert (database.dsn, database.usage_retention) == ("/srv/gandalf/g.db", 7 * DAY)
