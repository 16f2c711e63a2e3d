"""Relaying OpenAI-format server-sent events without re-encoding them.

Upstream reads arrive cut anywhere; :class:`EventRelay` hands back only whole
events (a trailing partial event waits for its end, which is normally in the
same or the next read) and leaves their bytes untouched. Only events that carry
a usage object (``"usage":{``, the final event when ``include_usage`` is on)
are decoded, to read the token counts; when Gandalf itself asked the upstream
for usage, that usage-only event is dropped so the client sees exactly what
OpenAI would have sent it.
"""

from __future__ import annotations

import msgspec

from gandalf.domain import Usage

_DONE = b"data: [DONE]"
_DONE_EVENT = b"\ndata: [DONE]\n\n"


class _UsageEvent(msgspec.Struct):
    usage: Usage | None = None
    choices: list[msgspec.Raw] = []


_usage_event = msgspec.json.Decoder(_UsageEvent)


def _boundary(data: bytes) -> int:
    """Index just past the last complete event in ``data`` (0 if none)."""
    end = data.rfind(b"\n\n")
    end = end + 2 if end >= 0 else 0
    crlf = data.rfind(b"\r\n\r\n")
    if crlf >= 0 and crlf + 4 > end:
        end = crlf + 4
    return end


class EventRelay:
    """Frames one stream. ``feed`` returns the bytes to forward now (maybe empty)."""

    __slots__ = ("_carry", "done", "drop_usage", "events", "usage")

    def __init__(self, *, drop_usage: bool) -> None:
        self.drop_usage = drop_usage
        self.usage: Usage | None = None
        self.events = 0
        self.done = False
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        # Runs once per upstream read: written flat, C-level bytes methods only.
        if self._carry:
            chunk = self._carry + chunk
            self._carry = b""
        if not chunk.endswith(b"\n\n"):  # the read ended inside an event (or CRLF framing)
            end = _boundary(chunk)
            if end == 0:
                self._carry = chunk
                return b""
            if end < len(chunk):
                self._carry = chunk[end:]
                chunk = chunk[:end]
        self.events += chunk.count(b"\ndata:") + chunk.startswith(b"data:")
        # The usage object rides in the last event that carries one (the
        # usage-only event right before [DONE]): look from the end, where it is.
        mark = chunk.rfind(b'"usage":')
        if mark >= 0 and chunk[mark + 8 : mark + 10].lstrip()[:1] == b"{":
            chunk = self._take_usage(chunk, mark)
        if chunk.endswith(_DONE_EVENT) or (b"[DONE]" in chunk and _has_done(chunk)):
            self.done = True
        return chunk

    def finish(self) -> bytes:
        """Whatever is left when the upstream closes (an unterminated last event)."""
        rest, self._carry = self._carry, b""
        if rest:
            self.events += _count_events(rest)
            if _has_done(rest):
                self.done = True
        return rest

    def _take_usage(self, complete: bytes, mark: int) -> bytes:
        """Read the usage out of the event around ``mark``; drop that event when
        it is usage-only and Gandalf (not the client) asked for it."""
        # A block always ends with its framing's separator: no scan needed.
        sep = b"\r\n\r\n" if complete.endswith(b"\r\n\r\n") else b"\n\n"
        begin = complete.rfind(sep, 0, mark)
        begin = 0 if begin < 0 else begin + len(sep)
        end = complete.find(sep, mark)
        end = len(complete) if end < 0 else end + len(sep)
        payload = _data_of(complete[begin:end].rstrip())
        if payload is None:
            return complete
        try:
            parsed = _usage_event.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return complete
        if parsed.usage is None:
            return complete
        self.usage = parsed.usage
        if self.drop_usage and not parsed.choices:
            self.events -= 1
            return complete[:begin] + complete[end:]
        return complete


# Whole events only: JSON text cannot hold a raw newline, so "data:" right after a
# newline (or at the start of a block, which always starts an event) is framing,
# never a model quoting the SSE format in its output.
def _count_events(block: bytes) -> int:
    return block.count(b"\ndata:") + block.startswith(b"data:")


def _has_done(block: bytes) -> bool:
    return block.startswith(_DONE) or b"\n" + _DONE in block


def _data_of(event: bytes) -> bytes | None:
    """The data payload of one event (data lines joined), or None."""
    lines = [line for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[5:].lstrip(b" ") for line in lines)


class EventParser:
    """Splits an upstream event stream into ``(event, data)`` pairs, for adapters
    that translate events rather than relay them. Reads may cut anywhere; LF and
    CRLF framing both work; comments (``: ping``) and ``id:``/``retry:`` lines
    are skipped; several ``data:`` lines of one event are joined with newlines.
    An event without an ``event:`` line has the name ``b""``."""

    __slots__ = ("_carry",)

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        data = self._carry + chunk if self._carry else chunk
        end = _boundary(data)
        if end == 0:
            self._carry = data
            return []
        self._carry = data[end:]
        return _parse_events(data[:end])

    def finish(self) -> list[tuple[bytes, bytes]]:
        """The last event when the upstream closed without its blank line."""
        rest, self._carry = self._carry, b""
        return _parse_events(rest) if rest.strip() else []


def _parse_events(block: bytes) -> list[tuple[bytes, bytes]]:
    if b"\r" in block:
        block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    out: list[tuple[bytes, bytes]] = []
    for raw in block.split(b"\n\n"):
        if not raw:
            continue
        name = b""
        data: list[bytes] = []
        for line in raw.split(b"\n"):
            if line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value[:1] == b" " else value)
            elif line.startswith(b"event:"):
                name = line[6:].strip()
        if data:
            out.append((name, b"\n".join(data)))
    return out
