"""SSE framing holds a bounded, linearly-built pending event.

An upstream that never ends its event (no blank line) used to be re-copied
and re-scanned on every read (quadratic: 64 MB cost ~9 s of CPU) and held
without limit. Now the pending event is kept as pieces, joined once when
it completes, and capped (``max_event``): past the cap, UpstreamTooLarge.
"""

from __future__ import annotations

import random

import pytest

from gandalf.errors import UpstreamTooLarge
from gandalf.provider.sse import MAX_EVENT_BYTES, EventParser, EventRelay

PIECE = b"x" * 4096


@pytest.mark.parametrize("kind", ["relay", "parser"])
def test_an_event_without_an_end_is_cut_at_the_cap(kind: str) -> None:
    cap = 1 << 20
    framer = EventRelay(drop_usage=False, max_event=cap) if kind == "relay" else None
    parser = EventParser(max_event=cap)
    feed = framer.feed if framer is not None else parser.feed
    fed = 0
    with pytest.raises(UpstreamTooLarge) as caught:
        feed(b"data: ")
        for _ in range(4096):  # 16 MiB offered; the cap stops it at 1 MiB
            feed(PIECE)
            fed += len(PIECE)
    assert cap - len(PIECE) <= fed <= cap
    assert caught.value.status == 502
    assert f"{cap} bytes" in caught.value.message


def test_the_default_cap_is_a_few_mebibytes() -> None:
    assert 1 << 20 <= MAX_EVENT_BYTES <= 8 << 20
    parser = EventParser()
    with pytest.raises(UpstreamTooLarge):
        for _ in range(MAX_EVENT_BYTES // len(PIECE) + 2):
            parser.feed(PIECE)


def test_a_large_event_under_the_cap_arrives_whole_from_many_reads() -> None:
    payload = b"y" * (3 << 20)
    stream = b"event: big\ndata: " + payload + b"\r\n\r\ndata: after\n\n"
    parser = EventParser(max_event=4 << 20)
    relay = EventRelay(drop_usage=False, max_event=4 << 20)
    rng = random.Random(5)
    events: list[tuple[bytes, bytes]] = []
    relayed: list[bytes] = []
    at = 0
    while at < len(stream):
        step = rng.randint(1, 70_000)
        events += parser.feed(stream[at : at + step])
        relayed.append(relay.feed(stream[at : at + step]))
        at += step
    events += parser.finish()
    relayed.append(relay.finish())
    assert events == [(b"big", payload), (b"", b"after")]
    assert b"".join(relayed) == stream
    assert relay.events == 2


@pytest.mark.parametrize("size", [10_000, 40_000])  # pending kept whole / as a list of reads
@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_a_boundary_split_across_tiny_reads_is_found(newline: bytes, size: int) -> None:
    """The separator arrives one byte per read, after a long pending event."""
    event = b"data: " + b"z" * size + newline
    parser = EventParser()
    relay = EventRelay(drop_usage=False)
    out: list[tuple[bytes, bytes]] = []
    sent: list[bytes] = []
    for piece in (event[:5000], event[5000:], *(newline[i : i + 1] for i in range(len(newline)))):
        out += parser.feed(piece)
        sent.append(relay.feed(piece))
    assert out == [(b"", b"z" * size)]
    assert b"".join(sent) == event + newline
