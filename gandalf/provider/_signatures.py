"""Gemini's thought signatures, kept for the short tool call ids OpenAI clients get.

Gemini 3 wants each functionCall's ``thoughtSignature`` back on the next turn;
an OpenAI client echoes only a tool call's ``id`` (plus name and arguments),
and OpenAI and Azure refuse ids over 40 characters, which a signature (often
kilobytes) cannot fit in. So the id is short and the signature stays here,
keyed by it, in this worker's memory: bounded in entries and bytes, each entry
dropped ``ttl`` seconds after its last use (the oldest first when full).

With several workers or instances a signature is found only in the worker
that produced it (a client's next turn may land elsewhere); a miss is answered
with Gemini's documented placeholder :data:`SKIP_SIGNATURE`, which Gemini
accepts in place of a lost signature (the model loses that step's reasoning
context, the conversation goes on).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

# Gemini's documented placeholder for a function call whose signature is not
# available (ai.google.dev/gemini-api/docs/thought-signatures): validation skipped.
SKIP_SIGNATURE = "skip_thought_signature_validator"
# Ids whose Gemini id and signature are kept here: "call_" + "s" + 24 hex digits
# (30 characters). Plain minted ids are "call_" + hex digits, never an "s".
KEPT_PREFIX = "call_s"

DEFAULT_MAX_ENTRIES = 50_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_TTL = 24 * 3600.0


class Signatures:
    """Short tool call id -> (Gemini's own call id or None, thought signature)."""

    __slots__ = ("_bytes", "_clock", "_entries", "max_bytes", "max_entries", "ttl")

    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._clock = clock
        # id -> (expires at, gemini id, signature); oldest use first
        self._entries: OrderedDict[str, tuple[float, str | None, str]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def keep(self, gemini_id: str | None, signature: str) -> str:
        """A new short id for a call carrying ``signature``."""
        call_id = KEPT_PREFIX + secrets.token_hex(12)
        now = self._clock()
        self._entries[call_id] = (now + self.ttl, gemini_id, signature)
        self._bytes += _size(gemini_id, signature)
        self._evict(now)
        return call_id

    def find(self, call_id: str) -> tuple[str | None, str] | None:
        """``(gemini id, signature)`` kept for ``call_id`` (its life extended:
        every turn of a conversation sends the history again), or None."""
        entries = self._entries
        entry = entries.get(call_id)
        if entry is None:
            return None
        now = self._clock()
        if entry[0] <= now:
            self._drop(call_id)
            return None
        entries[call_id] = (now + self.ttl, entry[1], entry[2])
        entries.move_to_end(call_id)
        return entry[1], entry[2]

    def _evict(self, now: float) -> None:
        entries = self._entries
        while entries:
            oldest, (expires, _, _) = next(iter(entries.items()))
            if expires > now and len(entries) <= self.max_entries and self._bytes <= self.max_bytes:
                return
            self._drop(oldest)

    def _drop(self, call_id: str) -> None:
        _, gemini_id, signature = self._entries.pop(call_id)
        self._bytes -= _size(gemini_id, signature)


def _size(gemini_id: str | None, signature: str) -> int:
    return 64 + len(signature) + (len(gemini_id) if gemini_id else 0)
