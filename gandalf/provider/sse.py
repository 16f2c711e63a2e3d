"""Relaying OpenAI-format server-sent events without re-encoding them.

Upstream reads arrive cut anywhere; :class:`EventRelay` hands back only whole
events (a trailing partial event waits for its end, which is normally in the
same or the next read) and leaves their bytes untouched. Only events that carry
a usage object (``"usage":{``, the final event when ``include_usage`` is on)
are decoded, to read the token counts; when Gandalf itself asked the upstream
for usage, that usage-only event is dropped so the client sees exactly what
OpenAI would have sent it.

Bounds. A partial event under 16 KiB is prepended to the next read (cheap,
and the usual case); a longer one waits as a list of the reads that brought
it, joined once when its end arrives, each read scanned for a separator only
with the last three bytes before it: a long event costs linear time, not one
copy and one scan of everything so far per read. An event still unfinished past
``max_event`` bytes (default :data:`MAX_EVENT_BYTES`) raises UpstreamTooLarge
(502): a stream without event boundaries cannot hold the gateway's memory.
"""

from __future__ import annotations

import msgspec

from gandalf.domain import Usage
from gandalf.errors import UpstreamTooLarge
from gandalf.provider.usage import OpenAIUsage

MAX_EVENT_BYTES = 8 * 1024 * 1024
# A pending event this small is simply prepended to the next read and rescanned
# (the usual case: a read ended inside an event, the next one ends it); past
# this size it is kept as a list of reads and only the new reads are scanned.
_SMALL = 16384

_DONE = b"data: [DONE]"
_DONE_EVENT = b"\ndata: [DONE]\n\n"


class _UsageEvent(msgspec.Struct):
    usage: OpenAIUsage | None = None
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


class _Pending:
    """The bytes of the event in progress.

    Small (under ``_small`` bytes, the usual case: a read ended inside an
    event and the next read ends it): ``_carry`` holds them, prepended to the
    next read, which is scanned whole, as cheap as anything. Big: ``_pieces``
    holds the reads (none empty), ``_size`` their total, and ``_carry`` only
    their last three bytes, so that a read is scanned with just those (a
    separator may be cut by a read), never the pending bytes again.
    """

    __slots__ = ("_carry", "_max_event", "_pieces", "_size", "_small")

    def __init__(self, max_event: int) -> None:
        self._max_event = max_event
        self._small = min(_SMALL, max_event)
        self._carry = b""
        self._pieces: list[bytes] = []
        self._size = 0

    def _hold(self, piece: bytes) -> None:
        """Keep ``piece`` (no event end in it) while nothing else is pending."""
        if len(piece) < self._small:
            self._carry = piece
        else:
            self._pieces.append(piece)
            self._size = len(piece)
            self._carry = piece[-3:]
            if self._size > self._max_event:
                self._overflow()

    def _overflow(self) -> None:
        self._pieces.clear()
        self._size = 0
        self._carry = b""
        raise UpstreamTooLarge(
            f"The upstream sent an event of more than {self._max_event} bytes "
            "without ending it; the stream was cut."
        )

    def _complete(self, chunk: bytes) -> bytes:
        """With a big event pending: the complete events ``chunk`` finishes,
        joined with what was pending (b"" when it finishes none, then it is
        held too). Scans ``chunk`` and the 3 bytes before it only."""
        pieces = self._pieces
        cut = _boundary(chunk)
        if cut == 0:
            # A separator cut by the read starts in the pending bytes.
            tail = self._carry
            cut = _boundary(tail + chunk[:3]) - len(tail)
            if cut <= 0:
                if chunk:
                    pieces.append(chunk)
                    self._size += len(chunk)
                    self._carry = (tail + chunk[-3:])[-3:]
                    if self._size > self._max_event:
                        self._overflow()
                return b""
        pieces.append(chunk[:cut] if cut < len(chunk) else chunk)
        complete = b"".join(pieces)
        pieces.clear()
        self._size = 0
        self._carry = b""
        if cut < len(chunk):
            self._hold(chunk[cut:])
        return complete

    def _rest(self) -> bytes:
        """What is pending, now no longer."""
        pieces = self._pieces
        rest = b"".join(pieces) if pieces else self._carry
        pieces.clear()
        self._size = 0
        self._carry = b""
        return rest


