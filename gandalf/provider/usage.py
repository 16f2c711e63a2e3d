"""Each upstream format's token counts, as the domain :class:`Usage` counts them.

The one place per wire format where its counts become OpenAI's terms
(``prompt_tokens`` including cached and cache-write tokens, ``completion_tokens``
including reasoning tokens) plus the detail counts pricing charges at their
own rates. The translating adapters (anthropic, gemini, openai) and the
native passthrough (native.py) both call these, so a translated and a relayed
answer of the same upstream are accounted alike.
"""

from __future__ import annotations

import msgspec

from gandalf.domain import Usage


def usage_from_openai(
    prompt: int, completion: int, *, cached: int = 0, reasoning: int = 0, total: int | None = None
) -> Usage:
    """OpenAI's (and Azure's, and OpenAI-compatible servers') ``usage``:
    ``prompt_tokens_details.cached_tokens`` and
    ``completion_tokens_details.reasoning_tokens`` are already inside the two
    counts. ``total`` as reported when given, else their sum."""
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion if total is None else total,
        cached_prompt_tokens=cached,
        reasoning_tokens=reasoning,
    )


def usage_from_anthropic(
    input_tokens: int, output_tokens: int, cache_read: int, cache_write: int
) -> Usage:
    """Anthropic's ``usage``: ``input_tokens`` excludes the cache reads
    (``cache_read_input_tokens``) and writes (``cache_creation_input_tokens``),
    which OpenAI's ``prompt_tokens`` includes. Thinking tokens are inside
    ``output_tokens`` and not reported apart (reasoning stays 0)."""
    prompt = input_tokens + cache_read + cache_write
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=output_tokens,
        total_tokens=prompt + output_tokens,
        cached_prompt_tokens=cache_read,
        cache_write_tokens=cache_write,
    )


def usage_from_gemini(prompt: int, candidates: int, thoughts: int, cached: int) -> Usage:
    """Gemini's ``usageMetadata``: ``promptTokenCount`` includes
    ``cachedContentTokenCount``; ``candidatesTokenCount`` excludes
    ``thoughtsTokenCount``, which OpenAI's ``completion_tokens`` includes."""
    completion = candidates + thoughts
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cached_prompt_tokens=cached,
        reasoning_tokens=thoughts,
    )


def usage_from_ollama(prompt_eval: int, eval_count: int) -> Usage:
    """Ollama's native ``prompt_eval_count``/``eval_count``: no detail counts."""
    return Usage(
        prompt_tokens=prompt_eval,
        completion_tokens=eval_count,
        total_tokens=prompt_eval + eval_count,
    )


# --------------------------------------------------------------------------- OpenAI's usage object


class _PromptDetails(msgspec.Struct, gc=False):
    cached_tokens: int | None = None  # null from some OpenAI-compatible servers


class _CompletionDetails(msgspec.Struct, gc=False):
    reasoning_tokens: int | None = None


class OpenAIUsage(msgspec.Struct, gc=False):
    """OpenAI's ``usage`` object as it arrives (details may be absent or null)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None

    def domain(self) -> Usage:
        """:func:`usage_from_openai` written out (every answer's usage: a
        keyword call fewer per request)."""
        prompt = self.prompt_tokens_details
        completion = self.completion_tokens_details
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.total_tokens,
            cached_prompt_tokens=(prompt.cached_tokens or 0) if prompt is not None else 0,
            reasoning_tokens=(completion.reasoning_tokens or 0) if completion is not None else 0,
        )
