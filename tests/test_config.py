"""Tests for gandalf.config: loading, ${ENV} expansion, validation and its one-line errors.

Every test passes an explicit env mapping; none reads the real environment.
"""

from __future__ import annotations

import datetime as dt
import textwrap
from pathlib import Path

import pytest

from gandalf.config import (
    AuthConfig,
    GandalfConfig,
    KeyEntry,
    ServerConfig,
    default_config_path,
    load_config,
    parse_config,
    parse_duration,
    split_addr,
)
from gandalf.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
KEY_A = "gnd_" + "A" * 43
KEY_B = "gnd_" + "b-_9" * 8
SECRET = "sk-live-TOPSECRET-0123456789"

CONTRACT_EXAMPLE = """\
server:   { addr: "127.0.0.1:8080", read_timeout: 30s, write_timeout: 120s, shutdown_timeout: 30s, max_body_bytes: 4194304 }
database: { dsn: "gandalf.db" }          # SQLite file (":memory:" allowed for tests)
auth:     { admin_key: "${GANDALF_ADMIN_KEY}" }   # optional bootstrap admin key
providers:
  - name: openai            # instance id (route target reference)
    type: openai            # wire format: openai | anthropic | gemini | ollama | fake; defaults to name
    base_url: https://api.openai.com/v1
    api_key: "${OPENAI_API_KEY}"
    models: [gpt-4o, gpt-4o-mini]
    priority: 1
    timeout_ms: 30000
    enabled: true
routes:
  - model_alias: gpt-4o
    targets: [{ provider: openai, model: gpt-4o, priority: 1 }]
    strategy: priority
keys:     # bootstrap keys, seeded idempotently on first run
  - { name: default-admin, key: "${GANDALF_ADMIN_KEY}", org_id: default, role: admin }
"""  # noqa: E501  (verbatim from CONTRACT.md)

MINIMAL_PROVIDERS = """\
providers:
  - { name: fake, models: [fake-model] }
  - { name: openai, api_key: "${OPENAI_API_KEY}" }
"""


def parse(
    text: str, env: dict[str, str] | None = None, source: str = "gandalf.yaml"
) -> GandalfConfig:
    return parse_config(textwrap.dedent(text), source=source, env=env or {})


def error(text: str, env: dict[str, str] | None = None, source: str = "gandalf.yaml") -> str:
    """The ConfigError message for ``text``, checked to be a single line."""
    with pytest.raises(ConfigError) as info:
        parse(text, env, source)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"{source}: ")
    return message


# --------------------------------------------------------------------------- whole files


def test_contract_example_loads_with_env() -> None:
    env = {"GANDALF_ADMIN_KEY": KEY_A, "OPENAI_API_KEY": SECRET}
    cfg = parse_config(CONTRACT_EXAMPLE, source="gandalf.yaml", env=env)
    assert cfg.source == "gandalf.yaml"
    assert cfg.server == ServerConfig()
    assert cfg.server.read_timeout == 30.0 and cfg.server.write_timeout == 120.0
    (openai,) = cfg.providers
    assert openai.name == "openai" and openai.type == "openai"
    assert openai.base_url == "https://api.openai.com/v1"
    assert openai.api_key == SECRET
    assert openai.api_key_ref == "${OPENAI_API_KEY}"
    assert openai.models == ("gpt-4o", "gpt-4o-mini")
    assert openai.enabled and openai.disabled_reason is None
    assert openai.source == "config"
    (route,) = cfg.routes
    assert route.model_alias == "gpt-4o" and route.strategy == "priority"
    assert [(t.provider, t.model, t.priority, t.weight) for t in route.targets] == [
        ("openai", "gpt-4o", 1, 1)
    ]
    # The same key in auth.admin_key and keys is kept once; the keys entry wins.
    assert cfg.keys == (KeyEntry(name="default-admin", key=KEY_A, org_id="default", role="admin"),)
    assert cfg.auth.admin_key == KEY_A
    assert cfg.warnings == ()


def test_contract_example_loads_without_env() -> None:
    cfg = parse_config(CONTRACT_EXAMPLE, source="gandalf.yaml", env={})
    (openai,) = cfg.providers
    assert not openai.enabled
    assert openai.disabled_reason == "set OPENAI_API_KEY"
    assert cfg.keys == ()
    assert cfg.auth.admin_key == ""
    assert len(cfg.warnings) == 2
    assert "keys[0].key" in cfg.warnings[1] and "GANDALF_ADMIN_KEY" in cfg.warnings[1]


def test_shipped_config_serves_without_env() -> None:
    path = REPO / "gandalf.yaml"
    cfg = load_config(path, env={})
    assert cfg.source == str(path)
    providers = {p.name: p for p in cfg.providers}
    assert providers["fake"].type == "fake" and providers["fake"].enabled
    assert providers["fake"].models == ("fake-model",)
    assert not providers["openai"].enabled
    assert providers["openai"].disabled_reason == "set OPENAI_API_KEY"
    assert providers["openai"].api_key_ref == "${OPENAI_API_KEY}"
    assert {r.model_alias: (r.targets[0].provider, r.targets[0].model) for r in cfg.routes} == {
        "fake-model": ("fake", "fake-model"),
        "gpt-4o": ("openai", "gpt-4o"),
        "gpt-4o-mini": ("openai", "gpt-4o-mini"),
    }
    assert cfg.server.addr == "127.0.0.1:8080"
    assert cfg.database.dsn == str(REPO / "gandalf.db")
    assert cfg.keys == ()
    assert not providers["anthropic"].enabled and not providers["gemini"].enabled
    assert providers["anthropic"].disabled_reason == "set ANTHROPIC_API_KEY"
    assert providers["gemini"].api_key_ref == "${GEMINI_API_KEY}"
    assert cfg.warnings == (
        f"{path}: providers[1].api_key: empty, provider 'openai' disabled (set OPENAI_API_KEY)",
        f"{path}: providers[2].api_key: empty, provider 'anthropic' disabled "
        "(set ANTHROPIC_API_KEY)",
        f"{path}: providers[3].api_key: empty, provider 'gemini' disabled (set GEMINI_API_KEY)",
    )