class EventRelay(_Pending):
    """Frames one stream. ``feed`` returns the bytes to forward now (maybe empty)."""

    __slots__ = ("_counted", "_last", "done", "drop_usage", "usage")

    def __init__(self, *, drop_usage: bool, max_event: int = MAX_EVENT_BYTES) -> None:
        super().__init__(max_event)
        self.drop_usage = drop_usage
        self.usage: Usage | None = None
        self.done = False
        # The data events forwarded: ``_counted`` plus those of ``_last``, the
        # last block forwarded, counted only when a later one comes or someone
        # asks. The count matters only for a stream cut short before its usage
        # event, and a stream that arrives in one read (most short answers)
        # never pays for scanning it (a bytes.count of the whole answer: ~12k
        # instructions for a 20-chunk stream).
        self._counted = 0
        self._last = b""

    @property
    def events(self) -> int:
        """The data events forwarded so far (a dropped usage-only event not included)."""
        last = self._last
        return self._counted + (_count_events(last) if last else 0)

    def feed(self, chunk: bytes) -> bytes:
        """The complete events ``chunk`` ends (maybe b""). UpstreamTooLarge
        when an event grows past ``max_event`` without ending."""
        # Runs once per upstream read: written flat, C-level bytes methods only.
        carry = self._carry
        if carry:
            if self._pieces:
                chunk = self._complete(chunk)
                if not chunk:
                    return b""
            else:
                chunk = carry + chunk
                self._carry = b""
        if not chunk.endswith(b"\n\n"):  # the read ended inside an event (or CRLF framing)
            end = _boundary(chunk)  # nothing is pending now
            if end == 0:
                if len(chunk) < self._small:
                    self._carry = chunk
                else:
                    self._hold(chunk)
                return b""
            if end < len(chunk):
                rest = chunk[end:]
                if len(rest) < self._small:
                    self._carry = rest
                else:
                    self._hold(rest)
                chunk = chunk[:end]
        # The usage object rides in the last event that carries one (the
        # usage-only event right before [DONE]): look from the end, where it is.
        mark = chunk.rfind(b'"usage":')
        if mark >= 0 and chunk[mark + 8 : mark + 10].lstrip()[:1] == b"{":
            chunk = self._take_usage(chunk, mark)
        if chunk.endswith(_DONE_EVENT) or (b"[DONE]" in chunk and _has_done(chunk)):
            self.done = True
        last = self._last
        if last:
            self._counted += last.count(b"\ndata:") + last.startswith(b"data:")
        self._last = chunk
        return chunk

    def finish(self) -> bytes:
        """Whatever is left when the upstream closes (an unterminated last event)."""
        rest = self._rest()
        if rest:
            self._counted += _count_events(rest)
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
        event = complete[begin:end]
        if (
            sep == b"\n\n"
            and event.startswith(b"data:")
            and event.find(b"\n") == len(event) - 2
            and b"\r" not in event
        ):
            # One data line (the usual shape): its payload, with the optional
            # space and the separator around it, which the JSON decoder skips.
            payload: bytes | None = event[5:]
        else:
            payload = _data_of(event.rstrip())
        if payload is None:
            return complete
        try:
            parsed = _usage_event.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return complete
        if parsed.usage is None:
            return complete
        self.usage = parsed.usage.domain()
        if self.drop_usage and not parsed.choices:
            # Not forwarded: not counted (the count is taken of what is forwarded).
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


class EventParser(_Pending):
    """Splits an upstream event stream into ``(event, data)`` pairs, for adapters
    that translate events rather than relay them. Reads may cut anywhere; LF and
    CRLF framing both work; comments (``: ping``) and ``id:``/``retry:`` lines
    are skipped; several ``data:`` lines of one event are joined with newlines.
    An event without an ``event:`` line has the name ``b""``. An event longer
    than ``max_event`` bytes raises UpstreamTooLarge."""

    __slots__ = ()

    def __init__(self, max_event: int = MAX_EVENT_BYTES) -> None:
        super().__init__(max_event)

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        carry = self._carry
        if carry:
            if self._pieces:
                data = self._complete(chunk)
                return _parse_events(data) if data else []
            chunk = carry + chunk
            self._carry = b""
        end = _boundary(chunk)
        if end == 0:
            if len(chunk) < self._small:
                self._carry = chunk
            else:
                self._hold(chunk)
            return []
        if end < len(chunk):
            rest = chunk[end:]
            if len(rest) < self._small:
                self._carry = rest
            else:
                self._hold(rest)
            return _parse_events(chunk[:end])
        return _parse_events(chunk)

    def finish(self) -> list[tuple[bytes, bytes]]:
        """The last event when the upstream closed without its blank line."""
        rest = self._rest()
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
