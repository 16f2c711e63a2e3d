"""Observability end to end: ``gandalf serve --workers 2`` (CONTRACT.md, "Observability").

Requests on fresh connections spread over both workers; ``/metrics`` (answered
by either) shows every request once, the token and cost counters at the
prices configured here, and the access log and gandalf's own lines on stderr
are one JSON object per line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from gandalf.auth.apikey import generate_key
from tests.serve import GandalfServer, free_port, wait_until

KEY = generate_key()
CHAT = "/v1/chat/completions"
SENT = 24
PER_TOKEN = 0.001  # USD: 1,000 per million


def _config() -> dict[str, Any]:
    return {
        "server": {"workers": 2},
        "log": {"format": "json"},
        "providers": [{"name": "fake", "type": "fake", "models": ["fake-model"]}],
        "keys": [{"name": "k", "key": KEY, "role": "member"}],
        "pricing": [{"provider": "fake", "model": "fake-model", "input": 1000, "output": 1000}],
    }


def _totals(text: str) -> tuple[float, float, float]:
    """(chat requests served, tokens, USD) in a scrape."""
    requests = tokens = cost = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "gandalf_requests_total" and labels.get("endpoint") == "chat":
                requests += sample.value
            elif sample.name == "gandalf_tokens_total" and labels["type"] in (
                "prompt",
                "completion",
            ):
                tokens += sample.value
            elif sample.name == "gandalf_cost_usd_total":
                cost += sample.value
    return requests, tokens, cost


def test_two_workers_merge_their_metrics_and_log_json(tmp_path: Path) -> None:
    spool = tmp_path / "spool"  # where gandalf serve makes its metrics directory
    spool.mkdir()
    with GandalfServer(tmp_path, _config(), env={"TMPDIR": str(spool)}) as server:
        used = 0
        for _ in range(SENT):  # a new connection each: both workers get some
            with httpx.Client(base_url=server.url, timeout=30.0) as client:
                reply = client.post(
                    CHAT,
                    json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"authorization": f"Bearer {KEY}"},
                )
            assert reply.status_code == 200, reply.text
            used += reply.json()["usage"]["total_tokens"]
        (directory,) = spool.glob("gandalf-metrics-*")

        def served_by_each() -> list[int]:
            counts = []
            for path in directory.glob("*.json"):
                snapshot = orjson.loads(path.read_bytes())
                counts.append(
                    sum(int(v[0]) for labels, v in snapshot["series"] if labels[0] == "chat")
                )
            return counts

        # Snapshots are written every second: wait (bounded) until both are current.
        wait_until(lambda: sum(served_by_each()) == SENT, 10.0, "both workers' snapshots")
        counts = served_by_each()
        assert len(counts) == 2 and all(counts), counts  # both workers served some

        scrapes = []
        for _ in range(6):  # fresh connections: either worker may answer; both merge
            with httpx.Client(base_url=server.url, timeout=30.0) as client:
                scrape = client.get("/metrics")
            assert scrape.status_code == 200
            scrapes.append(_totals(scrape.text))
        for requests, tokens, cost in scrapes:
            assert requests == SENT
            assert tokens == used
            assert abs(cost - used * PER_TOKEN) < 1e-9
        assert server.terminate() == 0
    lines = [line for line in server.stderr().splitlines() if line.startswith("{")]
    parsed = [orjson.loads(line) for line in lines]
    access = [line for line in parsed if line.get("path") == CHAT]
    assert len(access) == SENT
    assert all(line["provider"] == "fake" and line["tokens"]["total"] for line in access)
    own = [line for line in parsed if "logger" in line]
    assert own and all(line["logger"].startswith("gandalf") for line in own), parsed[-3:]
    # gandalf's own lines are JSON with log.format: json: no text-formatted one is left.
    assert " gandalf." not in server.stderr(), server.stderr()[-2000:]


def test_metrics_on_their_own_address(tmp_path: Path) -> None:
    """server.metrics_addr: /metrics there (the main process merges the workers'
    snapshots), and not on the API's address."""
    metrics_port = free_port()
    config = _config()
    config["server"] = {"workers": 2, "metrics_addr": f"127.0.0.1:{metrics_port}"}
    with GandalfServer(tmp_path, config) as server:
        for _ in range(4):
            with httpx.Client(base_url=server.url, timeout=30.0) as client:
                reply = client.post(
                    CHAT,
                    json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"authorization": f"Bearer {KEY}"},
                )
            assert reply.status_code == 200
        with httpx.Client(timeout=30.0) as client:
            assert client.get(f"{server.url}/metrics").status_code == 404

            def scraped() -> float:
                scrape = client.get(f"http://127.0.0.1:{metrics_port}/metrics")
                assert scrape.status_code == 200
                assert scrape.headers["content-type"].startswith("text/plain; version=0.0.4")
                return _totals(scrape.text)[0]

            # Snapshots are written every second: wait (bounded) for both workers'.
            wait_until(lambda: scraped() == 4, 10.0, "the workers' snapshots")
            # The workers' gauges reach the main process too: the fake provider's breaker.
            text = client.get(f"http://127.0.0.1:{metrics_port}/metrics").text
            assert 'gandalf_breaker_state{provider="fake"} 0' in text
            assert client.get(f"http://127.0.0.1:{metrics_port}/other").status_code == 404
