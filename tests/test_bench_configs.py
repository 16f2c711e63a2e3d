"""The served benches' configurations (bench/_procs.py): each ``--governance``
choice of ``bench/ab.py`` writes a config Gandalf accepts, limiting the bench
key at the levels and in the dimensions the choice names and nothing else, so
an A/B of one choice against ``off`` measures that piece alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gandalf.config import KeyEntry, load_config
from gandalf.domain import Organization, Team

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _procs import GOVERNANCE, write_gandalf_config

BUDGETED = ("on", "budgets")
RATED = ("on", "rates")
KEY_ONLY = {"key": "rpm", "key-tpm": "tpm", "key-budget": "budget", "off": None}


@pytest.mark.parametrize("governance", GOVERNANCE)
def test_each_governance_choice_limits_what_it_names(governance: str, tmp_path: Path) -> None:
    path = write_gandalf_config(tmp_path, 18000, 18001, governance=governance)
    config = load_config(path, env={})
    (key,) = config.keys
    three = governance not in KEY_ONLY
    levels: list[KeyEntry | Team | Organization] = [key, *config.teams, *config.orgs]
    assert len(levels) == (3 if three else 1)
    if three:
        assert key.team_id == "bench-team" and config.teams[0].org_id == "bench-org"
    alone = KEY_ONLY.get(governance)
    for level in levels:
        assert bool(level.rpm) == (governance in RATED or alone == "rpm"), level
        assert bool(level.tpm) == (governance in RATED or alone == "tpm"), level
        budgeted = governance in BUDGETED or alone == "budget"
        assert (level.budget is not None) == budgeted, level
    # A price for the mock's model exactly when a budget has to be reserved against.
    assert [(p.provider, p.model) for p in config.pricing] == (
        [("mock", "bench-model")] if governance in BUDGETED or alone == "budget" else []
    )
