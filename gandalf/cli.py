"""Command line: ``gandalf serve``, ``gandalf keys create|list|revoke`` and
``gandalf orgs|teams create|list|delete``, ``gandalf usage``, ``gandalf bench``
(benchkit/: a load generator for any OpenAI-compatible endpoint).

Exit codes scripts can rely on: 0 success, 1 runtime failure (database,
port, server), 2 bad usage or bad configuration (including a refused delete),
3 not found (``keys revoke``, ``orgs|teams delete``).
Errors are one line on stderr, prefixed ``gandalf: error:``.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gandalf import __version__
from gandalf.app import timespec
from gandalf.app.governor import ENV_WORKERS
from gandalf.auth.session import share_secret
from gandalf.benchkit.options import add_parser as add_bench_parser
from gandalf.config import (
    POSTGRES_SCHEMES,
    GandalfConfig,
    default_config_path,
    load_config,
    split_addr,
)
from gandalf.domain import (
    BUDGET_PERIODS,
    USAGE_GROUPS,
    Budget,
    Organization,
    Team,
    UsageSummary,
    is_glob,
)
from gandalf.errors import ConfigError, GatewayError
from gandalf.observability.metrics import ENV_METRICS_DIR, serve_metrics
from gandalf.storage.protocol import StorageError, Store, TenantInUse

if TYPE_CHECKING:
    from gandalf.wiring import WorkerLoader

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
# Set (by the Containerfile) to write the first-start admin key to this file
# instead of printing it: container logs are collected and shipped.
FIRST_KEY_FILE_ENV = "GANDALF_FIRST_KEY_FILE"
RESPAWN_INTERVAL = 3.5  # seconds (granian's default), see _serve

logger = logging.getLogger("gandalf")

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_LIFETIME = 100 * 366 * 86400  # seconds: "100 years", leap days included
_MAX_DIGITS = 12
# C0 and C1 controls and DEL: what a terminal would act on instead of showing.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


_CONFIG_HELP = "config file (default: $GANDALF_CONFIG, ./gandalf.yaml)"


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gandalf", description="Gandalf LLM gateway")
    parser.add_argument("--version", action="version", version=f"gandalf {__version__}")
    parser.add_argument("--config", default=None, help=_CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve the gateway on granian")
    # SUPPRESS: a subcommand's --config, when not given, leaves the one given before it.
    serve.add_argument("--config", default=argparse.SUPPRESS, help=_CONFIG_HELP)
    serve.add_argument(
        "--addr",
        help="HOST:PORT or [IPv6]:PORT to listen on (default: $GANDALF_ADDR, else server.addr)",
    )
    serve.add_argument("--host", help="host to listen on (overrides server.addr's host)")
    serve.add_argument("--port", type=int, help="port to listen on (overrides server.addr's port)")
    serve.add_argument("--workers", type=int, help="worker processes (default: server.workers, 1)")
    serve.add_argument("--no-access-log", action="store_true", help="switch the access log off")
    serve.add_argument(
        "--interface",
        choices=["asgi", "rsgi"],
        help="granian interface (default: server.interface, asgi); rsgi is faster",
    )

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_sub.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True)
    create.add_argument(
        "--role", default="member", choices=["admin", "member", "viewer", "service_account"]
    )
    create.add_argument(
        "--org", default=None, help="organization id (default: the team's, else 'default')"
    )
    create.add_argument("--team", default=None, help="team id (see `gandalf teams`)")
    create.add_argument(
        "--models",
        "--allowed-models",
        dest="models",
        default=None,
        help="comma-separated model aliases the key may use, globs allowed (default: all)",
    )
    create.add_argument("--expires-in", default=None, help="lifetime, e.g. 30d, 12h, 2w")
    _limit_options(create, "the key's own")
    list_ = keys_sub.add_parser("list", help="list keys (never their secrets)")
    list_.add_argument("--org", default=None)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("id")
    commands = [create, list_, revoke]
    for kind in ("orgs", "teams"):
        one = kind[:-1]
        tenants = sub.add_parser(kind, help=f"manage {'organizations' if one == 'org' else kind}")
        actions = tenants.add_subparsers(dest="tenant_command", required=True, metavar="ACTION")
        t_create = actions.add_parser("create", help=f"create a{'n' if one == 'org' else ''} {one}")
        t_create.add_argument("id")
        t_create.add_argument("--name", default=None, help="display name (default: the id)")
        if kind == "teams":
            t_create.add_argument("--org", default="default", help="its organization id")
        t_create.add_argument(
            "--allowed-models",
            default=None,
            help="comma-separated model aliases its keys may use, globs allowed (default: all)",
        )
        _limit_options(t_create, "shared by all its keys:")
        t_list = actions.add_parser("list", help=f"list {kind} and their limits")
        if kind == "teams":
            t_list.add_argument("--org", default=None)
        t_delete = actions.add_parser("delete", help=f"delete a{'n' if one == 'org' else ''} {one}")
        t_delete.add_argument("id")
        commands += [t_create, t_list, t_delete]
    for p in commands:
        p.add_argument("--config", default=argparse.SUPPRESS, help=_CONFIG_HELP)

    usage = sub.add_parser("usage", help="usage and cost, summed per key, team, org, ...")
    usage.add_argument("--config", default=argparse.SUPPRESS, help=_CONFIG_HELP)
    usage.add_argument(
        "--by", default="model", choices=USAGE_GROUPS, help="what to sum per (default: model)"
    )
    usage.add_argument(
        "--since", default="7d", help="how far back: 30m, 24h, 7d, 2w, or all (default: 7d)"
    )
    usage.add_argument("--json", action="store_true", help="a JSON list of objects instead")

    add_bench_parser(sub)  # gandalf bench: benchkit/options.py
    return parser


def _limit_options(parser: argparse.ArgumentParser, whose: str) -> None:
    """--rpm, --tpm, --budget-usd, --budget-period, read as text and checked by
    :func:`_limits` (one-line errors, exit 2, instead of argparse's usage dump)."""
    parser.add_argument("--rpm", default=None, help=f"{whose} requests per minute (0: unlimited)")
    parser.add_argument("--tpm", default=None, help=f"{whose} tokens per minute (0: unlimited)")
    parser.add_argument("--budget-usd", default=None, help=f"{whose} spending limit in USD")
    parser.add_argument(
        "--budget-period",
        default=None,
        help=f"budget period: {', '.join(BUDGET_PERIODS)} (UTC; default monthly)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":  # a client: no config, no database
        from gandalf.benchkit.cli import main as bench_main

        return bench_main(args)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command in ("orgs", "teams"):
            return asyncio.run(_tenants(args))
        if args.command == "usage":
            return asyncio.run(_usage(args))
        return asyncio.run(_keys(args))
    except CliError as exc:
        print(f"gandalf: error: {exc}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        print(f"gandalf: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


def _load(path_arg: str | None) -> GandalfConfig:
    path = path_arg or default_config_path(os.environ)
    return load_config(path)


async def _open_store(config: GandalfConfig) -> Store:
    # The composition root picks the backend (database.dsn); imported here, not
    # at the top, because ``gandalf --help`` and friends need none of it.
    from gandalf.wiring import make_store

    store = make_store(config, server=False)
    try:
        await store.open()
    except Exception as exc:
        raise CliError(
            f"{config.source}: database.dsn: {_database_problem(config.database.dsn, exc)}"
        ) from None
    return store


def _database_problem(dsn: str, exc: Exception) -> str:
    """Why ``dsn`` cannot be opened, in words an operator can act on (one line)."""
    import sqlite3

    if dsn.startswith(POSTGRES_SCHEMES):  # the store's message names the server, no password
        return _one_line(str(exc))
    if dsn != ":memory:" and not dsn.startswith("file:"):
        folder = os.path.dirname(dsn) or "."
        if not os.path.isdir(folder):
            return f"cannot open database {dsn}: directory {folder} does not exist"
        if not os.path.exists(dsn) and not os.access(folder, os.W_OK | os.X_OK):
            return (
                f"cannot create database {dsn}: directory {folder} is not writable "
                f"by uid {os.getuid()}"
            )
        if os.path.exists(dsn) and not os.access(dsn, os.R_OK | os.W_OK):
            return f"cannot open database {dsn}: not readable and writable by uid {os.getuid()}"
    cause = exc.__cause__
    if isinstance(cause, sqlite3.Error):  # the StorageError's own text names the path again
        return f"cannot open database {dsn}: {cause}"
    return _one_line(str(exc))


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------- serve


def _serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    host, port = config.server.host, config.server.port
    addr, option = args.addr, "--addr"
    if addr is None and os.environ.get("GANDALF_ADDR"):
        addr, option = os.environ["GANDALF_ADDR"], "GANDALF_ADDR"
    if addr is not None:
        try:
            host, port = split_addr(addr)
        except ValueError as exc:
            raise CliError(f"{option}: {exc}", EXIT_USAGE) from None
    if args.host:
        host = args.host
    if args.port is not None:
        port = args.port
    if not 0 < port < 65536:
        raise CliError(f"port must be 1-65535, got {port}", EXIT_USAGE)
    workers = args.workers if args.workers is not None else config.server.workers
    if workers < 1:
        raise CliError("--workers must be at least 1", EXIT_USAGE)
    access_log = config.server.access_log and not args.no_access_log

    from gandalf.wiring import WorkerLoader, configure_logging

    # bootstrap's lines (revoked keys) and reload problems
    configure_logging(config.log.level, config.log.format)
    _check_port(host, port)  # before a first admin key is made and shown
    key_file = os.environ.get(FIRST_KEY_FILE_ENV) or None
    if key_file is not None:
        _check_key_file(key_file)  # before the key exists: a key nobody can read is lost
    admin_key = asyncio.run(_prepare(config))
    if admin_key and key_file is not None:
        _write_key_file(key_file, admin_key)
    for warning in config.warnings:
        print(f"gandalf: warning: {warning}", file=sys.stderr)
    interface: str = args.interface or config.server.interface
    _banner(config, host, port, workers, interface, admin_key, key_file)

    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.http import HTTP1Settings
    from granian.server import Server

    path = str(Path(config.source).resolve())
    os.environ["GANDALF_CONFIG"] = path
    os.environ["GANDALF_ACCESS_LOG"] = "1" if access_log else "0"
    # Each worker enforces 1/workers of every rate limit and budget (app/governor.py).
    os.environ[ENV_WORKERS] = str(workers)
    # One web UI session secret for every worker of this start (gandalf/auth/session.py);
    # an operator's own (64+ hex digits) keeps sessions across restarts.
    share_secret(os.environ)
    loader = WorkerLoader(
        config, interface=interface, access_log=False if args.no_access_log else None
    )
    reloader = _Reloader(path, loader)

    class _Server(Server):  # type: ignore[valid-type,misc]  # granian picks MP/MT at import
        def signal_handler_reload(self, *args: object, **kwargs: object) -> None:
            # Runs in the main thread on SIGHUP: a broken file never reaches the workers.
            if reloader.check():
                super().signal_handler_reload(*args, **kwargs)

    server = _Server(
        "gandalf.wiring:rsgi_worker_app" if interface == "rsgi" else "gandalf.wiring:worker_app",
        address=host,
        port=port,
        interface=Interfaces.RSGI if interface == "rsgi" else Interfaces.ASGI,
        websockets=False,
        workers=workers,
        loop=Loops.uvloop,
        factory=True,
        log_access=False,
        backlog=2048,
        # HTTP/1.1 only: in "auto" mode granian first waits, without any timeout,
        # for the bytes that tell HTTP/1 from HTTP/2, so a connection that never
        # sends one stayed open forever. In HTTP/1 mode header_read_timeout covers
        # that wait too, and the idle wait between keep-alive requests.
        http=HTTPModes.http1,
        http1_settings=HTTP1Settings(header_read_timeout=int(config.server.read_timeout * 1000)),
        workers_kill_timeout=int(config.server.shutdown_timeout) + 5,
        # A worker that dies is replaced instead of taking the others down with
        # it; granian still exits on a crash loop (a respawned worker dying
        # within 5.5 s). The interval is how long a reload runs old and new
        # workers side by side.
        respawn_failed_workers=True,
        respawn_interval=RESPAWN_INTERVAL,
    )
    server.on_reload(reloader.apply)
    metrics_dir = None
    scrapes = None
    if config.server.metrics:
        # Where the workers' metric snapshots meet (gandalf/observability/metrics.py).
        metrics_dir = tempfile.mkdtemp(prefix="gandalf-metrics-")
        os.environ[ENV_METRICS_DIR] = metrics_dir
        if config.server.metrics_addr:
            metrics_host, metrics_port = split_addr(config.server.metrics_addr)
            try:
                scrapes = serve_metrics(
                    metrics_host,
                    metrics_port,
                    metrics_dir,
                    key_id=config.server.metrics_key_id,
                )
            except OSError as exc:
                shutil.rmtree(metrics_dir, ignore_errors=True)
                raise CliError(
                    f"server.metrics_addr {config.server.metrics_addr}: cannot listen: "
                    f"{exc.strerror or exc}",
                    EXIT_USAGE,
                ) from None
    try:
        server.serve(target_loader=loader)
    finally:
        if scrapes is not None:
            scrapes.shutdown()
            scrapes.server_close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return EXIT_OK


class _Reloader:
    """SIGHUP for ``gandalf serve``: re-read the config file; apply it only if it is valid.

    :meth:`check` runs in the SIGHUP handler: it loads and validates the file, and
    on a problem logs one ``file: key.path: problem`` line and returns False (granian
    then does not reload at all). :meth:`apply` runs as granian's reload hook in the
    main loop, before the workers are replaced: it reconciles providers, routes and
    keys into the database, then hands the config to the :class:`WorkerLoader`. If
    the database step fails, the loader keeps the running config (the workers are
    replaced with it unchanged). Listener settings (``server.addr``, ``workers``,
    ``interface``, ``read_timeout``) are granian's and need a restart.
    """

    def __init__(self, path: str, loader: WorkerLoader) -> None:
        self._path = path
        self._loader = loader
        self._pending: GandalfConfig | None = None

    def check(self) -> bool:
        try:
            self._pending = load_config(self._path)
        except ConfigError as exc:
            logger.error("config reload refused, still serving the previous config: %s", exc)
            return False
        except Exception as exc:  # raising here would unwind granian's main loop
            logger.error(
                "config reload refused, still serving the previous config: %s: %s",
                self._path,
                f"unexpected {type(exc).__name__}: {exc}",
            )
            return False
        return True

    def apply(self) -> None:
        # _pending is read, never cleared: a SIGHUP landing in the middle of this
        # method can then only leave a newer config for the reload it triggers.
        config = self._pending
        if config is None or config is self._loader.config:
            return
        try:
            asyncio.run(_reconcile(config))
        except Exception as exc:  # the running config stays; say why, in one line
            logger.error("config reload failed, still serving the previous config: %s", exc)
            return
        running = self._loader.config.server
        for name in ("addr", "workers", "interface", "read_timeout"):
            if getattr(running, name) != getattr(config.server, name):
                logger.warning(
                    "%s: server.%s: changed; takes effect at the next restart", self._path, name
                )
        for warning in config.warnings:
            logger.warning("%s", warning)
        self._loader.config = config
        logger.info("config reloaded from %s; replacing the workers", self._path)


async def _reconcile(config: GandalfConfig) -> None:
    from gandalf import bootstrap

    store = await _open_store(config)
    try:
        await bootstrap.reconcile(store, config)
    finally:
        await store.close()


async def _prepare(config: GandalfConfig) -> str | None:
    """Reconcile config into the DB once, before workers start; the first admin
    key (if one had to be made) is returned for the banner."""
    from gandalf import bootstrap

    store = await _open_store(config)
    try:
        await bootstrap.reconcile(store, config)
        return await bootstrap.first_admin_key(store)
    finally:
        await store.close()


def _banner(
    config: GandalfConfig,
    host: str,
    port: int,
    workers: int,
    interface: str,
    admin_key: str | None,
    key_file: str | None = None,
) -> None:
    """Print what is being served; the first admin key, or where it was written."""
    url_host = f"[{host}]" if ":" in host else host
    enabled = [p.name for p in config.providers if p.enabled]
    disabled = [
        f"{p.name} ({p.disabled_reason or 'disabled'})" for p in config.providers if not p.enabled
    ]
    lines = [
        f"gandalf {__version__} serving on http://{url_host}:{port}/v1",
        f"  config:    {config.source}",
        f"  database:  {config.database.dsn}",
        f"  providers: {', '.join(enabled) or 'none'}"
        + (f"; disabled: {', '.join(disabled)}" if disabled else ""),
        f"  routes:    {', '.join(r.model_alias for r in config.routes) or 'none'}",
        f"  workers:   {workers} ({interface})",
    ]
    if admin_key and key_file:
        lines += [
            "",
            f"  First start: created an admin API key and wrote it to {key_file} (mode 0600).",
            "  It is not printed: logs are kept and shipped. Read it once with:",
            f"    cat {key_file}",
        ]
    elif admin_key:
        lines += [
            "",
            "  First start: created an admin API key. It is shown only this once:",
            f"    {admin_key}",
            f"  Try: curl http://{url_host}:{port}/v1/chat/completions \\",
            f"         -H 'Authorization: Bearer {admin_key}' \\",
            "         -H 'content-type: application/json' \\",
            '         -d \'{"model":"fake-model","messages":[{"role":"user","content":"hi"}]}\'',
        ]
    print("\n".join(lines), flush=True)


def _check_key_file(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise CliError(
            f"{FIRST_KEY_FILE_ENV}: cannot write {path}: directory {folder} is missing "
            f"or not writable by uid {os.getuid()}"
        )


def _write_key_file(path: str, key: str) -> None:
    """Write ``key`` to ``path``, readable by its owner only (created 0600, never a symlink)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
            os.write(fd, (key + "\n").encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise CliError(
            f"{FIRST_KEY_FILE_ENV}: created the first admin key but cannot write it to "
            f"{path}: {exc.strerror}; create another with `gandalf keys create --role admin`"
        ) from None


def _check_port(host: str, port: int) -> None:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise CliError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


# ---------------------------------------------------------------------------- keys


def _expires(text: str | None, now: float) -> float | None:
    """``now`` plus the ``--expires-in`` duration; at most :data:`MAX_LIFETIME` seconds."""
    if text is None:
        return None
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise CliError(f"--expires-in must look like 30d, 12h or 2w, got {text!r}", EXIT_USAGE)
    # Digit counts are capped before int(): a 5000-digit number would raise ValueError.
    if any(len(n) > _MAX_DIGITS for n, _ in parts) or (
        sum(int(n) * _UNIT[u] for n, u in parts) > MAX_LIFETIME
    ):
        raise CliError(f"--expires-in must be at most 100 years, got {_shown(text)}", EXIT_USAGE)
    return now + sum(int(n) * _UNIT[u] for n, u in parts)


def _shown(text: str) -> str:
    """``text`` quoted for one line of terminal output: control characters escaped."""
    return repr(text) if len(text) <= 40 else repr(text[:37] + "...")


def _safe(text: str | None) -> str:
    """``text`` with control characters (escape sequences, CR, BEL...) made visible."""
    if text is None:
        return "-"
    return _CONTROL.sub(_escape_control, text)


def _escape_control(match: re.Match[str]) -> str:
    char = match.group(0)
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or f"\\x{ord(char):02x}"


async def _check_models(config: GandalfConfig, store: Store, models: list[str]) -> None:
    """Refuse a ``--models`` name no route or provider serves: a typo would make a key
    that is refused on every request. Names are the config's and the database's route
    aliases and provider models; a provider that lists its models at run time (Ollama
    with no ``models``) could serve any name, so then nothing is refused."""
    if not models:
        raise CliError("--models needs at least one model alias", EXIT_USAGE)
    for model in models:
        if _CONTROL.search(model):
            raise CliError(
                f"--models must not contain control characters, got {_shown(model)}", EXIT_USAGE
            )
    providers = [*config.providers, *await store.list_providers()]
    if any(p.type == "ollama" and not p.models for p in providers):
        return
    known = {r.model_alias for r in config.routes}
    known.update(r.model_alias for r in await store.list_routes())
    known.update(m for p in providers for m in p.models)
    # A glob must match something known; an exact name must be known.
    unknown = [
        m
        for m in models
        if m not in known and not (is_glob(m) and any(fnmatch.fnmatchcase(k, m) for k in known))
    ]
    if unknown:
        shown = ", ".join(_shown(m) for m in unknown)
        some = ", ".join(sorted(known)[:10]) + (", ..." if len(known) > 10 else "")
        raise CliError(
            f"--models: no route or provider serves {shown} (known: {some or 'none'}); "
            f"add the route to {config.source} first",
            EXIT_USAGE,
        )


async def _keys(args: argparse.Namespace) -> int:
    from gandalf.app.keys import KeyManager

    config = _load(args.config)
    store = await _open_store(config)
    try:
        manager = KeyManager(store)
        if args.keys_command == "create":
            await _declare_tenants(config, store)
        if args.keys_command == "create":
            named = (("--name", args.name), ("--org", args.org), ("--team", args.team))
            for option, value in named:
                if value is not None and _CONTROL.search(value):
                    raise CliError(
                        f"{option} must not contain control characters, got {_shown(value)}",
                        EXIT_USAGE,
                    )
            models = None
            if args.models is not None:
                models = [m.strip() for m in args.models.split(",") if m.strip()]
                await _check_models(config, store, models)
            rpm, tpm, budget = _limits(args)
            org = args.org
            if args.team is not None:
                team = await store.get_team(args.team)
                if team is None:
                    raise CliError(
                        f"--team: no team {_shown(args.team)}; create it with "
                        "`gandalf teams create ID --org ORG`",
                        EXIT_USAGE,
                    )
                if org is None:
                    org = team.org_id
                elif org != team.org_id:
                    raise CliError(
                        f"--team: team {_shown(team.id)} belongs to org {_shown(team.org_id)}, "
                        f"not {_shown(org)}",
                        EXIT_USAGE,
                    )
            elif org is not None and org != "default" and await store.get_org(org) is None:
                # Never a new unlimited tenant from a typo (as for the config's keys).
                raise CliError(
                    f"--org: no org {_shown(org)}; create it with `gandalf orgs create`",
                    EXIT_USAGE,
                )
            try:
                key, plaintext = await manager.create(
                    name=args.name,
                    role=args.role,
                    org_id=org or "default",
                    team_id=args.team,
                    allowed_models=models,
                    expires_at=_expires(args.expires_in, time.time()),
                    rpm=rpm,
                    tpm=tpm,
                    budget=budget,
                )
            except GatewayError as exc:
                raise CliError(exc.message, EXIT_USAGE) from None
            print(plaintext)
            print(
                f"created key {key.id} ({_safe(key.name)}, role {key.role}); "
                "the key above is shown only once",
                file=sys.stderr,
            )
            return EXIT_OK
        if args.keys_command == "list":
            rows = await manager.list(args.org)
            print(
                f"{'ID':<22} {'PREFIX':<9} {'NAME':<20} {'ROLE':<16} {'ORG':<10} {'TEAM':<10} "
                f"{'RPM':<7} {'TPM':<9} {'BUDGET':<16} {'STATUS':<8} {'EXPIRES':<17} "
                f"{'SOURCE':<7} MODELS"
            )
            now = time.time()
            for k in rows:
                if k.revoked:
                    status = "revoked"
                elif k.blocked:  # by the admin API; reversible
                    status = "blocked"
                elif k.expires_at is not None and k.expires_at <= now:
                    status = "expired"
                else:
                    status = "active"
                expires = (
                    "never"
                    if k.expires_at is None
                    else time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(k.expires_at))
                )
                allowed = (
                    "all" if k.allowed_models is None else ",".join(k.allowed_models) or "none"
                )
                # Every field comes from the database, which other tools may have written.
                print(
                    f"{_safe(k.id):<22} {_safe(k.prefix):<9} {_safe(k.name):<20} "
                    f"{_safe(k.role):<16} {_safe(k.org_id):<10} {_safe(k.team_id):<10} "
                    f"{_count(k.rpm):<7} {_count(k.tpm):<9} {_budget_text(k.budget):<16} "
                    f"{status:<8} {expires:<17} {_safe(k.source):<7} {_safe(allowed)}"
                )
            return EXIT_OK
        if not await manager.revoke(args.id):
            raise CliError(f"no key with id {args.id!r}", EXIT_NOT_FOUND)
        print(
            f"revoked {args.id} (running servers refuse it within a second)",
            file=sys.stderr,
        )
        return EXIT_OK
    finally:
        await store.close()


# ---------------------------------------------------------------------------- limits


def _limits(args: argparse.Namespace) -> tuple[int, int, Budget | None]:
    """``(rpm, tpm, budget)`` from ``--rpm --tpm --budget-usd --budget-period``."""
    rpm = _count_option("--rpm", args.rpm)
    tpm = _count_option("--tpm", args.tpm)
    budget = None
    if args.budget_usd is not None:
        try:
            usd = float(args.budget_usd)
        except ValueError:
            usd = math.nan
        if not math.isfinite(usd) or usd < 0:
            raise CliError(
                f"--budget-usd must be a number of dollars >= 0, got {_shown(args.budget_usd)}",
                EXIT_USAGE,
            )
        budget = Budget(usd=usd, period=args.budget_period or "monthly")
    elif args.budget_period is not None:
        raise CliError("--budget-period needs --budget-usd", EXIT_USAGE)
    if budget is not None and budget.period not in BUDGET_PERIODS:
        raise CliError(
            f"--budget-period must be one of {', '.join(BUDGET_PERIODS)}, "
            f"got {_shown(budget.period)}",
            EXIT_USAGE,
        )
    return rpm, tpm, budget


def _count_option(option: str, text: str | None) -> int:
    if text is None:
        return 0
    if not re.fullmatch(r"[0-9]{1,12}", text.strip()):
        raise CliError(
            f"{option} must be a whole number >= 0 (0: unlimited), got {_shown(text)}", EXIT_USAGE
        )
    return int(text)


def _count(value: int) -> str:
    return str(value) if value else "-"


def _budget_text(budget: Budget | None) -> str:
    if budget is None:
        return "-"
    return _safe(f"${budget.usd:g}/{budget.period}")


def _models_text(models: tuple[str, ...] | None) -> str:
    return "all" if models is None else _safe(",".join(models)) or "none"


# ---------------------------------------------------------------------------- orgs and teams


async def _declare_tenants(config: GandalfConfig, store: Store) -> None:
    """Write the config's orgs and teams (and ``default``) to the database, as
    the server does at every start, so the CLI sees them before a first start:
    idempotent, and nothing is pruned here (that is the server's reconcile)."""
    await store.ensure_org("default", "Default")
    await store.upsert_config_tenants(config.orgs, config.teams)


def _tenant_id(option: str, value: str) -> None:
    if not value.strip() or _CONTROL.search(value):
        raise CliError(
            f"{option} must be non-empty without control characters, got {_shown(value)}",
            EXIT_USAGE,
        )


async def _tenants(args: argparse.Namespace) -> int:
    """``gandalf orgs|teams create|list|delete``."""
    config = _load(args.config)
    store = await _open_store(config)
    kind = "org" if args.command == "orgs" else "team"
    try:
        await _declare_tenants(config, store)
        if args.tenant_command == "create":
            return await _tenant_create(args, kind, store)
        if args.tenant_command == "list":
            rows: Sequence[Organization | Team] = (
                await store.list_orgs() if kind == "org" else await store.list_teams(args.org)
            )
            _tenant_list(kind, rows)
            return EXIT_OK
        return await _tenant_delete(args, kind, config, store)
    finally:
        await store.close()


async def _tenant_create(args: argparse.Namespace, kind: str, store: Store) -> int:
    _tenant_id(f"{kind} id", args.id)
    if args.name is not None:
        _tenant_id("--name", args.name)
    models = None
    if args.allowed_models is not None:
        models = tuple(m.strip() for m in args.allowed_models.split(",") if m.strip())
        for model in models:
            _tenant_id("--allowed-models", model)
    rpm, tpm, budget = _limits(args)
    name = args.name or args.id
    try:
        if kind == "org":
            org = Organization(
                id=args.id, name=name, allowed_models=models, rpm=rpm, tpm=tpm, budget=budget
            )
            if await store.get_org(args.id) is not None:
                raise CliError(f"an org with id {_shown(args.id)} exists", EXIT_USAGE)
            await store.create_org(org)
        else:
            if await store.get_org(args.org) is None:
                raise CliError(
                    f"--org: no org {_shown(args.org)}; create it with `gandalf orgs create`",
                    EXIT_USAGE,
                )
            if await store.get_team(args.id) is not None:
                raise CliError(f"a team with id {_shown(args.id)} exists", EXIT_USAGE)
            team = Team(
                id=args.id,
                org_id=args.org,
                name=name,
                allowed_models=models,
                rpm=rpm,
                tpm=tpm,
                budget=budget,
            )
            await store.create_team(team)
    except StorageError as exc:  # a concurrent create of the same id
        raise CliError(_one_line(str(exc)), EXIT_USAGE) from None
    print(
        f"created {kind} {_safe(args.id)} (a running server applies it at its next reload "
        "(SIGHUP) or restart)",
        file=sys.stderr,
    )
    return EXIT_OK


def _tenant_list(kind: str, rows: Sequence[Organization | Team]) -> None:
    """One line per org or team; every field comes from the database (escaped)."""
    org = f"{'ORG':<16} " if kind == "team" else ""
    print(f"{'ID':<16} {org}{'NAME':<20} {'RPM':<7} {'TPM':<9} {'BUDGET':<16} {'SOURCE':<7} MODELS")
    for r in rows:
        org = f"{_safe(r.org_id):<16} " if isinstance(r, Team) else ""
        print(
            f"{_safe(r.id):<16} {org}{_safe(r.name):<20} {_count(r.rpm):<7} {_count(r.tpm):<9} "
            f"{_budget_text(r.budget):<16} {_safe(r.source):<7} {_models_text(r.allowed_models)}"
        )


async def _tenant_delete(
    args: argparse.Namespace, kind: str, config: GandalfConfig, store: Store
) -> int:
    if kind == "org" and args.id == "default":
        raise CliError("the default org cannot be deleted", EXIT_USAGE)
    found = await (store.get_org(args.id) if kind == "org" else store.get_team(args.id))
    if found is None:
        raise CliError(f"no {kind} with id {_shown(args.id)}", EXIT_NOT_FOUND)
    if found.source == "config":
        raise CliError(
            f"{kind} {_shown(args.id)} is declared in {config.source}; remove it there "
            "(the next start or reload deletes it)",
            EXIT_USAGE,
        )
    try:
        await (store.delete_org(args.id) if kind == "org" else store.delete_team(args.id))
    except TenantInUse as exc:
        raise CliError(_one_line(str(exc)), EXIT_USAGE) from None
    print(f"deleted {kind} {_safe(args.id)}", file=sys.stderr)
    return EXIT_OK


# --------------------------------------------------------------------------- usage


def _since(text: str, now: float) -> float:
    """The start of the ``--since`` window: ``now`` minus a duration such as
    30m, 24h, 7d or 1d12h; ``all``: the beginning of time."""
    if text == "all":
        return 0.0
    try:
        seconds = timespec.duration(text)
    except ValueError:
        raise CliError(f"--since is too long a duration, got {_shown(text)}", EXIT_USAGE) from None
    if seconds is None:
        raise CliError(
            f"--since must look like 30m, 24h, 7d or 2w (or all), got {_shown(text)}", EXIT_USAGE
        )
    return max(now - seconds, 0.0)


# The counts and cost a summary row sums (not its group, names or bucket).
_SUMMED_FIELDS = tuple(
    f for f in UsageSummary.__struct_fields__ if f not in ("group", "name", "prefix", "bucket")
)


def _group_label(by: str, row: UsageSummary) -> str:
    """What a row is: a key as ``name (prefix...)`` and its id, a team or org
    as its name and id, a model or provider by name."""
    if row.group is None:
        return "(none)"
    if by == "key" and row.name is not None:
        return f"{_safe(row.name)} ({_safe(row.prefix)}...) {_safe(row.group)}"
    if row.name is not None and row.name != row.group:
        return f"{_safe(row.name)} ({_safe(row.group)})"
    return _safe(row.group)


async def _usage(args: argparse.Namespace) -> int:
    """``gandalf usage``: what the gateway served and what it cost, per group."""
    import json

    import msgspec

    config = _load(args.config)
    since = _since(args.since, time.time())
    store = await _open_store(config)
    try:
        rows = await store.usage_summary(args.by, since)
    finally:
        await store.close()
    if args.json:
        print(json.dumps(msgspec.to_builtins(rows), indent=2))
        return EXIT_OK
    total = UsageSummary(group="TOTAL")
    for row in rows:
        for field in _SUMMED_FIELDS:
            setattr(total, field, getattr(total, field) + getattr(row, field))
    header = ["REQUESTS", "ERRORS", "PROMPT", "CACHED", "COMPLETION", "REASONING", "COST USD"]
    table = [[args.by.upper(), *header]]
    for row, label in [*((r, _group_label(args.by, r)) for r in rows), (total, "TOTAL")]:
        # To the millionth of a dollar: one request of a small model costs that.
        cost = f"{row.cost_usd:.6f}" + ("*" if row.unpriced else "")
        counts = (
            row.requests,
            row.errors,
            row.prompt_tokens,
            row.cached_prompt_tokens,
            row.completion_tokens,
            row.reasoning_tokens,
        )
        table.append([label, *(str(n) for n in counts), cost])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for i, line in enumerate(table):
        if i == len(table) - 1:
            print("  ".join("-" * w for w in widths))
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        print("  ".join(cells).rstrip())
    window = (
        "all time"
        if since == 0.0
        else f"since {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime(since))}"
    )
    note = f"{len(rows)} group(s), {window}"
    if total.unpriced:
        note += f"; * {total.unpriced} successful request(s) without a known price (see pricing:)"
    print(note, file=sys.stderr)
    return EXIT_OK
