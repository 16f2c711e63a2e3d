"""cli: what operators ran into: --config placement, IPv6 --addr, database errors,
key creation checks and the key list's columns."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gandalf import cli
from tests.serve import REPO_ROOT, free_port, gandalf_env, run_cli, wait_until

CONFIG = """\
database: {{dsn: {db}}}
providers:
  - {{name: fake, type: fake, models: [fake-model]}}
routes:
  - {{model_alias: smart, targets: [{{provider: fake, model: fake-model}}]}}
"""


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "g.yaml"
    path.write_text(CONFIG.format(db=tmp_path / "g.db"), encoding="utf-8")
    return str(path)


def _create(config: str, *args: str) -> int:
    return cli.main(["keys", "create", "--config", config, *args])


# ------------------------------------------------------------------ --config, --addr


def test_config_is_accepted_before_the_subcommand_too(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--config", config, "keys", "create", "--name", "a"]) == 0
    assert cli.main(["--config", config, "keys", "list"]) == 0
    assert " a " in capsys.readouterr().out
    # After the subcommand it still works, and wins over one given before.
    assert cli.main(["--config", "/nonexistent.yaml", "keys", "list", "--config", config]) == 0


def test_addr_takes_a_bracketed_ipv6_address(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Port 0 is refused after parsing: the message shows the brackets were understood.
    assert cli.main(["serve", "--config", config, "--addr", "[::1]:0"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "port 0 out of range" in err and "HOST:PORT" not in err
    assert cli.main(["serve", "--config", config, "--addr", "[::1:80"]) == cli.EXIT_USAGE
    assert "--addr: invalid address '[::1:80'" in capsys.readouterr().err


def _ipv6_port() -> int | None:
    if not socket.has_ipv6:
        return None
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
            port: int = probe.getsockname()[1]
            return port
    except OSError:
        return None


def test_serve_listens_on_ipv6_loopback(tmp_path: Path) -> None:
    port = _ipv6_port()
    if port is None:
        pytest.skip("no IPv6 loopback on this machine (the parser is tested above)")
    path = tmp_path / "g.yaml"
    path.write_text(CONFIG.format(db=tmp_path / "g.db"), encoding="utf-8")
    out = (tmp_path / "out").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gandalf",
            "--config",
            str(path),
            "serve",
            "--addr",
            f"[::1]:{port}",
        ],
        cwd=REPO_ROOT,
        env=gandalf_env(),
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def ready() -> bool:
            assert process.poll() is None, (tmp_path / "out").read_text()
            try:
                return httpx.get(f"http://[::1]:{port}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 20, "gandalf serve on [::1]")
        assert f"serving on http://[::1]:{port}/v1" in (tmp_path / "out").read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        out.close()


# ------------------------------------------------------------------ database errors


@pytest.mark.parametrize("argv", [["keys", "list"], ["serve"]])
def test_a_database_in_a_missing_directory_is_one_line_naming_database_dsn(
    tmp_path: Path, argv: list[str]
) -> None:
    path = tmp_path / "g.yaml"
    db = tmp_path / "missing" / "g.db"
    # A port of its own: the default 8080 may be taken on a developer's machine, and
    # a busy port would be the first thing serve reports.
    server = f'server: {{addr: "127.0.0.1:{free_port()}"}}\n'
    path.write_text(server + CONFIG.format(db=db), encoding="utf-8")
    result = run_cli(*argv, "--config", str(path), timeout=60)
    assert result.returncode == cli.EXIT_FAILURE
    assert result.stderr == (
        f"gandalf: error: {path}: database.dsn: cannot open database {db}: "
        f"directory {db.parent} does not exist\n"
    )


@pytest.fixture
def locked_dir() -> Iterator[Path]:
    """A directory the test's (possibly dropped) user cannot write into."""
    root = Path(tempfile.mkdtemp(prefix="gandalf-cli-"))
    try:
        root.chmod(0o755)
        locked = root / "locked"
        locked.mkdir(mode=0o555)
        yield locked
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_an_unwritable_database_directory_says_so(locked_dir: Path) -> None:
    prefix: list[str] = []
    if os.getuid() == 0:  # root writes anywhere: drop to nobody to see what operators see
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv")
        prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    config = locked_dir.parent / "g.yaml"
    config.write_text(CONFIG.format(db=locked_dir / "g.db"), encoding="utf-8")
    config.chmod(0o644)
    result = subprocess.run(
        [*prefix, sys.executable, "-m", "gandalf", "keys", "list", "--config", str(config)],
        cwd=REPO_ROOT,
        env=gandalf_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "ModuleNotFoundError" in result.stderr or "Permission denied" in result.stderr:
        pytest.skip(f"the non-root user cannot run this checkout: {result.stderr[-200:]}")
    assert result.returncode == cli.EXIT_FAILURE
    assert result.stderr.count("\n") == 1
    assert f"database.dsn: cannot create database {locked_dir / 'g.db'}: " in result.stderr
    assert f"directory {locked_dir} is not writable by uid" in result.stderr


# ------------------------------------------------------------------ keys create / list


def test_keys_create_refuses_an_unknown_model(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _create(config, "--name", "a", "--models", "smart,gpt-5") == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--models: no route or provider serves 'gpt-5'" in err and "smart" in err
    # Route aliases and provider models are both known.
    assert _create(config, "--name", "a", "--models", "smart, fake-model") == 0


def test_keys_create_accepts_any_model_when_a_provider_lists_them_at_run_time(
    tmp_path: Path,
) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(
        f"database: {{dsn: {tmp_path / 'g.db'}}}\nproviders: [{{name: ollama}}]\n", "utf-8"
    )
    assert _create(str(path), "--name", "a", "--models", "llama3.2") == 0


def test_keys_create_refuses_a_duplicate_active_name(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _create(config, "--name", "ci") == 0
    key_id = capsys.readouterr().err.split()[2]
    assert _create(config, "--name", "ci") == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "An active key named 'ci' already exists" in err and key_id in err
    assert cli.main(["orgs", "create", "other", "--config", config]) == 0
    assert _create(config, "--name", "ci", "--org", "other") == 0  # names are per organization
    # Once the old key is revoked, its name can be reused.
    assert cli.main(["keys", "revoke", "--config", config, key_id]) == 0
    assert _create(config, "--name", "ci") == 0


def test_keys_list_shows_models_expiry_and_source(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _create(config, "--name", "scoped", "--models", "smart", "--expires-in", "1d") == 0
    assert _create(config, "--name", "open") == 0
    capsys.readouterr()
    assert cli.main(["keys", "list", "--config", config]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[-3:] == ["EXPIRES", "SOURCE", "MODELS"]
    scoped = next(r for r in rows if " scoped " in r).split()
    opened = next(r for r in rows if " open " in r).split()
    assert scoped[-1] == "smart" and scoped[-2] == "cli" and scoped[-3].endswith("Z")
    assert opened[-3:] == ["never", "cli", "all"]


def test_keys_list_shows_a_key_the_admin_api_blocked(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    import msgspec

    from gandalf.config import load_config
    from gandalf.storage.sqlite import SqliteStore

    assert _create(config, "--name", "paused") == 0

    async def block() -> None:
        store = SqliteStore(load_config(config).database.dsn)
        await store.open()
        try:
            [key] = [k for k in await store.list_keys() if k.name == "paused"]
            assert await store.update_key(msgspec.structs.replace(key, blocked=True))
        finally:
            await store.close()

    asyncio.run(block())
    capsys.readouterr()
    assert cli.main(["keys", "list", "--config", config]) == 0
    row = next(r for r in capsys.readouterr().out.splitlines() if " paused " in r)
    assert " blocked " in row