def test_shipped_config_with_env() -> None:
    env = {
        "OPENAI_API_KEY": SECRET,
        "ANTHROPIC_API_KEY": SECRET,
        "GEMINI_API_KEY": SECRET,
        "GANDALF_ADMIN_KEY": KEY_A,
    }
    cfg = load_config(REPO / "gandalf.yaml", env=env)
    assert all(p.enabled for p in cfg.providers)
    assert cfg.warnings == ()
    assert cfg.keys == (KeyEntry(name="admin", key=KEY_A, org_id="default", role="admin"),)


def test_load_config_reads_file(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("server: { addr: '0.0.0.0:9000' }\n", encoding="utf-8")
    cfg = load_config(str(path), env={})
    assert cfg.server.port == 9000
    assert cfg.source == str(path)


def test_empty_mapping_means_all_defaults() -> None:
    cfg = parse("{}")
    assert cfg == GandalfConfig(
        source="gandalf.yaml", database=cfg.database, providers=(), routes=(), keys=()
    )
    assert cfg.server == ServerConfig()
    assert cfg.auth == AuthConfig()
    assert cfg.auth.key_cache_ttl == 30.0 and cfg.auth.negative_cache_ttl == 5.0
    assert cfg.auth.key_cache_size == 10000


def test_null_sections_are_absent() -> None:
    cfg = parse("server:\nproviders:\nroutes:\nkeys:\n  # none yet\n")
    assert cfg.server == ServerConfig() and cfg.keys == () and cfg.providers == ()


# --------------------------------------------------------------------------- file-level errors


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"{path}: cannot read config file: No such file or directory"


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path, env={})


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_bytes(b"server: {addr: '\xff'}\n")
    with pytest.raises(ConfigError, match=r"g\.yaml: cannot read config file: not valid UTF-8"):
        load_config(path, env={})


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file_is_an_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"{path}: no configuration (the file is empty)"


@pytest.mark.parametrize(
    ("text", "kind"),
    [("- a\n- b\n", "list"), ("just a string\n", "string"), ("42\n", "integer")],
)
def test_top_level_must_be_a_mapping(text: str, kind: str) -> None:
    assert error(text) == (
        f"gandalf.yaml: expected a mapping of sections at the top level, got {kind}"
    )


def test_yaml_syntax_error_names_the_line() -> None:
    message = error("server:\n  addr: 127.0.0.1:8080\n  bad: [1, 2\nroutes: []\n")
    assert message.startswith("gandalf.yaml: line 4, column ")
    assert "invalid YAML" in message


def test_yaml_syntax_error_mapping_values() -> None:
    message = error("server:\n  addr: a: b\n")
    assert message.startswith("gandalf.yaml: line 2, column ")
    assert "mapping values are not allowed here" in message


def test_yaml_reader_error() -> None:
    message = error("server: {addr: '\x00'}\n")
    assert message.startswith("gandalf.yaml: invalid YAML: ")
    assert "#x0000" in message


# --------------------------------------------------------------------------- env expansion


def model_of(value: str, env: dict[str, str]) -> str:
    """Expand ``value`` through a route target's model field."""
    cfg = parse(
        f"""
        providers: [{{ name: fake }}]
        routes:
          - model_alias: m
            targets: [{{ provider: fake, model: '{value}' }}]
        """,
        env,
    )
    return cfg.routes[0].targets[0].model


@pytest.mark.parametrize(
    ("value", "env", "expected"),
    [
        ("${M}", {"M": "gpt-4o"}, "gpt-4o"),
        ("pre-${M}-post", {"M": "x"}, "pre-x-post"),
        ("${A}/${B}", {"A": "a", "B": "b"}, "a/b"),
        ("${M:-fallback}", {}, "fallback"),
        ("${M:-fallback}", {"M": ""}, "fallback"),
        ("${M:-fallback}", {"M": "set"}, "set"),
        ("${M:-}x", {}, "x"),
        ("${M:-a:-b}", {}, "a:-b"),
        ("x${UNSET}y", {}, "xy"),
        ("$$", {}, "$"),
        ("$${M}", {"M": "no"}, "${M}"),
        ("$$$${M}", {"M": "v"}, "$${M}"),
        ("$$${M}", {"M": "v"}, "$v"),
        ("cost $5", {}, "cost $5"),
        ("trailing $", {}, "trailing $"),
        ("${M}", {"M": "${OTHER}"}, "${OTHER}"),  # values are not re-expanded
        ("${M}", {"M": "a\nbogus: 1"}, "a\nbogus: 1"),  # values cannot inject YAML
        ("${_lower_9}", {"_lower_9": "ok"}, "ok"),
    ],
)
def test_expansion(value: str, env: dict[str, str], expected: str) -> None:
    assert model_of(value, env) == expected


def test_expansion_reaches_lists_and_nested_values() -> None:
    cfg = parse(
        """
        server: { addr: "${HOST:-127.0.0.1}:${PORT:-8080}" }
        providers:
          - { name: fake, models: ["${M1}", "literal", "${M2:-two}"] }
        """,
        {"M1": "one", "PORT": "9999"},
    )
    assert cfg.server.addr == "127.0.0.1:9999" and cfg.server.port == 9999
    assert cfg.providers[0].models == ("one", "literal", "two")


