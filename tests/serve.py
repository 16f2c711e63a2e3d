"""Run a real ``gandalf serve`` subprocess (granian and all) for end-to-end tests.

:class:`GandalfServer` writes a config into a temporary directory, starts
``python -m gandalf serve --config PATH`` from the repository root with an
environment the test controls, waits until ``GET /healthz`` answers 200, and
always stops the process again (SIGTERM, then SIGKILL of its own process group
when it does not exit in time). stdout and stderr go to files so a test can
read the start-up banner (the first admin key) and error lines.

:func:`run_cli` runs one-shot commands (``gandalf keys ...``, refused starts)
with a bounded timeout.

Waiting is always "poll a condition until a deadline" (:func:`wait_until`),
never a bare sleep.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
PORT_PLACEHOLDER = "__PORT__"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0
CLI_TIMEOUT = 30.0
_KEY = re.compile(r"gnd_[A-Za-z0-9_-]{20,128}")
_POLL_INTERVAL = 0.02


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; ``AssertionError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(_POLL_INTERVAL)


def gandalf_env(
    overrides: Mapping[str, str] | None = None, unset: Iterable[str] = ()
) -> dict[str, str]:
    """``os.environ`` without ``GANDALF_*``, ``OPENAI_API_KEY`` and the names in ``unset``,
    plus ``overrides``."""
    drop = {"OPENAI_API_KEY", *unset}
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("GANDALF_") and name not in drop
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides or {})
    return env


def gandalf_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "gandalf", *args]


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    unset: Iterable[str] = (),
    timeout: float = CLI_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """``python -m gandalf ARGS`` from the repository root; output captured as text.

    ``env`` and ``unset`` go to :func:`gandalf_env`. Raises ``TimeoutExpired``
    (after killing the process) when it runs longer than ``timeout`` seconds.
    """
    return subprocess.run(
        gandalf_command(*args),
        cwd=REPO_ROOT,
        env=gandalf_env(env, unset),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def render_config(config: str | Mapping[str, Any], port: int, tmp: Path) -> str:
    """YAML text for ``config`` listening on ``port``.

    Text has every ``__PORT__`` replaced. A mapping gets ``server.addr`` (when absent)
    and ``database.dsn`` (a file in ``tmp``, when absent) filled in, then is dumped.
    """
    if isinstance(config, str):
        return config.replace(PORT_PLACEHOLDER, str(port))
    data: dict[str, Any] = dict(config)
    server = dict(data.get("server") or {})
    server.setdefault("addr", f"127.0.0.1:{port}")
    data["server"] = server
    database = dict(data.get("database") or {})
    database.setdefault("dsn", str(tmp / "gandalf.db"))
    data["database"] = database
    rendered: str = yaml.safe_dump(data, sort_keys=False)
    return rendered.replace(PORT_PLACEHOLDER, str(port))


class GandalfServer:
    """A ``gandalf serve`` subprocess on 127.0.0.1. Use as a context manager.

    ``config`` is YAML text (``__PORT__`` stands for the port) or a mapping (see
    :func:`render_config`). ``env`` and ``unset`` go to :func:`gandalf_env`.
    Files live in ``tmp`` as ``NAME.yaml``, ``NAME.stdout`` and ``NAME.stderr``.
    """

    def __init__(
        self,
        tmp: Path,
        config: str | Mapping[str, Any],
        *,
        env: Mapping[str, str] | None = None,
        unset: Iterable[str] = (),
        name: str = "gandalf",
        port: int | None = None,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        self.tmp = tmp
        self.port = port if port is not None else free_port()
        self.config_path = tmp / f"{name}.yaml"
        self.config_path.write_text(render_config(config, self.port, tmp), encoding="utf-8")
        self.stdout_path = tmp / f"{name}.stdout"
        self.stderr_path = tmp / f"{name}.stderr"
        self.env = gandalf_env(env, unset)
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    # ------------------------------------------------------------------ addresses

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI SDK's ``base_url`` should be."""
        return f"{self.url}/v1"

    # ------------------------------------------------------------------ output

    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def printed_keys(self) -> list[str]:
        """Distinct ``gnd_`` keys in stdout, in order (the banner's first admin key)."""
        seen: list[str] = []
        for key in _KEY.findall(self.stdout()):
            if key not in seen:
                seen.append(key)
        return seen

    def diagnostics(self) -> str:
        return f"--- stdout\n{self.stdout()}\n--- stderr\n{self.stderr()}"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> GandalfServer:
        """Start the process and wait until /healthz answers 200 (or fail, showing stderr)."""
        assert self.process is None, "already started"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                gandalf_command("serve", "--config", str(self.config_path)),
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group: granian's workers included
            )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ready(self) -> None:
        process = self.process
        assert process is not None
        deadline = time.monotonic() + self.ready_timeout
        with httpx.Client(timeout=1.0) as client:
            while True:
                code = process.poll()
                if code is not None:
                    raise AssertionError(
                        f"gandalf serve exited with {code} before it was ready\n"
                        + self.diagnostics()
                    )
                try:
                    if client.get(f"{self.url}/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"gandalf serve not ready after {self.ready_timeout:g}s\n"
                        + self.diagnostics()
                    )
                time.sleep(_POLL_INTERVAL)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send_sigterm(self) -> None:
        """Ask for a graceful stop and return at once (see :meth:`wait`)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """The exit code; after ``timeout`` seconds the process group is killed (code < 0)."""
        process = self.process
        assert process is not None
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = process.wait(10)
        self.returncode = code
        return code

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then the exit code (bounded wait; killed on timeout)."""
        self.send_sigterm()
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL this server's own process group (the main process and its workers).

        Only while the main process has not been reaped: until then its pid, which is
        the group's id, cannot belong to anyone else.
        """
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)

    def __enter__(self) -> GandalfServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.running:
            self.terminate()


def scenario_providers(
    base_url: str, dead_port: int, secret: str, unset_var: str
) -> list[dict[str, Any]]:
    """The providers the end-to-end modules route their scenarios to: ``fake``; ``up``
    (the mock upstream at ``base_url``); ``dead`` (``dead_port`` refuses connections);
    ``slow`` (the mock with a 300 ms timeout); ``nokey`` (disabled: its key is the
    unset ``unset_var``)."""
    return [
        {"name": "fake", "type": "fake"},
        {"name": "up", "type": "openai", "base_url": base_url, "api_key": secret},
        {
            "name": "dead",
            "type": "openai",
            "base_url": f"http://127.0.0.1:{dead_port}/v1",
            "api_key": "sk-dead",
        },
        {
            "name": "slow",
            "type": "openai",
            "base_url": base_url,
            "api_key": secret,
            "timeout_ms": 300,
        },
        {
            "name": "nokey",
            "type": "openai",
            "base_url": base_url,
            "api_key": "${" + unset_var + "}",
        },
    ]


def route(alias: str, provider: str, model: str) -> dict[str, Any]:
    """A config route sending ``alias`` to one target."""
    return {"model_alias": alias, "targets": [{"provider": provider, "model": model}]}


def native_providers(
    anthropic_url: str,
    gemini_url: str,
    openai_root: str,
    secrets: tuple[str, str, str] = ("sk-ant", "gemini-key", "azure-key"),
) -> list[dict[str, Any]]:
    """One provider per native API, each at its mock: ``claude`` (Anthropic at
    ``anthropic_url``), ``gem`` (Gemini at ``gemini_url``), ``az`` (Azure OpenAI)
    and ``local`` (Ollama), both at the OpenAI mock's ``openai_root``.
    ``secrets``: the Anthropic, Gemini and Azure api_keys."""
    anthropic_key, gemini_key, azure_key = secrets
    return [
        {
            "name": "claude",
            "type": "anthropic",
            "base_url": anthropic_url,
            "api_key": anthropic_key,
        },
        {"name": "gem", "type": "gemini", "base_url": gemini_url, "api_key": gemini_key},
        {"name": "az", "type": "azure", "base_url": openai_root, "api_key": azure_key},
        {"name": "local", "type": "ollama", "base_url": openai_root, "models": ["unused"]},
    ]


# Routes to the mocks' well-behaved models, one per native provider.
NATIVE_ROUTES = (
    route("claude", "claude", "claude-ok"),
    route("gemini", "gem", "gemini-ok"),
    route("az-chat", "az", "ok-model"),
    route("ol-chat", "local", "stream-2"),
)
