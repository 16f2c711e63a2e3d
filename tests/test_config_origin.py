"""config: an invalid value names the variable it came from; a repeated YAML key is refused."""

from __future__ import annotations

import pytest

from gandalf.config import parse_config
from gandalf.errors import ConfigError


def _error(text: str, env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="g.yaml", env=env)
    return str(info.value)


def test_an_invalid_value_from_an_unset_variable_names_it() -> None:
    message = _error("server:\n  addr: ${GANDALF_ADDR}\n", {})
    assert message.startswith("g.yaml: server.addr: invalid address ''")
    assert message.endswith("(from ${GANDALF_ADDR}, which is unset)")


def test_an_empty_variable_is_called_empty_and_several_are_each_described() -> None:
    assert _error("server: {addr: '${A}'}\n", {"A": ""}).endswith("(from ${A}, which is empty)")
    message = _error("server: {addr: '${HOST}:${PORT}'}\n", {"HOST": "h"})
    assert message.endswith("(from ${HOST}, ${PORT} (unset))")


def test_a_number_from_an_unset_variable_names_it() -> None:
    message = _error("server:\n  workers: ${WORKERS}\n", {})
    assert message.startswith("g.yaml: server.workers: ")
    assert "(from ${WORKERS}, which is unset)" in message


def test_a_literal_invalid_value_says_nothing_about_variables() -> None:
    assert "from $" not in _error("server: {addr: nope}\n", {"nope": "x"})


def test_a_secret_from_a_variable_is_named_but_never_shown() -> None:
    message = _error("auth: {admin_key: '${ADMIN}'}\n", {"ADMIN": "hunter2-not-a-key"})
    assert "hunter2" not in message and "(from ${ADMIN})" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server:\n  addr: 1.2.3.4:80\nserver:\n  workers: 2\n", "g.yaml: server: duplicate key"),
        (
            "providers:\n  - name: a\n    type: fake\n    type: openai\n",
            "g.yaml: providers[0].type: duplicate key (line 4; first at line 3)",
        ),
        ("server: {addr: '1.1.1.1:1', addr: '2.2.2.2:2'}\n", "g.yaml: server.addr: duplicate key"),
    ],
)
def test_a_repeated_key_is_refused_naming_it(text: str, expected: str) -> None:
    assert _error(text, {}).startswith(expected)


def test_merge_keys_and_aliases_are_not_duplicates() -> None:
    text = (
        "x-t: &t {provider: fake, model: m}\n"
        "providers: [{name: fake}]\n"
        "routes:\n  - model_alias: a\n    targets: [{<<: *t, priority: 2}, *t]\n"
    )
    with pytest.raises(ConfigError, match="x-t: unknown key"):  # parsed fine; then validated
        parse_config(text, source="g.yaml", env={})
