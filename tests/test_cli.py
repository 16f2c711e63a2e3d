"""cli: ``gandalf keys`` argument bounds and output hygiene, run in process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gandalf import cli
from gandalf.app.keys import KeyManager
from gandalf.storage.sqlite import SqliteStore


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "g.yaml"
    path.write_text(
        f"database: {{dsn: {tmp_path / 'g.db'}}}\nproviders: [{{name: fake, type: fake}}]\n",
        encoding="utf-8",
    )
    return str(path)


def test_an_absurd_expiry_is_a_usage_error_not_a_traceback(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for lifetime in ("99999999999d", "9" * 5000 + "s", "36601d"):
        argv = ["keys", "create", "--config", config, "--name", "x", "--expires-in", lifetime]
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code == cli.EXIT_USAGE, lifetime[:20]
        assert "Traceback" not in err
        assert err.startswith("gandalf: error: --expires-in") and "100 years" in err
        assert err.count("\n") == 1 and len(err) < 200
    # The bound itself is accepted.
    argv = ["keys", "create", "--config", config, "--name", "y", "--expires-in", "5200w"]
    assert cli.main(argv) == 0


def test_keys_list_escapes_control_characters(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(Path(config).parent / "g.db")

    async def seed() -> None:  # a name from the database, not from this CLI
        store = SqliteStore(db)
        await store.open()
        try:
            await KeyManager(store).create(name="evil\x1b]0;pwned\x07\x1b[2J", org_id="o\rg")
        finally:
            await store.close()

    asyncio.run(seed())
    assert cli.main(["keys", "list", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J" in out
    assert "o\\rg" in out


def test_keys_create_refuses_control_characters_in_names(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["keys", "create", "--config", config, "--name", "a\x1b[31mb"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert "\x1b" not in err and "control character" in err
