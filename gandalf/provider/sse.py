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
_USAGE_MARKS = (b'"usage":{', b'"usage": {')


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
        data = self._carry + chunk if self._carry else chunk
        end = _boundary(data)
        if end == 0:
            self._carry = data
            return b""
        if end == len(data):
            self._carry = b""
            complete = data
        else:
            self._carry = data[end:]
            complete = data[:end]
        self.events += _count_events(complete)
        if _USAGE_MARKS[0] in complete or _USAGE_MARKS[1] in complete:
            complete = self._take_usage(complete)
        if not self.done and _has_done(complete):
            self.done = True
        return complete

    def finish(self) -> bytes:
        """Whatever is left when the upstream closes (an unterminated last event)."""
        rest, self._carry = self._carry, b""
        if rest:
            self.events += _count_events(rest)
            if _has_done(rest):
                self.done = True
        return rest

    def _take_usage(self, complete: bytes) -> bytes:
        sep = b"\r\n\r\n" if b"\r\n\r\n" in complete else b"\n\n"
        kept: list[bytes] = []
        for event in complete.split(sep):
            if not event:
                continue
            if _USAGE_MARKS[0] in event or _USAGE_MARKS[1] in event:
                payload = _data_of(event)
                if payload is not None:
                    try:
                        parsed = _usage_event.decode(payload)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        parsed = None
                    if parsed is not None and parsed.usage is not None:
                        self.usage = parsed.usage
                        if self.drop_usage and not parsed.choices:
                            self.events -= 1
                            continue
            kept.append(event)
        return b"".join(event + sep for event in kept)


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
