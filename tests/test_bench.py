"""``gandalf bench`` (gandalf/benchkit/): the command against the in-process mock
upstream (tests/upstream.py, a thread of this process) and against a ``gandalf
serve`` with the fake provider (its pace and its injected errors); the JSON's
fields, the HTML report (parsed, its charts' data read back), ``--compare``, the
open loop's schedule, wrk. Runs are short (0.5 s) and bounded; nothing waits on
a sleep."""

from __future__ import annotations

import asyncio
import io
import json
import math
import socket
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from gandalf.auth.apikey import generate_key
from gandalf.benchkit import engine, report, stats, wrk
from gandalf.benchkit.cli import duration
from gandalf.cli import main
from tests.serve import GandalfServer, route
from tests.upstream import MockUpstream

KEY = "sk-bench-test"
SHORT = ["--duration", "0.5s", "--warmup", "0.1s", "--ceiling", "0"]
MEMBER = generate_key()


def bench(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["bench", *args])
    out, err = capsys.readouterr()
    return code, out, err


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


class _Report(HTMLParser):
    """The report's JSON block, its SVG charts' titles, and everything it links to."""

    def __init__(self) -> None:
        super().__init__()
        self.data: list[str] = []
        self.svg_titles: list[str] = []
        self.external: list[str] = []
        self._in_data = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script":
            assert a.get("type") == "application/json", "the report runs no script"
            self._in_data = True
        if tag == "svg":
            self.svg_titles.append(a.get("aria-label") or "")
        for name in ("src", "href"):
            if a.get(name):
                self.external.append(str(a[name]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_data = False

    def handle_data(self, data: str) -> None:
        if self._in_data:
            self.data.append(data)


def parse_html(text: str) -> _Report:
    parser = _Report()
    parser.feed(text)
    parser.close()
    return parser


# ---------------------------------------------------------------------------- units


def test_percentiles_and_summary() -> None:
    values = [float(v) for v in range(1, 101)]
    assert stats.percentile(values, 50) == 50.0
    assert stats.percentile(values, 99) == 99.0
    assert stats.summary(values) == {
        "p50": 50.0,
        "p90": 90.0,
        "p99": 99.0,
        "mean": 50.5,
        "max": 100.0,
    }
    assert stats.summary([]) is None
    hist = stats.histogram(values, bins=10)
    assert sum(hist["counts"]) == 100 and len(hist["edges_ms"]) == 11


@pytest.mark.parametrize(
    ("base", "url"),
    [
        ("http://h:1", "http://h:1/v1/chat/completions"),
        ("http://h:1/", "http://h:1/v1/chat/completions"),
        ("http://h:1/v1", "http://h:1/v1/chat/completions"),
        ("http://h:1/openai/v1/", "http://h:1/openai/v1/chat/completions"),
        ("http://h:1/v1/chat/completions", "http://h:1/v1/chat/completions"),
    ],
)
def test_chat_url(base: str, url: str) -> None:
    assert engine.chat_url(base) == url


def test_durations() -> None:
    assert duration("30s", "--d") == 30.0
    assert duration("500ms", "--d") == 0.5
    assert duration("2m", "--d") == 120.0
    assert duration("1.5", "--d") == 1.5


def test_progress_line_on_a_terminal_and_plain_lines_elsewhere() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    rec = engine.Recorder(w0=0.0, w1=1.0, done=40, failed=2)
    tty = Tty()
    engine.progress_printer("c=4", 10.0, tty)(rec, 1.0)
    assert tty.getvalue().startswith("\r\x1b[2K") and "40 requests" in tty.getvalue()
    assert "errors 2" in tty.getvalue() and "\n" not in tty.getvalue()
    plain = io.StringIO()
    show = engine.progress_printer("c=4", 10.0, plain)
    show(rec, 1.0)  # under 5 s since the last line: nothing yet
    show(rec, 5.0)
    assert plain.getvalue().count("\n") == 1 and "\r" not in plain.getvalue()


_USAGE_BODY = b'{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":7,"total_tokens":8}}'


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(_USAGE_BODY), _USAGE_BODY),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(
            b"%x\r\n%s\r\n" % (len(part), part) for part in (_USAGE_BODY[:10], _USAGE_BODY[10:])
        )
        + b"0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + _USAGE_BODY,
    ],
    ids=["content-length", "chunked", "close-delimited"],
)
def test_the_client_reads_every_framing(answer: bytes) -> None:
    """Two requests in a row, each answered and read whole (usage found), with the
    connection reused or, after a close-delimited answer, opened anew."""
    connections = 0
    handlers: list[asyncio.Future[None]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        finished = asyncio.get_running_loop().create_future()
        handlers.append(finished)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer:
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()
        await writer.wait_closed()
        finished.set_result(None)

    async def main() -> engine.Recorder:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = engine.Pool(f"http://127.0.0.1:{port}/v1/chat/completions", b"{}", {})
        rec = engine.Recorder(w0=0.0, w1=math.inf)
        try:
            for _ in range(2):
                await engine.one_request(pool, False, 5.0, rec)
        finally:
            await pool.aclose()
            server.close()
            await server.wait_closed()
            await asyncio.wait_for(asyncio.gather(*handlers), 5.0)  # each saw its client go
        return rec

    rec = asyncio.run(main())
    assert rec.ok == 2 and not rec.errors
    assert rec.tokens == 14 and rec.tokens_from_usage == 2
    assert connections == (2 if b"Connection: close" in answer else 1)


# ---------------------------------------------------------------------------- the mock


def test_closed_loop_against_the_mock(
    mock: MockUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = len(mock.received)
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    code, out, err = bench(
        capsys,
        mock.base_url,
        "--model",
        "ok-bench",
        "--key",
        KEY,
        "--concurrency",
        "1,4",
        "--engine",
        "builtin",
        "--prompt-tokens",
        "8",
        "--max-tokens",
        "16",
        *SHORT,
        "--json",
        str(out_json),
        "--html",
        str(out_html),
    )
    assert code == 0, err
    data = load(out_json)
    assert data["tool"] == "gandalf bench"
    assert data["settings"]["model"] == "ok-bench" and data["settings"]["concurrency"] == [1, 4]
    assert [r["concurrency"] for r in data["runs"]] == [1, 4]
    for run in data["runs"]:
        assert run["mode"] == "closed" and run["engine"] == "builtin"
        assert run["ok"] > 0 and run["errors"] == {} and run["error_count"] == 0
        assert run["requests"] == run["ok"]
        assert math.isclose(run["rps"], run["ok"] / 0.5, rel_tol=1e-3)
        lat = run["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert run["tokens_source"] == "usage" and run["tokens"] > 0
        assert run["ttft_ms"] is None and run["itl_ms"] is None
        assert sum(run["histogram"]["counts"]) == run["ok"]
        assert len(run["over_time"]["p50_ms"]) == len(run["over_time"]["t_s"])
        assert [p for p, _ in run["cdf_ms"]] == list(stats.CDF_POINTS)
        assert run["client_cpu"] >= 0
    assert out.splitlines()[0].split()[:3] == ["run", "engine", "req/s"]
    assert "c=4" in out
    # What was sent: the model, max_tokens, a prompt, the key.
    sent = mock.received[before]
    assert {k.lower(): v for k, v in sent.headers.items()}["authorization"] == f"Bearer {KEY}"
    body = json.loads(sent.body)
    assert body["model"] == "ok-bench" and body["max_tokens"] == 16
    assert body["messages"][0]["content"].count("hello") == 8
    assert "stream" not in body
    # The HTML report: parses, links nothing, and holds the charts' data as JSON.
    page = parse_html(out_html.read_text())
    assert page.external == []
    assert json.loads("".join(page.data)) == data
    assert page.svg_titles.count("Latency over time") == 2
    assert page.svg_titles.count("Latency distribution") == 2
    assert "Requests/s per run" in page.svg_titles


def test_streams_against_the_mock(
    mock: MockUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = len(mock.received)
    out_json, out_html = tmp_path / "s.json", tmp_path / "s.html"
    code, _, err = bench(
        capsys,
        mock.base_url,
        "--model",
        "stream-5",
        "--stream",
        "--concurrency",
        "2",
        "--engine",
        "auto",  # a stream: the built-in client even where wrk is installed
        *SHORT,
        "--json",
        str(out_json),
        "--html",
        str(out_html),
    )
    assert code == 0, err
    run = load(out_json)["runs"][0]
    assert run["engine"] == "builtin" and run["ok"] > 0
    assert run["ttft_ms"]["p50"] <= run["latency_ms"]["p50"]
    assert run["itl_ms"] is not None
    assert run["tokens_source"] == "usage"
    assert sum(run["ttft_histogram"]["counts"]) == run["ok"]
    body = json.loads(mock.received[before].body)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    page = parse_html(out_html.read_text())
    assert "Time to first token" in page.svg_titles


def test_errors_are_counted_by_status(
    mock: MockUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json = tmp_path / "e.json"
    code, out, _ = bench(
        capsys,
        mock.base_url,
        "--model",
        "status-503",
        "--concurrency",
        "2",
        "--engine",
        "builtin",
        *SHORT,
        "--json",
        str(out_json),
    )
    assert code == 1  # nothing succeeded: a script can tell
    run = load(out_json)["runs"][0]
    assert run["ok"] == 0 and set(run["errors"]) == {"503"}
    assert run["error_count"] == run["errors"]["503"] == run["requests"] > 0
    assert "no request succeeded" in out


@pytest.fixture
def silent_port() -> Iterator[int]:
    """Listening, never accepting: connections open (the kernel's backlog) and
    requests are never answered."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(128)
        yield holder.getsockname()[1]


def test_open_loop_keeps_the_schedule(
    mock: MockUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json = tmp_path / "o.json"
    code, _, err = bench(
        capsys,
        mock.base_url,
        "--model",
        "ok-open",
        "--rate",
        "40",
        "--duration",
        "0.5s",
        "--warmup",
        "0.25s",
        "--ceiling",
        "0",
        "--json",
        str(out_json),
    )
    assert code == 0, err
    run = load(out_json)["runs"][0]
    assert run["mode"] == "open" and run["rate"] == 40 and run["concurrency"] is None
    loop = run["open_loop"]
    assert loop["scheduled"] == 20  # 40/s for 0.5 s, the 10 warm-up requests apart
    assert loop["sent"] + loop["missed"] == loop["scheduled"]
    assert loop["missed"] == 0 and run["ok"] == loop["sent"]
    assert loop["lateness_ms"]["p50"] >= 0


def test_open_loop_counts_what_it_could_not_send(
    silent_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json = tmp_path / "m.json"
    code, out, _ = bench(
        capsys,
        f"http://127.0.0.1:{silent_port}/v1",
        "--model",
        "m",
        "--rate",
        "40",
        "--max-in-flight",
        "3",
        "--timeout",
        "1s",
        "--duration",
        "0.5s",
        "--warmup",
        "0",
        "--ceiling",
        "0",
        "--json",
        str(out_json),
    )
    assert code == 1
    run = load(out_json)["runs"][0]
    loop = run["open_loop"]
    # Nothing is answered: three requests wait, every later one finds no room.
    assert loop["scheduled"] == 20 and loop["sent"] == 3 and loop["missed"] == 17
    assert run["errors"] == {"timeout": 3}
    assert "could not keep the schedule" in out


def test_the_clients_ceiling_is_measured(
    mock: MockUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json = tmp_path / "c.json"
    code, out, err = bench(
        capsys,
        mock.base_url,
        "--model",
        "ok-ceiling",
        "--concurrency",
        "2",
        "--engine",
        "builtin",
        "--duration",
        "0.3s",
        "--warmup",
        "0",
        "--ceiling",
        "0.3s",
        "--json",
        str(out_json),
    )
    assert code == 0, err
    run = load(out_json)["runs"][0]
    assert run["client_ceiling_rps"] > 0
    assert isinstance(run["client_bound"], bool)
    assert f"{run['client_ceiling_rps']:,.0f} req/s" in out


def test_compare_prints_before_and_after(
    mock: MockUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_path = tmp_path / "a.json"
    code, _, err = bench(
        capsys,
        mock.base_url,
        "--model",
        "ok-cmp",
        "--concurrency",
        "2",
        "--engine",
        "builtin",
        *SHORT,
        "--json",
        str(a_path),
    )
    assert code == 0, err
    a = load(a_path)
    b = json.loads(json.dumps(a))
    b["runs"][0]["rps"] = a["runs"][0]["rps"] * 2
    b["runs"][0]["latency_ms"]["p99"] = a["runs"][0]["latency_ms"]["p99"] * 3
    b_path = tmp_path / "b.json"
    b_path.write_text(json.dumps(b))
    html_path = tmp_path / "cmp.html"
    code, out, _ = bench(capsys, "--compare", str(a_path), str(b_path), "--html", str(html_path))
    assert code == 0
    lines = {tuple(line.split()[:2]): line for line in out.splitlines()[1:]}
    assert lines[("c=2", "req/s")].endswith("+100.0% better")
    assert lines[("c=2", "p99")].endswith("+200.0% worse")
    page = parse_html(html_path.read_text())
    assert json.loads("".join(page.data))["rows"] == report.compare_rows(a, b)


@pytest.mark.parametrize(
    "args",
    [
        [],  # no URL
        ["http://127.0.0.1:9/v1"],  # no model
        ["127.0.0.1:9", "--model", "m"],  # no scheme
        ["http://127.0.0.1:9/v1", "--model", "m", "--duration", "soon"],
        ["http://127.0.0.1:9/v1", "--model", "m", "--concurrency", "0"],
        ["http://127.0.0.1:9/v1", "--model", "m", "--engine", "wrk", "--stream"],
    ],
)
def test_bad_usage_is_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = bench(capsys, *args)
    assert code == 2
    assert err.startswith("gandalf: error: ")


def test_compare_refuses_what_is_not_a_bench_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "x.json"
    other.write_text("[1, 2]")
    code, _, err = bench(capsys, "--compare", str(other), str(other))
    assert code == 2 and "not a gandalf bench JSON file" in err


@pytest.mark.skipif(not wrk.available(), reason="wrk is not installed")
def test_wrk_for_a_closed_loop_without_streams(
    mock: MockUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json = tmp_path / "w.json"
    code, _, err = bench(
        capsys,
        mock.base_url,
        "--model",
        "ok-wrk",
        "--key",
        KEY,
        "--concurrency",
        "2",
        "--duration",
        "1s",
        "--warmup",
        "0",
        "--json",
        str(out_json),
    )
    assert code == 0, err
    run = load(out_json)["runs"][0]
    assert run["engine"] == "wrk" and run["ok"] > 0 and run["errors"] == {}
    assert run["tokens_source"] == "probe" and run["tokens"] > 0
    assert 0 < run["latency_ms"]["p50"] <= run["latency_ms"]["p99"]
    assert [p for p, _ in run["cdf_ms"]] == list(stats.CDF_POINTS)
    headers = {k.lower(): v for k, v in mock.received[-1].headers.items()}
    assert headers["authorization"] == f"Bearer {KEY}"


# ---------------------------------------------------------------------------- gandalf serve


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GandalfServer]:
    """Two fake providers: ``paced`` streams like a model (20 ms to the first token,
    500 tokens/s), ``flaky`` fails a third of its requests with a 429 (seeded)."""
    tmp = tmp_path_factory.mktemp("bench-gateway")
    config = {
        "server": {"access_log": False},
        "providers": [
            {"name": "paced", "type": "fake", "ttft_ms": 20, "tokens_per_second": 500},
            {
                "name": "flaky",
                "type": "fake",
                "errors": {"rate_429": 0.3, "retry_after": 2, "seed": 11},
            },
        ],
        "routes": [
            route("paced-model", "paced", "paced-1"),
            {**route("flaky-model", "flaky", "flaky-1"), "max_attempts": 1},
        ],
        "keys": [{"name": "bench", "key": MEMBER, "role": "member"}],
    }
    with GandalfServer(tmp, config) as server:
        yield server


def test_against_gandalf_with_a_paced_fake_provider(
    gateway: GandalfServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json = tmp_path / "g.json"
    code, _, err = bench(
        capsys,
        gateway.base_url,
        "--model",
        "paced-model",
        "--key",
        MEMBER,
        "--stream",
        "--prompt-tokens",
        "4",
        "--concurrency",
        "4",
        *SHORT,
        "--json",
        str(out_json),
    )
    assert code == 0, err + gateway.diagnostics()
    run = load(out_json)["runs"][0]
    assert run["ok"] > 0 and run["errors"] == {}
    assert run["ttft_ms"]["p50"] >= 20.0  # the provider's ttft_ms
    assert run["itl_ms"]["p50"] >= 1.0  # ~2 ms a token at 500 tokens/s
    assert run["tokens_source"] == "usage" and run["tokens"] > 0


def test_against_gandalf_injected_429s_are_counted(
    gateway: GandalfServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json = tmp_path / "f.json"
    code, _, err = bench(
        capsys,
        gateway.base_url,
        "--model",
        "flaky-model",
        "--key",
        MEMBER,
        "--concurrency",
        "2",
        "--engine",
        "builtin",
        *SHORT,
        "--json",
        str(out_json),
    )
    assert code == 0, err + gateway.diagnostics()
    run = load(out_json)["runs"][0]
    assert set(run["errors"]) == {"429"}
    share = run["errors"]["429"] / run["requests"]
    assert run["requests"] >= 50, run  # enough draws for the share to mean something
    assert 0.15 < share < 0.45, run  # rate_429: 0.3


def test_an_open_loop_request_is_never_sent_before_its_time() -> None:
    """uvloop rounds a timer to whole milliseconds of a cached clock, so one
    ``sleep(due - now)`` can wake before ``due`` (a negative lateness, seen
    as a flaky ``p50 >= 0`` above): the wait repeats until ``due``."""
    import uvloop

    from gandalf.benchkit.engine import sleep_until

    async def waits() -> list[float]:
        early = []
        for i in range(200):  # delays of 0 to 2 ms, the sub-millisecond ones included
            due = time.perf_counter() + (i % 20) / 10_000
            await sleep_until(due)
            early.append(due - time.perf_counter())
        return early

    assert max(uvloop.run(waits())) <= 0