def test_expansion_does_not_touch_mapping_keys() -> None:
    message = error("server: { '${K}': 1 }\n", {"K": "addr"})
    assert message.startswith("gandalf.yaml: server.${K}: unknown key")


def test_expanded_strings_coerce_to_numbers_and_booleans() -> None:
    cfg = parse(
        """
        server:
          workers: ${WORKERS:-4}
          access_log: "${LOG:-false}"
          max_body_bytes: "${MAX}"
          read_timeout: ${RT:-2m}
        """,
        {"MAX": "1024"},
    )
    assert cfg.server.workers == 4
    assert cfg.server.access_log is False
    assert cfg.server.max_body_bytes == 1024
    assert cfg.server.read_timeout == 120.0


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("${", "unterminated '${'"),
        ("abc${DEF", "unterminated '${'"),
        ("${1BAD}", "malformed variable reference '${1BAD}'"),
        ("${}", "malformed variable reference '${}'"),
        ("${A-b}", "malformed variable reference '${A-b}'"),
        ("${A B}", "malformed variable reference '${A B}'"),
        ("${A:=b}", "malformed variable reference '${A:=b}'"),
    ],
)
def test_malformed_references(value: str, shown: str) -> None:
    message = error(f"database: {{ dsn: '{value}' }}\n")
    assert message.startswith(f"gandalf.yaml: database.dsn: {shown}")


def test_malformed_reference_path_in_lists() -> None:
    message = error("providers:\n  - { name: fake, models: [ok, 'x${'] }\n")
    assert message.startswith("gandalf.yaml: providers[0].models[1]: unterminated '${'")


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1h2m3s", 3723.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("45", 45.0),
        ("0.25", 0.25),
        (" 10s ", 10.0),
        (45, 45.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration_valid(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("3 parsecs", "invalid duration '3 parsecs' (use e.g. 500ms, 30s, 2m, 1h)"),
        ("1d", "invalid duration '1d' (use e.g. 500ms, 30s, 2m, 1h)"),
        ("-5s", "invalid duration '-5s' (use e.g. 500ms, 30s, 2m, 1h)"),
        ("s", "invalid duration 's' (use e.g. 500ms, 30s, 2m, 1h)"),
        ("", "invalid duration '' (use e.g. 500ms, 30s, 2m, 1h)"),
        ("0s", "duration must be greater than 0, got '0s'"),
        (0, "duration must be greater than 0, got 0"),
        (-1.5, "duration must be greater than 0, got -1.5"),
        (float("inf"), "duration must be greater than 0, got inf"),
        (True, "expected a duration such as 30s, got boolean"),
        ([1], "expected a duration such as 30s, got list"),
        (None, "expected a duration such as 30s, got null"),
    ],
)
def test_parse_duration_invalid(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "field",
    [
        "server.read_timeout",
        "server.write_timeout",
        "server.shutdown_timeout",
        "auth.key_cache_ttl",
        "auth.negative_cache_ttl",
    ],
)
def test_duration_fields(field: str) -> None:
    section, name = field.split(".")
    cfg = parse(f"{section}: {{ {name}: 1m30s }}\n")
    assert getattr(getattr(cfg, section), name) == 90.0
    assert error(f"{section}: {{ {name}: 3 parsecs }}\n") == (
        f"gandalf.yaml: {field}: invalid duration '3 parsecs' (use e.g. 500ms, 30s, 2m, 1h)"
    )
    assert error(f"{section}: {{ {name}: 0 }}\n") == (
        f"gandalf.yaml: {field}: duration must be greater than 0, got 0"
    )
    assert error(f"{section}: {{ {name}: [1] }}\n") == (
        f"gandalf.yaml: {field}: expected a duration such as 30s, got list"
    )


def test_duration_null_is_an_error() -> None:
    assert error("server: { read_timeout: null }\n") == (
        "gandalf.yaml: server.read_timeout: expected a duration such as 30s, got null"
    )


# --------------------------------------------------------------------------- server


@pytest.mark.parametrize(
    ("addr", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("0.0.0.0:1", "0.0.0.0", 1),
        ("localhost:65535", "localhost", 65535),
        ("[::1]:8080", "::1", 8080),
        ("[::]:80", "::", 80),
    ],
)
def test_server_addr_valid(addr: str, host: str, port: int) -> None:
    cfg = parse(f"server: {{ addr: '{addr}' }}\n")
    assert (cfg.server.host, cfg.server.port) == (host, port)
    assert split_addr(addr) == (host, port)


@pytest.mark.parametrize(
    "addr",
    [
        "8080",
        ":8080",
        "host:",
        "host:abc",
        "::1:8080",
        "[::1]8080",
        "[::1:80",
        "a b:80",
        "h:123456",
    ],
)
def test_server_addr_malformed(addr: str) -> None:
    assert error(f"server: {{ addr: '{addr}' }}\n") == (
        f"gandalf.yaml: server.addr: invalid address {addr!r} "
        "(expected host:port, e.g. 127.0.0.1:8080 or [::1]:8080)"
    )


@pytest.mark.parametrize("port", ["0", "65536", "99999"])
def test_server_port_out_of_range(port: str) -> None:
    assert error(f"server: {{ addr: 'localhost:{port}' }}\n") == (
        f"gandalf.yaml: server.addr: port {int(port)} out of range 1-65535 in 'localhost:{port}'"
    )


def test_server_other_fields() -> None:
    cfg = parse("server: { max_body_bytes: 10, access_log: false, workers: 3 }\n")
    assert cfg.server.max_body_bytes == 10
    assert cfg.server.access_log is False
    assert cfg.server.workers == 3


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("server: { max_body_bytes: 0 }", "server.max_body_bytes: expected integer >= 1"),
        ("server: { workers: 0 }", "server.workers: expected integer >= 1"),
        ("auth: { key_cache_size: 0 }", "auth.key_cache_size: expected integer >= 1"),
    ],
)
def test_lower_bounds(yaml_text: str, message: str) -> None:
    assert error(yaml_text + "\n") == f"gandalf.yaml: {message}"


