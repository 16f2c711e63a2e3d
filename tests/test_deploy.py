"""Containerfile and container entry: non-root, health-checked, pinned, no secret in logs.

Images cannot be pulled or built on the test machines, so the Containerfile is read
as text, and what it runs is run directly: ``gandalf serve`` as a non-root user (the
image's situation) with the environment the Containerfile sets, against a temporary
``/data``, and ``python -m gandalf.healthcheck`` against servers that are and are not ready.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gandalf import healthcheck
from tests.serve import REPO_ROOT, free_port, gandalf_env, wait_until

CONTAINERFILE = (REPO_ROOT / "Containerfile").read_text(encoding="utf-8")
_KEY = re.compile(r"gnd_[A-Za-z0-9_-]{20,128}")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_base_image_is_pinned_to_a_patch_release() -> None:
    (base,) = [args for word, args in _instructions() if word == "FROM"]
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base


def test_it_runs_as_a_numeric_non_root_user_owning_data() -> None:
    users = [args for word, args in _instructions() if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert users[-1].split(":")[0].isdigit()  # runAsNonRoot can only check a number
    uid = users[-1].split(":")[0]
    run = " ".join(args for word, args in _instructions() if word == "RUN")
    assert f"chown {uid}:" in run and "/data" in run


def test_it_has_a_healthcheck_on_readyz_without_curl() -> None:
    (check,) = [args for word, args in _instructions() if word == "HEALTHCHECK"]
    assert "gandalf.healthcheck" in check and "curl" not in check
    assert "/readyz" in (REPO_ROOT / "gandalf" / "healthcheck.py").read_text(encoding="utf-8")


def test_the_source_is_copied_once_and_no_secret_is_baked_in() -> None:
    copies = [args for word, args in _instructions() if word in ("COPY", "ADD")]
    assert len(copies) == 1, copies
    ignore = (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert ignore[ignore.index("*") + 1 :], "the context is an allow-list"
    assert not any(p in ignore for p in ("!tests/", "!bench/", "!.git", "!.venv"))
    envs = " ".join(args for word, args in _instructions() if word in ("ENV", "ARG"))
    assert not re.search(r"(API_KEY|ADMIN_KEY|SECRET|TOKEN|PASSWORD)\w*=", envs), envs
    assert not _KEY.search(CONTAINERFILE)


def test_port_and_config_come_from_the_environment() -> None:
    envs = " ".join(args for word, args in _instructions() if word == "ENV")
    for name in (
        "GANDALF_ADDR=",
        "GANDALF_CONFIG=",
        "GANDALF_DB=/data/",
        "GANDALF_FIRST_KEY_FILE=",
    ):
        assert name in envs
    (cmd,) = [args for word, args in _instructions() if word == "CMD"]
    assert cmd.startswith("[") and "8080" not in cmd  # exec form: gandalf is PID 1


# ------------------------------------------------------------------ the entry, as non-root


def _drop_to_nobody() -> list[str]:
    """The command prefix that runs as uid/gid 65534, or skip saying why not."""
    if os.getuid() != 0:  # already unprivileged: run as we are
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot drop to a non-root user")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: that is private to the test runner's user.
    root = Path(tempfile.mkdtemp(prefix="gandalf-deploy-"))
    try:
        root.chmod(0o755)
        data = root / "data"
        data.mkdir(mode=0o700)
        if os.getuid() == 0:
            os.chown(data, 65534, 65534)
        yield data
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_first_key_goes_to_a_private_file_and_never_to_the_log(data_dir: Path) -> None:
    prefix = _drop_to_nobody()
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", f"import gandalf; open({str(data_dir / 'p')!r}, 'w')"],
        cwd=REPO_ROOT,
        env=gandalf_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"the non-root user cannot run this checkout: {probe.stderr.strip()[-200:]}")
    (data_dir / "p").unlink()
    port = free_port()
    key_file = data_dir / "first-admin-key"
    env = gandalf_env(
        {
            "GANDALF_ADDR": f"127.0.0.1:{port}",
            "GANDALF_CONFIG": str(REPO_ROOT / "gandalf.yaml"),
            "GANDALF_DB": str(data_dir / "gandalf.db"),
            "GANDALF_FIRST_KEY_FILE": str(key_file),
        }
    )
    out, err = data_dir.parent / "stdout", data_dir.parent / "stderr"
    with out.open("wb") as o, err.open("wb") as e:
        process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "gandalf", "serve"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=o,
            stderr=e,
            start_new_session=True,
        )
    try:

        def ready() -> bool:
            assert process.poll() is None, out.read_text() + err.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 20, "gandalf serve (non-root) to be ready")
        key = key_file.read_text(encoding="utf-8").strip()
        assert _KEY.fullmatch(key)
        info = key_file.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600
        if prefix:
            assert info.st_uid == 65534
        logs = out.read_text(encoding="utf-8") + err.read_text(encoding="utf-8")
        assert not _KEY.search(logs), logs
        assert str(key_file) in logs  # it says where the key is
        # The key in the file is a working admin key.
        answer = httpx.get(
            f"http://127.0.0.1:{port}/v1/models",
            headers={"Authorization": f"Bearer {key}"},
            timeout=5,
        )
        assert answer.status_code == 200
        assert healthcheck.main(env={"GANDALF_ADDR": f"0.0.0.0:{port}"}) == 0
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


# ------------------------------------------------------------------ the healthcheck


class _Status(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        assert self.path == "/readyz"
        self.send_response(self.status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize(("status", "code"), [(200, 0), (503, 1)])
def test_healthcheck_exits_by_readyz(status: int, code: int) -> None:
    handler = type("H", (_Status,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert healthcheck.main(env={"GANDALF_ADDR": f"0.0.0.0:{port}"}) == code
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_healthcheck_fails_when_nothing_listens(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # bound, never listening: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert healthcheck.main(env={"GANDALF_ADDR": f"127.0.0.1:{port}"}) == 1
    assert capsys.readouterr().err.startswith("gandalf healthcheck: not ready")


def test_healthcheck_asks_wildcards_on_their_loopback() -> None:
    assert healthcheck.ready_url({"GANDALF_ADDR": "0.0.0.0:9000"}) == "http://127.0.0.1:9000/readyz"
    assert healthcheck.ready_url({"GANDALF_ADDR": "[::]:9000"}) == "http://[::1]:9000/readyz"
    assert healthcheck.ready_url({}) == "http://127.0.0.1:8080/readyz"
