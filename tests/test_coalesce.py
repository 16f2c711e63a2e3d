"""The coalescer: one call per key in flight, made by its leader, shared with followers."""

from __future__ import annotations

import asyncio

import pytest

from gandalf.app.coalesce import Coalescer, is_deterministic


class Call:
    """A call that waits for its gate and counts its starts."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.starts = 0
        self.cancelled = False
        self.fail: Exception | None = None

    async def __call__(self) -> str:
        self.starts += 1
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.fail is not None:
            raise self.fail
        return f"answer {self.starts}"


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_identical_concurrent_calls_share_one() -> None:
    async def scenario() -> None:
        coalescer: Coalescer[str] = Coalescer()
        call = Call()
        waiters = [asyncio.create_task(coalescer.join("k", call)) for _ in range(10)]
        await settle()
        assert call.starts == 1 and len(coalescer) == 1
        call.gate.set()
        results = await asyncio.gather(*waiters)
        assert [r[0] for r in results] == ["answer 1"] * 10
        assert [r[1] for r in results] == [True] + [False] * 9  # the first one led
        assert len(coalescer) == 0 and coalescer.started == 1
        # Over: the next identical call starts a new one (no caching).
        assert await coalescer.join("k", call) == ("answer 2", True)

    asyncio.run(scenario())


def test_different_keys_do_not_share() -> None:
    async def scenario() -> None:
        coalescer: Coalescer[str] = Coalescer()
        call = Call()
        call.gate.set()
        results = await asyncio.gather(coalescer.join("a", call), coalescer.join("b", call))
        assert call.starts == 2 and all(leader for _, leader in results)

    asyncio.run(scenario())


def test_a_follower_that_leaves_does_not_disturb_the_call() -> None:
    async def scenario() -> None:
        coalescer: Coalescer[str] = Coalescer()
        call = Call()
        leader = asyncio.create_task(coalescer.join("k", call))
        quitter = asyncio.create_task(coalescer.join("k", call))
        stayer = asyncio.create_task(coalescer.join("k", call))
        await settle()
        quitter.cancel()
        await settle()
        assert quitter.cancelled() and not call.cancelled
        call.gate.set()
        assert await leader == ("answer 1", True)
        assert await stayer == ("answer 1", False)
        assert call.starts == 1

    asyncio.run(scenario())


def test_when_the_leader_leaves_a_follower_leads_a_new_call_for_the_others() -> None:
    async def scenario() -> None:
        coalescer: Coalescer[str] = Coalescer()
        call = Call()
        leader = asyncio.create_task(coalescer.join("k", call))
        followers = [asyncio.create_task(coalescer.join("k", call)) for _ in range(3)]
        await settle()
        leader.cancel()  # its client left: the call was its own and goes with it
        await settle()
        assert leader.cancelled() and call.cancelled
        assert call.starts == 2 and len(coalescer) == 1  # one follower took over
        call.gate.set()
        results = await asyncio.gather(*followers)
        assert [r[0] for r in results] == ["answer 2"] * 3
        assert sorted(r[1] for r in results) == [False, False, True]

    asyncio.run(scenario())


def test_when_every_waiter_left_the_call_is_cancelled_and_forgotten() -> None:
    async def scenario() -> None:
        coalescer: Coalescer[str] = Coalescer()
        call = Call()
        waiters = [asyncio.create_task(coalescer.join("k", call)) for _ in range(3)]
        await settle()
        for waiter in waiters:
            waiter.cancel()
        await settle()
        assert call.cancelled and len(coalescer) == 0
        call.gate.set()
        assert await coalescer.join("k", call) == ("answer 2", True)

    asyncio.run(scenario())


def test_the_calls_error_reaches_every_waiter() -> None:
    async def scenario() -> None:
        coalescer: Coalescer[str] = Coalescer()
        call = Call()
        call.fail = RuntimeError("upstream broke")
        waiters = [asyncio.create_task(coalescer.join("k", call)) for _ in range(4)]
        await settle()
        call.gate.set()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        assert len(coalescer) == 0

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("body", "deterministic"),
    [
        (b'{"model":"m","messages":[],"temperature":0}', True),
        (b'{"model":"m","messages":[],"temperature":0.0,"n":1}', True),
        (b'{"model":"m","messages":[],"seed":42}', True),
        (b'{"model":"m","messages":[],"seed":42,"temperature":1.2}', True),
        (b'{"model":"m","messages":[]}', False),  # temperature defaults to 1
        (b'{"model":"m","messages":[],"temperature":0.2}', False),
        (b'{"model":"m","messages":[],"temperature":0,"n":2}', False),
        (b'{"model":"m","messages":[],"temperature":"0"}', False),  # not a number
        (b"not json", False),
    ],
)
def test_is_deterministic(body: bytes, deterministic: bool) -> None:
    assert is_deterministic(body) is deterministic