# --------------------------------------------------------------------------- database


def test_relative_dsn_is_resolved_against_the_config_directory(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    path = sub / "g.yaml"
    path.write_text("database: { dsn: data/gw.db }\n", encoding="utf-8")
    assert load_config(path, env={}).database.dsn == str(sub / "data" / "gw.db")


@pytest.mark.parametrize("dsn", [":memory:", "file:gw.db?mode=ro"])
def test_special_dsns_are_kept(dsn: str) -> None:
    assert parse(f"database: {{ dsn: '{dsn}' }}\n").database.dsn == dsn


@pytest.mark.parametrize(
    "dsn",
    ["postgresql://gw:${PGPASSWORD}@db:5432/gandalf", "postgres://db/gandalf?sslmode=require"],
)
def test_postgres_dsns_are_kept(dsn: str) -> None:
    """A PostgreSQL URL is not a file path (it used to be made one)."""
    cfg = parse(f"database: {{ dsn: '{dsn}', pool_size: 8 }}\n", env={"PGPASSWORD": "pw"})
    assert cfg.database.dsn == dsn.replace("${PGPASSWORD}", "pw")
    assert cfg.database.pool_size == 8


def test_other_url_dsns_are_refused_without_showing_them() -> None:
    message = error("database: { dsn: 'mysql://u:secret@db/g' }\n")
    assert message == (
        "gandalf.yaml: database.dsn: must be an SQLite file path or a postgresql:// URL, "
        "got mysql://..."
    )


@pytest.mark.parametrize("size", [0, 101])
def test_pool_size_bounds(size: int) -> None:
    assert error(f"database: {{ pool_size: {size} }}\n").startswith(
        "gandalf.yaml: database.pool_size:"
    )


def test_absolute_dsn_is_kept(tmp_path: Path) -> None:
    dsn = str(tmp_path / "x.db")
    assert parse(f"database: {{ dsn: '{dsn}' }}\n").database.dsn == dsn


def test_default_dsn_sits_next_to_the_config(tmp_path: Path) -> None:
    source = str(tmp_path / "g.yaml")
    assert parse("{}", source=source).database.dsn == str(tmp_path / "gandalf.db")


def test_empty_dsn() -> None:
    assert error("database: { dsn: '${DSN}' }\n") == (
        "gandalf.yaml: database.dsn: must not be empty (from ${DSN}, which is unset)"
    )


# --------------------------------------------------------------------------- providers


@pytest.mark.parametrize(
    ("ptype", "url"),
    [
        ("openai", "https://api.openai.com/v1"),
        ("anthropic", "https://api.anthropic.com"),
        ("gemini", "https://generativelanguage.googleapis.com"),
        ("ollama", "http://127.0.0.1:11434"),
        ("fake", ""),
    ],
)
def test_provider_defaults_per_type(ptype: str, url: str) -> None:
    cfg = parse(f"providers: [{{ name: {ptype}, api_key: k }}]\n")
    (p,) = cfg.providers
    assert p.type == ptype and p.base_url == url
    assert (p.priority, p.timeout_ms, p.enabled, p.latency_ms) == (1, 30000, True, 0)
    assert p.models == ()


def test_provider_all_fields() -> None:
    cfg = parse(
        """
        providers:
          - name: local
            type: ollama
            base_url: http://gpu-box:11434/
            models: [llama3]
            priority: 2
            timeout_ms: 5000
            latency_ms: 3
        """
    )
    (p,) = cfg.providers
    assert p.name == "local" and p.type == "ollama"
    assert p.base_url == "http://gpu-box:11434"  # trailing slash dropped
    assert (p.models, p.priority, p.timeout_ms, p.latency_ms) == (("llama3",), 2, 5000, 3)
    assert p.enabled and p.api_key == "" and p.api_key_ref is None


def test_empty_base_url_means_default() -> None:
    cfg = parse("providers: [{ name: ollama, base_url: '${OLLAMA_URL}' }]\n")
    assert cfg.providers[0].base_url == "http://127.0.0.1:11434"


def test_fake_base_url_is_free_form() -> None:
    assert parse("providers: [{ name: fake, base_url: anything }]\n").providers[0].base_url == (
        "anything"
    )


@pytest.mark.parametrize("url", ["ftp://x", "api.openai.com", "https://", "unix:/tmp/s"])
def test_bad_base_url(url: str) -> None:
    assert error(f"providers: [{{ name: openai, api_key: k, base_url: '{url}' }}]\n") == (
        f"gandalf.yaml: providers[0].base_url: expected an http:// or https:// URL, got {url!r}"
    )


def test_bad_provider_type() -> None:
    assert error(MINIMAL_PROVIDERS + "  - { name: x, type: foo }\n") == (
        "gandalf.yaml: providers[2].type: expected one of "
        "openai, anthropic, gemini, ollama, azure, fake, got 'foo'"
    )


def test_type_required_when_name_is_not_a_type() -> None:
    assert error("providers: [{ name: my-gpt }]\n") == (
        "gandalf.yaml: providers[0].type: required because name 'my-gpt' is not a provider type "
        "(one of openai, anthropic, gemini, ollama, azure, fake)"
    )


def test_duplicate_provider_names() -> None:
    assert error(MINIMAL_PROVIDERS + "  - { name: fake }\n") == (
        "gandalf.yaml: providers[2].name: duplicate provider name 'fake' (also providers[0])"
    )


def test_empty_provider_name() -> None:
    assert error("providers: [{ name: '', type: fake }]\n") == (
        "gandalf.yaml: providers[0].name: must not be empty"
    )


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("timeout_ms: 0", "providers[0].timeout_ms: expected integer >= 1"),
        ("latency_ms: -1", "providers[0].latency_ms: expected integer >= 0"),
        ("priority: high", "providers[0].priority: expected integer, got string"),
        ("enabled: maybe", "providers[0].enabled: expected boolean, got string"),
        ("models: gpt-4o", "providers[0].models: expected list, got string"),
        ("models: [1.5]", "providers[0].models[0]: expected string, got number"),
    ],
)
def test_provider_field_errors(field: str, message: str) -> None:
    assert error(f"providers: [{{ name: fake, {field} }}]\n") == f"gandalf.yaml: {message}"


