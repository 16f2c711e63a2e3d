"""cli: ``gandalf orgs|teams create|list|delete`` and the limit options of ``keys create``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gandalf import cli
from gandalf.domain import ApiKey, Budget, Organization, Team
from gandalf.storage.sqlite import SqliteStore


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "g.yaml"
    path.write_text(
        f"database: {{dsn: {tmp_path / 'g.db'}}}\n"
        "providers: [{name: fake, type: fake}]\n"
        "routes:\n"
        "  - {model_alias: gpt-4o, targets: [{provider: fake, model: f}]}\n"
        "  - {model_alias: claude-3, targets: [{provider: fake, model: f}]}\n"
        "orgs: [{id: declared}]\n",
        encoding="utf-8",
    )
    return str(path)


def run(config: str, *argv: str) -> int:
    return cli.main([*argv, "--config", config])


def stored(config: str) -> tuple[list[Organization], list[Team], list[ApiKey]]:
    async def read() -> tuple[list[Organization], list[Team], list[ApiKey]]:
        store = SqliteStore(str(Path(config).parent / "g.db"))
        await store.open()
        try:
            return await store.list_orgs(), await store.list_teams(), await store.list_keys()
        finally:
            await store.close()

    return asyncio.run(read())


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("gandalf: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_orgs_and_teams_create_list_delete(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("--rpm", "1000", "--tpm", "200000", "--budget-usd", "500")
    assert run(config, "orgs", "create", "acme", "--name", "Acme", *argv,
               "--allowed-models", "gpt-4o,claude-*") == 0  # fmt: skip
    assert run(config, "teams", "create", "backend", "--org", "acme", "--tpm", "50000",
               "--budget-usd", "100", "--budget-period", "weekly") == 0  # fmt: skip
    orgs, teams, _ = stored(config)
    acme = next(o for o in orgs if o.id == "acme")
    assert (acme.name, acme.rpm, acme.tpm, acme.source) == ("Acme", 1000, 200000, "cli")
    assert acme.budget == Budget(usd=500, period="monthly")
    assert acme.allowed_models == ("gpt-4o", "claude-*")
    assert [(t.id, t.org_id, t.tpm, t.budget) for t in teams] == [
        ("backend", "acme", 50000, Budget(usd=100, period="weekly"))
    ]
    capsys.readouterr()
    assert run(config, "orgs", "list") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["ID", "NAME", "RPM", "TPM", "BUDGET", "SOURCE", "MODELS"]
    line = next(x for x in out.splitlines() if x.startswith("acme "))
    assert line.split() == ["acme", "Acme", "1000", "200000", "$500/monthly", "cli",
                            "gpt-4o,claude-*"]  # fmt: skip
    assert run(config, "teams", "list", "--org", "acme") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["backend", "acme", "backend", "-", "50000", "$100/weekly", "cli",
                                "all"]  # fmt: skip

    # A key in the team: its org is the team's; its own limits are stored and listed.
    limits = ("--rpm", "100", "--budget-usd", "10", "--budget-period", "daily")
    assert run(config, "keys", "create", "--name", "svc", "--team", "backend", *limits,
               "--models", "gpt-4o") == 0  # fmt: skip
    (key,) = stored(config)[2]
    assert (key.org_id, key.team_id, key.rpm, key.tpm) == ("acme", "backend", 100, 0)
    assert key.budget == Budget(usd=10, period="daily")
    capsys.readouterr()
    assert run(config, "keys", "list") == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[4:9] == ["ORG", "TEAM", "RPM", "TPM", "BUDGET"]
    assert row.split()[4:9] == ["acme", "backend", "100", "-", "$10/daily"]

    # Deleting refuses while a live key (or a team) belongs to it; then works.
    assert run(config, "teams", "delete", "backend") == cli.EXIT_USAGE
    assert "team 'backend' still has 1 live key(s)" in one_line_error(capsys)
    assert run(config, "orgs", "delete", "acme") == cli.EXIT_USAGE
    assert "1 live key(s) and 1 team(s)" in one_line_error(capsys)
    assert run(config, "keys", "revoke", key.id) == 0
    assert run(config, "teams", "delete", "backend") == 0
    assert run(config, "orgs", "delete", "acme") == 0
    assert run(config, "orgs", "delete", "acme") == cli.EXIT_NOT_FOUND
    assert [o.id for o in stored(config)[0]] == ["default", "declared"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["orgs", "create", "x", "--rpm", "-1"], "--rpm must be a whole number >= 0"),
        (["orgs", "create", "x", "--tpm", "lots"], "--tpm must be a whole number >= 0"),
        (["orgs", "create", "x", "--budget-usd", "-5"], "--budget-usd must be a number"),
        (["orgs", "create", "x", "--budget-usd", "nan"], "--budget-usd must be a number"),
        (["orgs", "create", "x", "--budget-usd", "5", "--budget-period", "hourly"],
         "--budget-period must be one of daily, weekly, monthly, total"),
        (["orgs", "create", "x", "--budget-period", "daily"], "--budget-period needs --budget-usd"),
        (["orgs", "create", "declared"], "an org with id 'declared' exists"),
        (["orgs", "create", "bad\x1b[2J"], "org id must be non-empty without control"),
        (["teams", "create", "t", "--org", "nope"], "--org: no org 'nope'"),
        (["orgs", "delete", "default"], "the default org cannot be deleted"),
        (["orgs", "delete", "declared"], "org 'declared' is declared in"),
        (["keys", "create", "--name", "k", "--team", "nope"], "--team: no team 'nope'"),
        # A typo must not make a new tenant with no limits.
        (["keys", "create", "--name", "k", "--org", "nope"], "--org: no org 'nope'"),
        (["keys", "create", "--name", "k", "--rpm", "1.5"], "--rpm must be a whole number"),
        (["keys", "create", "--name", "k", "--models", "gemini-*"], "--models: no route"),
    ],
)  # fmt: skip
def test_refusals_are_one_line_and_exit_2(
    config: str, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    assert run(config, *argv) == cli.EXIT_USAGE
    assert expected in one_line_error(capsys)


def test_a_key_in_a_team_of_another_org_is_refused(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(config, "teams", "create", "red", "--org", "declared") == 0
    capsys.readouterr()
    assert run(config, "keys", "create", "--name", "k", "--org", "default", "--team", "red") == 2
    assert "team 'red' belongs to org 'declared', not 'default'" in one_line_error(capsys)
    assert run(config, "keys", "create", "--name", "k", "--models", "claude-*") == 0  # a glob
    assert stored(config)[2][0].allowed_models == ("claude-*",)
