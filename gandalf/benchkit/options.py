"""``gandalf bench``'s arguments: stdlib only, so that building gandalf's parser
(every command) does not import the load generator (aiohttp and the rest)."""

from __future__ import annotations

from typing import Any


def add_parser(sub: Any) -> None:
    """Add ``bench`` to gandalf's subcommands (``sub``: argparse's subparsers)."""
    p = sub.add_parser(
        "bench",
        help="load-test an OpenAI-compatible endpoint (req/s, tokens/s, latency, TTFT)",
        description="Load-test an OpenAI-compatible endpoint (Gandalf, OpenAI, vLLM, Ollama, "
        "another gateway): closed loop (--concurrency) or open loop (--rate), warm-up excluded.",
    )
    p.add_argument("url", nargs="?", help="base URL, e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--model", help="model to ask for")
    p.add_argument("--key", help="API key (default: $OPENAI_API_KEY)")
    p.add_argument(
        "--concurrency",
        default="1,16,64",
        help="closed loop: connections, a comma list (default: 1,16,64)",
    )
    p.add_argument(
        "--rate", help="open loop: requests per second, comma list (replaces --concurrency)"
    )
    p.add_argument(
        "--duration", default="10s", help="measured time per run: 10s, 500ms, 1m (default: 10s)"
    )
    p.add_argument("--warmup", default="2s", help="unmeasured time before each run (default: 2s)")
    p.add_argument("--stream", action="store_true", help="streamed answers (TTFT, inter-token)")
    p.add_argument(
        "--prompt-tokens", type=int, default=32, help="the prompt's size, about (default: 32)"
    )
    p.add_argument(
        "--max-tokens", type=int, default=64, help="each request's max_tokens (default: 64)"
    )
    p.add_argument("--timeout", default="60s", help="per request (default: 60s)")
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=1024,
        help="open loop: requests waiting at most (default: 1024)",
    )
    p.add_argument(
        "--engine",
        choices=["auto", "builtin", "wrk"],
        default="auto",
        help="auto: wrk when installed and the run allows it (closed loop, not streamed)",
    )
    p.add_argument(
        "--ceiling",
        default="1s",
        help="how long to measure the built-in client's own ceiling per run (default: 1s; 0: skip)",
    )
    p.add_argument("--json", dest="json_out", help="write the results as JSON to this file")
    p.add_argument("--html", dest="html_out", help="write the HTML report to this file")
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A.json", "B.json"),
        help="print a before/after table of two JSON results (with --html: as HTML too)",
    )
