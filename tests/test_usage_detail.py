"""Detail token counts (cached, cache-write, reasoning) reach the domain Usage
for every provider, translated and relayed natively, streamed and not.

The native passthrough readers (native.py) must account an upstream answer
exactly as the translating adapter does: both are run over the same recorded
upstream answers (the golden files) and compared with the golden usage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from gandalf.domain import Usage
from gandalf.provider.native import anthropic_usage, gemini_usage, ollama_usage, openai_usage
from gandalf.provider.openai import extract_usage
from gandalf.provider.sse import EventRelay

GOLDEN = Path(__file__).parent / "golden"


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text("utf-8"))
    return data


def _cases(provider: str, kind: str) -> list[Path]:
    return sorted((GOLDEN / provider / kind).glob("*.json"))


# --------------------------------------------------------------------------- native == translated


@pytest.mark.parametrize("path", _cases("anthropic", "responses"), ids=lambda p: p.name)
def test_native_anthropic_answer_counts_as_translation(path: Path) -> None:
    case = _load(path)
    got = anthropic_usage(orjson.dumps(case["anthropic"]), b"", False)
    assert got == Usage(**case["usage"])


@pytest.mark.parametrize(
    "path",
    [p for p in _cases("anthropic", "streams") if _load(p)["usage"] is not None],
    ids=lambda p: p.name,
)
def test_native_anthropic_stream_counts_as_translation(path: Path) -> None:
    case = _load(path)
    transcript = (path.parent / case.get("transcript", path.stem + ".sse")).read_bytes()
    assert anthropic_usage(transcript, transcript, True) == Usage(**case["usage"])


@pytest.mark.parametrize("path", _cases("gemini", "responses"), ids=lambda p: p.name)
def test_native_gemini_answer_counts_as_translation(path: Path) -> None:
    case = _load(path)
    got = gemini_usage(orjson.dumps(case["gemini"]), b"", False)
    # No usageMetadata at all: no usage (None) natively, zeros translated.
    assert (got or Usage()) == Usage(**case["usage"])


@pytest.mark.parametrize(
    "path",
    [p for p in _cases("gemini", "streams") if _load(p)["usage"] is not None],
    ids=lambda p: p.name,
)
def test_native_gemini_stream_counts_as_translation(path: Path) -> None:
    case = _load(path)
    transcript = path.with_suffix(".sse").read_bytes()
    assert gemini_usage(transcript, transcript, True) == Usage(**case["usage"])


def test_golden_files_carry_detail_counts() -> None:
    """The parity above is not vacuous: the recorded answers report each
    detail count somewhere."""
    usages = [
        _load(p)["usage"] or {}
        for provider in ("anthropic", "gemini")
        for kind in ("responses", "streams")
        for p in _cases(provider, kind)
    ]
    for name in ("cached_prompt_tokens", "cache_write_tokens", "reasoning_tokens"):
        assert any(u.get(name) for u in usages), name


# --------------------------------------------------------------------------- OpenAI / Azure

# As OpenAI sends it (o-series answer served partly from the prompt cache).
OPENAI_USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 192,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
OPENAI_EXPECTED = Usage(
    prompt_tokens=1200,
    completion_tokens=300,
    total_tokens=1500,
    cached_prompt_tokens=1024,
    reasoning_tokens=192,
)
OPENAI_BODY = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "o3-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "finish_reason": "stop",
            }
        ],
        "usage": OPENAI_USAGE,
    }
)
OPENAI_STREAM = (
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":'
    + orjson.dumps(OPENAI_USAGE)
    + b"}\n\ndata: [DONE]\n\n"
)


def test_openai_answer_details() -> None:
    assert extract_usage(OPENAI_BODY) == OPENAI_EXPECTED
    assert openai_usage(OPENAI_BODY, b"", False) == OPENAI_EXPECTED  # Azure, natively


@pytest.mark.parametrize("drop_usage", [True, False])
def test_openai_stream_usage_chunk_details(drop_usage: bool) -> None:
    relay = EventRelay(drop_usage=drop_usage)
    relay.feed(OPENAI_STREAM)
    assert relay.usage == OPENAI_EXPECTED
    assert openai_usage(b"", OPENAI_STREAM, True) == OPENAI_EXPECTED  # Azure, natively


def test_openai_null_or_absent_details_count_zero() -> None:
    """OpenAI-compatible servers (vLLM, Ollama's /v1) send null or no details."""
    body = (
        b'{"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,'
        b'"prompt_tokens_details":null,"completion_tokens_details":{"reasoning_tokens":null}}}'
    )
    plain = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    assert extract_usage(body) == plain
    assert openai_usage(body, b"", False) == plain


def test_anthropic_native_details() -> None:
    body = (
        b'{"usage":{"input_tokens":10,"cache_read_input_tokens":5,'
        b'"cache_creation_input_tokens":4,"output_tokens":7}}'
    )
    assert anthropic_usage(body, b"", False) == Usage(
        prompt_tokens=19,
        completion_tokens=7,
        total_tokens=26,
        cached_prompt_tokens=5,
        cache_write_tokens=4,
    )


def test_ollama_has_no_details() -> None:
    body = b'{"done":true,"prompt_eval_count":8,"eval_count":2}'
    assert ollama_usage(body, b"", False) == Usage(
        prompt_tokens=8, completion_tokens=2, total_tokens=10
    )
