"""The served benches' configurations (bench/_procs.py): each ``--governance``
choice of ``bench/ab.py`` writes a config Gandalf accepts, limiting the bench
key at the levels and in the dimensions the choice names and nothing else, so
an A/B of one choice against ``off`` measures that piece alone."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from gandalf.config import KeyEntry, load_config
from gandalf.domain import Organization, Team

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _procs import GOVERNANCE, thread_delta, thread_times, write_gandalf_config

BUDGETED = ("on", "budgets")
RATED = ("on", "rates")
KEY_ONLY = {"key": "rpm", "key-tpm": "tpm", "key-budget": "budget", "price": None, "off": None}


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
    # A price for the mock's model exactly when a budget has to be reserved
    # against, or when the price alone is measured.
    priced = governance in BUDGETED or alone == "budget" or governance == "price"
    assert [(p.provider, p.model) for p in config.pricing] == (
        [("mock", "bench-model")] if priced else []
    )


# A callgrind output file as valgrind 3.19 writes it (names compressed to
# "(n)" after their first use; "calls=" lines followed by inclusive costs).
_CALLGRIND = """# callgrind format
version: 1
events: Ir
ob=(1) /usr/lib/libpython3.11.so.1.0
fl=(1) ???
fn=(1) _PyEval_EvalFrameDefault
0 500
+3 20
cob=(2) /venv/granian/_granian.cpython-311-x86_64-linux-gnu.so
cfn=(2) 0x00000000001f3818
calls=2 0
0 9000
0 7
ob=(2)
fn=(2)
0 300
ob=(3) /usr/lib/x86_64-linux-gnu/libmimalloc.so
fn=(3) mi_free
0 11
totals: 838
"""


def test_served_callgrind_counts_self_costs_per_object(tmp_path: Path) -> None:
    from served_cg import by_object, totals

    path = tmp_path / "cg.1.1"
    path.write_text(_CALLGRIND)
    assert totals(path) == 838
    # The call's inclusive 9000 is the callee's, counted where it is spent.
    assert by_object(path) == {"python": 527, "granian": 300, "other": 11}


def test_served_callgrind_reads_the_simulated_events_by_name(tmp_path: Path) -> None:
    # --simulate: the totals line carries every event of the events line;
    # instructions are still the first, and by_object still counts them only.
    from served_cg import _simulated_line, by_object, events, totals

    text = _CALLGRIND
    for old, new in (
        ("events: Ir\n", "events: Ir I1mr D1mr Bcm Bim\n"),
        ("0 500\n", "0 500 5 7 9 11\n"),
        ("totals: 838\n", "totals: 838 50 70 90 110\n"),
    ):
        assert text.count(old) == 1
        text = text.replace(old, new)
    path = tmp_path / "cg.1.1"
    path.write_text(text)
    assert totals(path) == 838
    assert events(path) == {"Ir": 838, "I1mr": 50, "D1mr": 70, "Bcm": 90, "Bim": 110}
    assert by_object(path)["python"] == 527
    line = _simulated_line({"I1mr": 55.0, "Bim": 100.0}, {"I1mr": 50.0, "Bim": 110.0})
    assert line == "I1 misses 55 (+5, +10.0%); indirect mispredicted 100 (-10, -9.1%)"


@pytest.mark.parametrize("openai_headers", [False, True])
def test_the_mock_sends_openais_headers_when_asked(openai_headers: bool) -> None:
    """``--upstream-headers openai`` (ab.py, served_cg.py): the mock's chat
    answers, plain and streamed, carry OpenAI's own headers, which the gateway
    relays (its x-ratelimit-* then replace the upstream's); by default only
    content-type, as before."""
    import httpx
    from mock_upstream import start_mock

    proc, port = start_mock(0, chunks=2, openai_headers=openai_headers)
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"model": "bench-model", "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(timeout=10.0) as client:
            plain = client.post(url, json=body)
            streamed = client.post(url, json={**body, "stream": True})
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
    for answer in (plain, streamed):
        assert answer.status_code == 200
        names = {name for name in answer.headers if name.startswith(("x-", "openai-"))}
        expected = {
            "openai-organization",
            "openai-processing-ms",
            "openai-version",
            "x-request-id",
            *(
                f"x-ratelimit-{w}-{u}"
                for w in ("limit", "remaining", "reset")
                for u in ("requests", "tokens")
            ),
        }
        assert names == (expected if openai_headers else set())


def test_thread_times_count_this_threads_cpu_and_switches() -> None:
    """ab.py's CPU per request: the scheduler's nanoseconds per thread (a
    thread of this process that burns CPU is counted, in full nanoseconds,
    not 10 ms ticks) and the context switches."""
    before, switches = thread_times([os.getpid()])
    assert threading.get_native_id() in before
    assert switches > 0  # pytest's own threads have been switched in and out by now
    total = 0
    for i in range(200_000):  # a bounded spin: a few ms of CPU
        total += i * i
    after, later = thread_times([os.getpid()])
    spent = thread_delta(before, after)
    assert total > 0
    assert 0 < spent < 5  # seconds: counted, and not in ticks of 10 ms
    assert later >= switches
    assert thread_times([2**22 + 12345])[0] == {}  # a process that is gone counts nothing


def test_thread_delta_counts_a_new_thread_from_zero_and_drops_a_gone_one() -> None:
    before = {1: 1_000_000_000, 2: 500_000_000}
    after = {1: 1_250_000_000, 3: 100_000_000}  # 2 ended, 3 began in between
    assert thread_delta(before, after) == pytest.approx(0.35)