def test_provider_without_key_is_disabled_with_warning() -> None:
    cfg = parse(MINIMAL_PROVIDERS)
    fake, openai = cfg.providers
    assert fake.enabled and fake.disabled_reason is None
    assert not openai.enabled
    assert openai.disabled_reason == "set OPENAI_API_KEY"
    assert openai.api_key == ""
    assert openai.api_key_ref == "${OPENAI_API_KEY}"
    assert cfg.warnings == (
        "gandalf.yaml: providers[1].api_key: empty, provider 'openai' disabled "
        "(set OPENAI_API_KEY)",
    )


def test_provider_with_key_is_enabled() -> None:
    cfg = parse(MINIMAL_PROVIDERS, {"OPENAI_API_KEY": SECRET})
    assert cfg.providers[1].enabled and cfg.providers[1].api_key == SECRET
    assert cfg.warnings == ()


@pytest.mark.parametrize("ptype", ["openai", "anthropic", "gemini"])
def test_missing_key_without_reference(ptype: str) -> None:
    cfg = parse(f"providers: [{{ name: p, type: {ptype} }}]\n")
    (p,) = cfg.providers
    assert not p.enabled and p.disabled_reason == "set providers[0].api_key"
    assert p.api_key_ref is None
    assert cfg.warnings == (
        "gandalf.yaml: providers[0].api_key: empty, provider 'p' disabled "
        "(set providers[0].api_key)",
    )


@pytest.mark.parametrize("ptype", ["ollama", "fake"])
def test_keyless_types_stay_enabled(ptype: str) -> None:
    cfg = parse(f"providers: [{{ name: p, type: {ptype}, api_key: '${{NOPE}}' }}]\n")
    assert cfg.providers[0].enabled and cfg.warnings == ()


def test_reason_names_the_variable_of_a_partial_reference() -> None:
    cfg = parse("providers: [{ name: openai, api_key: '${PFX}${KEY}' }]\n")
    assert cfg.providers[0].disabled_reason == "set PFX or KEY"
    assert cfg.providers[0].api_key_ref is None


def test_disabled_in_config() -> None:
    cfg = parse("providers: [{ name: openai, enabled: false }]\n")
    (p,) = cfg.providers
    assert not p.enabled
    assert p.disabled_reason == "disabled in config (providers[0].enabled)"
    assert cfg.warnings == ()


@pytest.mark.parametrize(
    ("raw", "env", "api_key", "ref"),
    [
        ("${OPENAI_API_KEY}", {"OPENAI_API_KEY": SECRET}, SECRET, "${OPENAI_API_KEY}"),
        ("${K:-sk-default}", {}, "sk-default", "${K}"),  # default never stored
        ("${K:-}", {"K": SECRET}, SECRET, "${K}"),
        (SECRET, {}, SECRET, None),
        ("Bearer ${K}", {"K": "x"}, "Bearer x", None),
        ("${A}${B}", {"A": "a", "B": "b"}, "ab", None),
        ("${K} ", {"K": "x"}, "x ", None),
        ("$${K}", {"K": "x"}, "${K}", None),
    ],
)
def test_api_key_ref_only_for_pure_references(
    raw: str, env: dict[str, str], api_key: str, ref: str | None
) -> None:
    cfg = parse(f"providers: [{{ name: openai, api_key: '{raw}' }}]\n", env)
    (p,) = cfg.providers
    assert p.enabled
    assert p.api_key == api_key
    assert p.api_key_ref == ref


# --------------------------------------------------------------------------- routes


def test_route_targets_sorted_by_priority_stably() -> None:
    cfg = parse(
        MINIMAL_PROVIDERS
        + """\
routes:
  - model_alias: smart
    targets:
      - { provider: openai, model: a, priority: 3 }
      - { provider: fake, model: b, priority: 1, weight: 0 }
      - { provider: openai, model: c, priority: 2 }
      - { provider: fake, model: d, priority: 1, weight: 5 }
"""
    )
    (route,) = cfg.routes
    assert [(t.model, t.priority, t.weight) for t in route.targets] == [
        ("b", 1, 0),
        ("d", 1, 5),
        ("c", 2, 1),
        ("a", 3, 1),
    ]
    assert route.source == "config"


def test_route_unknown_provider() -> None:
    text = (
        MINIMAL_PROVIDERS + "routes: [{ model_alias: m, targets: [{ provider: nope, model: x }] }]"
    )
    assert error(text) == "gandalf.yaml: routes[0].targets[0].provider: unknown provider 'nope'"


def test_route_to_disabled_provider_is_allowed() -> None:
    text = (
        MINIMAL_PROVIDERS
        + "routes: [{ model_alias: m, targets: [{ provider: openai, model: x }] }]"
    )
    assert parse(text).routes[0].targets[0].provider == "openai"


