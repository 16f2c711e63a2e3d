"""A redis-server of a test's own, on a free port, that the test may stop and
start again (the shared one of ``.ci/services`` must never be stopped).

Skips (fails in CI) like tests/services.py when redis-server is absent.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path
from types import TracebackType

import pytest

from tests.serve import free_port, wait_until

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        try:
            probe.connect(("127.0.0.1", port))
        except OSError:
            return False
        probe.sendall(b"PING\r\n")
        try:
            return probe.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class OwnRedis:
    """``redis-server`` on 127.0.0.1:``port`` (no persistence), in ``tmp``."""

    def __init__(self, tmp: Path, port: int | None = None) -> None:
        if not os.path.exists(REDIS_SERVER):
            message = f"redis-server is not installed ({REDIS_SERVER}): apt-get install it"
            if os.environ.get("GANDALF_TEST_SERVICES_REQUIRED") == "1":
                pytest.fail(message + " (required in CI)", pytrace=False)
            pytest.skip(message)
        self.tmp = tmp
        self.port = port if port is not None else free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> OwnRedis:
        assert self.process is None
        command = [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port)]
        command += ("--save", "", "--appendonly", "no", "--dir", str(self.tmp))
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(lambda: _accepts(self.port), 10, f"redis-server on port {self.port}")
        return self

    def kill(self) -> None:
        """Stop it at once (SIGKILL: a crash, not a shutdown)."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait(10)
        wait_until(lambda: not _accepts(self.port), 10, f"redis-server on {self.port} to stop")

    def __enter__(self) -> OwnRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
