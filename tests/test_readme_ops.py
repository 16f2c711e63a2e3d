"""README: the operations it documents exist and its commands do what it says."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from pathlib import Path

import yaml

from gandalf.auth.apikey import generate_key
from gandalf.config import parse_config
from gandalf.domain import UsageRecord
from gandalf.storage.sqlite import SqliteStore
from tests.serve import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def test_the_first_lines_still_give_the_two_fresh_machine_commands() -> None:
    head = README[:600]
    assert "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/gandalf serve" in head
    assert ".venv/bin/pip install -q -e '.[dev]' && .venv/bin/python -m pytest" in head


def test_deployment_covers_proxies_kubernetes_rotation_and_backups() -> None:
    deployment = _section("Deployment")
    for needle in (
        "proxy_buffering off",
        "X-Accel-Buffering: no",
        "terminationGracePeriodSeconds",
        "preStop",
        "/healthz",
        "/readyz",
        "runAsNonRoot",
        "one SQLite file per pod",
        ".backup",
        "VACUUM INTO",
        "How it was last built",
    ):
        assert needle in deployment, needle
    assert "### Rotating a key" in _section("Keys and roles")
    assert "pip install rust-just" in _section("Development")


def test_every_gandalf_variable_the_deployment_names_exists() -> None:
    code = "".join(p.read_text(encoding="utf-8") for p in (REPO_ROOT / "gandalf").rglob("*.py"))
    code += (REPO_ROOT / "Containerfile").read_text(encoding="utf-8")
    code += (REPO_ROOT / "gandalf.yaml").read_text(encoding="utf-8")
    for name in set(re.findall(r"GANDALF_[A-Z_]+", _section("Deployment"))):
        assert name in code, name


def test_the_prune_statement_deletes_only_old_usage(tmp_path: Path) -> None:
    (statement,) = re.findall(r'"(DELETE FROM usage_records WHERE [^"]+)"', README)
    db = str(tmp_path / "g.db")
    now = time.time()

    async def seed() -> None:
        store = SqliteStore(db)
        await store.open()
        try:
            for age_days in (200, 91, 89, 0):
                store.record_usage(
                    UsageRecord(
                        f"req_{age_days}", None, None, "m", "m", "fake", 1, 1, 2, 1.0, 200,
                        now - age_days * 86400,
                    )
                )  # fmt: skip
            await store.flush()
        finally:
            await store.close()

    asyncio.run(seed())
    with sqlite3.connect(db) as conn:
        conn.execute(statement)
        left = sorted(r[0] for r in conn.execute("SELECT request_id FROM usage_records"))
    conn.close()
    assert left == ["req_0", "req_89"]


def test_the_governance_example_loads_on_the_shipped_config() -> None:
    """The "Limits, budgets and cost" worked example, added to the shipped
    gandalf.yaml (whose providers serve gpt-4o and claude-*), is a valid config
    and means what the README says."""
    section = _section("Limits, budgets and cost")
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    shipped = yaml.safe_load((REPO_ROOT / "gandalf.yaml").read_text(encoding="utf-8"))
    merged = {**shipped, **yaml.safe_load(example)}
    key = generate_key()
    config = parse_config(
        yaml.safe_dump(merged),
        source="gandalf.yaml",
        env={"SVC_KEY": key, "OPENAI_API_KEY": "sk-x", "ANTHROPIC_API_KEY": "sk-y"},
    )
    (svc,) = [k for k in config.keys if k.name == "svc"]
    assert (svc.org_id, svc.team_id, svc.rpm) == ("acme", "backend", 100)
    assert svc.budget is not None and (svc.budget.usd, svc.budget.period) == (10, "daily")
    assert config.limits.rpm == 60
    assert [(o.id, o.rpm, o.tpm) for o in config.orgs] == [("acme", 1000, 200000)]
    assert [(t.id, t.org_id, t.tpm) for t in config.teams] == [("backend", "acme", 50000)]
    assert [(p.provider, p.model, p.input) for p in config.pricing] == [("openai", "gpt-4o", 2.5)]