def test_duplicate_aliases() -> None:
    text = MINIMAL_PROVIDERS + (
        "routes:\n"
        "  - { model_alias: m, targets: [{ provider: fake, model: x }] }\n"
        "  - { model_alias: m, targets: [{ provider: fake, model: y }] }\n"
    )
    assert error(text) == (
        "gandalf.yaml: routes[1].model_alias: duplicate model alias 'm' (also routes[0])"
    )


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (
            "{ model_alias: '', targets: [{ provider: fake, model: x }] }",
            "routes[0].model_alias: must not be empty",
        ),
        ("{ model_alias: m, targets: [] }", "routes[0].targets: must not be empty"),
        ("{ model_alias: m }", "routes[0].targets: required but missing"),
        (
            "{ targets: [{ provider: fake, model: x }] }",
            "routes[0].model_alias: required but missing",
        ),
        (
            "{ model_alias: m, targets: [{ provider: fake, model: '' }] }",
            "routes[0].targets[0].model: must not be empty",
        ),
        (
            "{ model_alias: m, targets: [{ provider: fake }] }",
            "routes[0].targets[0].model: required but missing",
        ),
        (
            "{ model_alias: m, targets: [{ provider: fake, model: x, weight: -1 }] }",
            "routes[0].targets[0].weight: expected integer >= 0",
        ),
        (
            "{ model_alias: m, targets: { provider: fake, model: x } }",
            "routes[0].targets: expected list, got mapping",
        ),
    ],
)
def test_route_errors(route: str, message: str) -> None:
    assert error(MINIMAL_PROVIDERS + f"routes: [{route}]\n") == f"gandalf.yaml: {message}"


def test_unknown_strategy() -> None:
    text = MINIMAL_PROVIDERS + (
        "routes: [{ model_alias: m, strategy: random, targets: [{ provider: fake, model: x }] }]"
    )
    assert error(text) == (
        "gandalf.yaml: routes[0].strategy: expected one of priority, weighted, least_latency, "
        "got 'random'"
    )


# --------------------------------------------------------------------------- keys


def test_key_entry_fields() -> None:
    cfg = parse(
        MINIMAL_PROVIDERS
        + f"""\
routes: [{{ model_alias: fake-model, targets: [{{ provider: fake, model: fake-model }}] }}]
keys:
  - {{ name: ci, key: "${{CI_KEY}}", org_id: acme, team_id: infra, role: service_account,
      allowed_models: [fake-model], expires_at: "2030-01-01T00:00:00Z" }}
  - {{ name: plain, key: {KEY_B} }}
""",
        {"CI_KEY": KEY_A, "OPENAI_API_KEY": SECRET},
    )
    ci, plain = cfg.keys
    assert ci == KeyEntry(
        name="ci",
        key=KEY_A,
        org_id="acme",
        team_id="infra",
        role="service_account",
        allowed_models=("fake-model",),
        expires_at=dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp(),
    )
    assert plain == KeyEntry(name="plain", key=KEY_B)
    assert (plain.org_id, plain.team_id, plain.role, plain.allowed_models, plain.expires_at) == (
        "default",
        None,
        "member",
        None,
        None,
    )
    assert cfg.warnings == ()


JAN_2030 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("'2030-01-01T00:00:00Z'", JAN_2030),
        ("'2030-01-01T02:00:00+02:00'", JAN_2030),
        ("'2030-01-01T00:00:00'", JAN_2030),  # naive means UTC
        ("'2030-01-01'", JAN_2030),
        ("2030-01-01T00:00:00Z", JAN_2030),  # a YAML timestamp
        ("2030-01-01 00:00:00", JAN_2030),  # a naive YAML timestamp
        ("2030-01-01", JAN_2030),  # a YAML date
        (str(int(JAN_2030)), JAN_2030),
        (f"'{int(JAN_2030)}'", JAN_2030),
        ("1.5", 1.5),
        ("null", None),
        ("''", None),
    ],
)
def test_key_expires_at(value: str, expected: float | None) -> None:
    cfg = parse(f"keys: [{{ name: k, key: {KEY_A}, expires_at: {value} }}]\n")
    assert cfg.keys[0].expires_at == expected


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("next tuesday", "invalid datetime 'next tuesday'"),
        ("'2030-13-01'", "invalid datetime '2030-13-01'"),
        ("true", "expected a datetime, got boolean"),
        ("[1]", "expected a datetime, got list"),
        (".inf", "invalid datetime inf"),
    ],
)
def test_key_expires_at_invalid(value: str, problem: str) -> None:
    message = error(f"keys: [{{ name: k, key: {KEY_A}, expires_at: {value} }}]\n")
    assert message == (
        f"gandalf.yaml: keys[0].expires_at: {problem} "
        "(use an ISO-8601 datetime such as 2030-01-31T00:00:00Z, or unix seconds)"
    )


def test_empty_key_is_skipped_with_warning() -> None:
    cfg = parse(
        f"""
        keys:
          - {{ name: ops, key: "${{OPS_KEY}}" }}
          - {{ name: literal-empty, key: "" }}
          - {{ name: kept, key: {KEY_A} }}
        """
    )
    assert [k.name for k in cfg.keys] == ["kept"]
    assert cfg.warnings == (
        "gandalf.yaml: keys[0].key: empty (OPS_KEY is not set), key 'ops' skipped",
        "gandalf.yaml: keys[1].key: empty, key 'literal-empty' skipped",
    )


@pytest.mark.parametrize(
    "bad",
    [
        "gnd_short",
        "sk-" + "x" * 40,
        "gnd_" + "x" * 129,
        "gnd_" + "x" * 19 + "!",
        "GND_" + "x" * 30,
    ],
)
def test_invalid_key_format_never_echoes_the_key(bad: str) -> None:
    message = error("keys: [{ name: k, key: '${K}' }]\n", {"K": bad})
    assert message == (
        "gandalf.yaml: keys[0].key: not a valid gandalf key (expected 'gnd_' followed by "
        "20-128 characters from A-Z, a-z, 0-9, '_' and '-') (from ${K})"
    )
    assert bad not in message


