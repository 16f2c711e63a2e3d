"""cli: ``gandalf usage`` sums the usage records per group, as a table or JSON."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from gandalf import cli
from gandalf.domain import ApiKey, Organization, UsageRecord
from gandalf.storage.sqlite import SqliteStore

NOW = time.time()
HOUR = 3600.0


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "g.yaml"
    path.write_text(
        f"database: {{dsn: {tmp_path / 'g.db'}}}\nproviders: [{{name: fake, type: fake}}]\n",
        encoding="utf-8",
    )
    db = str(tmp_path / "g.db")

    def rec(
        n: int, key: str, model: str, age_h: float, cost: float | None, status: int = 200
    ) -> UsageRecord:
        return UsageRecord(
            f"r{n}", key, "acme", "alias", model, "oa", 100, 10, 110, 1.0, status,
            NOW - age_h * HOUR, "chat", 1, None, 40, 0, 5, cost,
        )  # fmt: skip

    async def seed() -> None:
        store = SqliteStore(db)
        await store.open()
        try:
            await store.create_org(Organization(id="acme", name="Acme Corp"))
            await store.create_key(
                ApiKey(id="k-svc", name="svc", key_hash="1" * 64, prefix="gnd_Svc1", org_id="acme")
            )
            for r in (
                rec(1, "k-svc", "gpt-4o", 1, 0.25),
                rec(2, "k-svc", "gpt-4o", 2, 0.000015),  # a cheap request still shows
                rec(3, "k-other", "mini", 3, None),
                rec(4, "k-other", "mini", 4, None, status=500),
                rec(5, "k-svc", "gpt-4o", 24 * 10, 1.0),  # older than 7 days
            ):
                store.record_usage(r)
            await store.flush()
        finally:
            await store.close()

    asyncio.run(seed())
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["usage", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_default_is_per_model_over_seven_days(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "--config", config)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
        "MODEL", "REQUESTS", "ERRORS", "PROMPT", "CACHED", "COMPLETION", "REASONING", "COST", "USD",
    ]  # fmt: skip
    assert lines[1].split() == ["gpt-4o", "2", "0", "200", "80", "20", "10", "0.250015"]
    # A successful request without a price is flagged.
    assert lines[2].split() == ["mini", "2", "1", "200", "80", "20", "10", "0.000000*"]
    assert set(lines[3]) <= {"-", " "}
    assert lines[4].split() == ["TOTAL", "4", "1", "400", "160", "40", "20", "0.250015*"]
    # Aligned: every row as wide as the header up to its last column.
    assert len({len(line) for line in lines if not line.startswith("-")}) == 1
    assert "2 group(s), since " in err and "1 successful request(s) without a known price" in err


def test_by_key_shows_name_and_prefix(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--config", config, "--by", "key", "--since", "all")
    assert code == 0
    lines = out.splitlines()
    assert lines[1].startswith("svc (gnd_Svc1...) k-svc ")
    assert lines[1].split()[3:5] == ["3", "0"]  # three requests over all time
    assert lines[2].startswith("k-other ")  # not a stored key: its id


def test_json_and_since(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--config", config, "--by", "org", "--since", "150m", "--json")
    assert code == 0
    [row] = json.loads(out)
    assert row["group"] == "acme" and row["name"] == "Acme Corp"
    assert row["requests"] == 2  # 1 h and 2 h old; 3 h is outside 150 minutes
    assert row["cost_usd"] == pytest.approx(0.250015)
    assert row["cached_prompt_tokens"] == 80 and row["reasoning_tokens"] == 10
    assert set(row) >= {"prompt_tokens", "completion_tokens", "total_tokens", "errors", "unpriced"}


@pytest.mark.parametrize("since", ["7", "7days", "-1d", "9" * 40 + "d", "1d\x1b[2J"])
def test_bad_since_is_one_usage_line(
    config: str, capsys: pytest.CaptureFixture[str], since: str
) -> None:
    code, out, err = run(capsys, "--config", config, f"--since={since}")
    assert code == cli.EXIT_USAGE and out == ""
    assert err.startswith("gandalf: error: --since") and err.count("\n") == 1
    assert "\x1b" not in err


def test_by_route_is_the_alias_asked_for(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--config", config, "--by", "route")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[0] == "ROUTE"
    assert lines[1].split()[:3] == ["alias", "4", "1"]  # both models' requests, one route


def test_unknown_grouping_is_refused(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["usage", "--config", config, "--by", "endpoint"])
    assert caught.value.code == 2
    assert "invalid choice: 'endpoint'" in capsys.readouterr().err