def test_duplicate_keys() -> None:
    text = f"keys:\n  - {{ name: a, key: {KEY_A} }}\n  - {{ name: b, key: {KEY_A} }}\n"
    message = error(text)
    assert message == "gandalf.yaml: keys[1].key: same key as keys[0]"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            f"{{ name: k, key: {KEY_A}, role: root }}",
            "keys[0].role: expected one of admin, member, viewer, service_account, got 'root'",
        ),
        (f"{{ name: k, key: {KEY_A}, org_id: '' }}", "keys[0].org_id: must not be empty"),
        (f"{{ name: '', key: {KEY_A} }}", "keys[0].name: must not be empty"),
        (
            f"{{ name: k, key: {KEY_A}, allowed_models: m }}",
            "keys[0].allowed_models: expected list | null, got string",
        ),
    ],
)
def test_key_field_errors(entry: str, message: str) -> None:
    assert error(f"keys: [{entry}]\n") == f"gandalf.yaml: {message}"


def test_key_missing_fields() -> None:
    assert error("keys: [{ name: k }]\n") == "gandalf.yaml: keys[0].key: required but missing"
    assert error(f"keys: [{{ key: {KEY_A} }}]\n") == (
        "gandalf.yaml: keys[0].name: required but missing"
    )


def test_empty_team_id_means_none() -> None:
    cfg = parse(f"keys: [{{ name: k, key: {KEY_A}, team_id: '${{TEAM}}' }}]\n")
    assert cfg.keys[0].team_id is None


def test_allowed_models_warns_on_unknown_alias() -> None:
    cfg = parse(f"keys: [{{ name: k, key: {KEY_A}, allowed_models: [nope] }}]\n")
    assert cfg.keys[0].allowed_models == ("nope",)
    assert cfg.warnings == (
        "gandalf.yaml: keys[0].allowed_models: no route has model alias 'nope'",
    )


# --------------------------------------------------------------------------- admin key


def test_admin_key_becomes_a_key_entry() -> None:
    cfg = parse("auth: { admin_key: '${ADMIN}' }\n", {"ADMIN": KEY_A})
    assert cfg.auth.admin_key == KEY_A
    assert cfg.keys == (KeyEntry(name="admin", key=KEY_A, org_id="default", role="admin"),)


def test_empty_admin_key_means_none() -> None:
    cfg = parse("auth: { admin_key: '${ADMIN}' }\n")
    assert cfg.auth.admin_key == "" and cfg.keys == () and cfg.warnings == ()


def test_admin_key_deduplicated_keys_entry_wins() -> None:
    cfg = parse(
        f"""
        auth: {{ admin_key: {KEY_A} }}
        keys:
          - {{ name: other, key: {KEY_B} }}
          - {{ name: boss, key: {KEY_A}, role: member, org_id: acme }}
        """
    )
    assert [(k.name, k.role, k.org_id) for k in cfg.keys] == [
        ("other", "member", "default"),
        ("boss", "member", "acme"),
    ]


def test_admin_key_distinct_from_keys_is_appended() -> None:
    cfg = parse(f"auth: {{ admin_key: {KEY_A} }}\nkeys: [{{ name: other, key: {KEY_B} }}]\n")
    assert [k.name for k in cfg.keys] == ["other", "admin"]


def test_invalid_admin_key_never_echoed() -> None:
    message = error("auth: { admin_key: '${ADMIN}' }\n", {"ADMIN": "letmein-TOPSECRET"})
    assert message == (
        "gandalf.yaml: auth.admin_key: not a valid gandalf key (expected 'gnd_' followed by "
        "20-128 characters from A-Z, a-z, 0-9, '_' and '-') (from ${ADMIN})"
    )
    assert "TOPSECRET" not in message


# --------------------------------------------------------------------------- unknown keys, types


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("bogus: 1", "bogus"),
        ("server: { bogus: 1 }", "server.bogus"),
        ("database: { bogus: 1 }", "database.bogus"),
        ("auth: { bogus: 1 }", "auth.bogus"),
        ("providers: [{ name: fake, bogus: 1 }]", "providers[0].bogus"),
        (
            "providers: [{ name: fake }]\nroutes: [{ model_alias: m, bogus: 1, "
            "targets: [{ provider: fake, model: x }] }]",
            "routes[0].bogus",
        ),
        (
            "providers: [{ name: fake }]\nroutes: [{ model_alias: m, "
            "targets: [{ provider: fake, model: x }, { provider: fake, model: y, bogus: 1 }] }]",
            "routes[0].targets[1].bogus",
        ),
        (f"keys: [{{ name: k, key: {KEY_A}, bogus: 1 }}]", "keys[0].bogus"),
    ],
)
def test_unknown_keys_at_every_level(text: str, path: str) -> None:
    message = error(text + "\n")
    assert message.startswith(f"gandalf.yaml: {path}: unknown key (expected one of: ")


def test_unknown_key_suggests_a_close_match() -> None:
    assert error("server: { read_timout: 1s }\n") == (
        "gandalf.yaml: server.read_timout: unknown key (did you mean 'read_timeout'?)"
    )
    assert error("provider: []\n") == (
        "gandalf.yaml: provider: unknown key (did you mean 'providers'?)"
    )


def test_unknown_key_lists_valid_keys() -> None:
    assert error("bogus: 1\n") == (
        "gandalf.yaml: bogus: unknown key "
        "(expected one of: server, database, auth, providers, routes, keys, resilience, "
        "limits, orgs, teams, pricing, cache, log, tracing, responses, redis)"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server: []", "server: expected mapping, got list"),
        ("server: 5", "server: expected mapping, got integer"),
        ("server: { addr: 8080 }", "server.addr: expected string, got integer"),
        ("server: { workers: two }", "server.workers: expected integer, got string"),
        ("server: { workers: 1.5 }", "server.workers: expected integer, got number"),
        ("server: { access_log: maybe }", "server.access_log: expected boolean, got string"),
        ("database: { dsn: [a] }", "database.dsn: expected string, got list"),
        ("auth: { admin_key: 5 }", "auth.admin_key: expected string, got integer"),
        ("providers: { name: fake }", "providers: expected list, got mapping"),
        ("providers: [fake]", "providers[0]: expected mapping, got string"),
        ("providers: [{ name: 5, type: fake }]", "providers[0].name: expected string, got integer"),
        ("providers: [{ type: fake }]", "providers[0].name: required but missing"),
        ("routes: 1", "routes: expected list, got integer"),
        ("keys: [{ name: k, key: 12345 }]", "keys[0].key: expected string, got integer"),
        ("server: { 1: x }", "server: invalid key 1 (keys must be strings)"),
        ("1: x", "invalid key 1 (keys must be strings)"),
    ],
)
def test_wrong_types(text: str, message: str) -> None:
    assert error(text + "\n") == f"gandalf.yaml: {message}"


def test_recursive_yaml_alias_is_rejected() -> None:
    message = error("server: &s { addr: *s }\n")
    assert "nested too deeply" in message


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    "text",
    [
        f"providers: [{{ name: openai, api_key: '{SECRET}${{' }}]",
        f"providers: [{{ name: openai, api_key: '${{{SECRET}}}' }}]",
        f"keys: [{{ name: k, key: '{SECRET}${{1X}}' }}]",
        f"auth: {{ admin_key: '${{{SECRET}:-x}}' }}",
        f"providers: [{{ name: openai, api_key: {SECRET}, type: nope }}]",
        f"providers: [{{ name: openai, api_key: {SECRET}, bogus: 1 }}]",
        f"providers: [{{ name: openai, api_key: {SECRET}, models: 7 }}]",
        f"providers: [{{ name: openai, api_key: {SECRET} }}]\nroutes: [{{ model_alias: m }}]",
        f"keys: [{{ name: k, key: '{SECRET}' }}]",
        f"keys: [{{ name: k, key: '{SECRET}', role: nope }}]",
        f"auth: {{ admin_key: '{SECRET}' }}",
        f"server: {{ addr: x }}\nauth: {{ admin_key: '{SECRET}' }}",
        f"providers:\n  - name: openai\n    api_key: {SECRET}: x",
    ],
)
def test_secrets_never_in_errors(text: str) -> None:
    message = error(text + "\n", {"OPENAI_API_KEY": SECRET})
    assert "TOPSECRET" not in message


def test_secrets_never_in_warnings_or_repr() -> None:
    cfg = parse(
        f"""
        auth: {{ admin_key: '${{ADMIN}}' }}
        providers: [{{ name: openai, api_key: '${{OPENAI_API_KEY}}' }}, {{ name: gemini }}]
        keys: [{{ name: a, key: '${{UNSET}}' }}, {{ name: b, key: {KEY_B} }}]
        """,
        {"ADMIN": KEY_A, "OPENAI_API_KEY": SECRET},
    )
    assert len(cfg.warnings) == 2
    for text in (*cfg.warnings, repr(cfg.auth), *map(repr, cfg.keys)):
        assert SECRET not in text and KEY_A not in text and KEY_B not in text


# --------------------------------------------------------------------------- default path


def test_default_config_path() -> None:
    assert default_config_path({}) == "gandalf.yaml"
    assert default_config_path({"GANDALF_CONFIG": ""}) == "gandalf.yaml"
    assert default_config_path({"GANDALF_CONFIG": "/etc/gandalf.yaml"}) == "/etc/gandalf.yaml"


def test_result_is_frozen() -> None:
    cfg = parse("{}")
    with pytest.raises(AttributeError):
        cfg.server.addr = "x"  # type: ignore[misc]


def test_provider_output_limit_and_azure_settings() -> None:
    cfg = parse(
        "providers:\n"
        "  - { name: claude, type: anthropic, api_key: k, max_tokens: 8192 }\n"
        "  - { name: az, type: azure, api_key: k, base_url: 'https://r.openai.azure.com/',"
        " api_version: '2025-01-01' }\n"
    )
    claude, az = cfg.providers
    assert claude.max_tokens == 8192 and claude.base_url == "https://api.anthropic.com"
    assert (az.base_url, az.api_version) == ("https://r.openai.azure.com", "2025-01-01")
    assert error("providers: [{ name: az, type: azure, api_key: k }]\n") == (
        "gandalf.yaml: providers[0].base_url: required for type 'azure' "
        "(https://<resource>.openai.azure.com)"
    )
    assert "providers[0].max_tokens" in error(
        "providers: [{ name: anthropic, api_key: k, max_tokens: 0 }]\n"
    )


def test_older_spellings_need_no_declaration_new_ones_do() -> None:
    """A config written before orgs:/teams: existed keeps loading (org_id/team_id name
    tenants that need no declaration); the new spellings are checked against
    orgs:/teams:, so a typo is refused instead of becoming an unlimited tenant."""
    base = MINIMAL_PROVIDERS + "routes: []\nkeys:\n"
    old = parse(base + f"  - {{ name: a, key: {KEY_A}, org_id: acme, team_id: infra }}\n")
    assert (old.keys[0].org_id, old.keys[0].team_id) == ("acme", "infra")
    assert "unknown org 'acme'" in error(base + f"  - {{ name: a, key: {KEY_A}, org: acme }}\n")
    assert "unknown team 'infra'" in error(base + f"  - {{ name: a, key: {KEY_A}, team: infra }}\n")
