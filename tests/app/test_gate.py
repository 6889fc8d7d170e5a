"""The generation gate on its own: admission is awaited, so a queued request never blocks the loop."""

import asyncio

import pytest

from app.gate import Busy, GenerationGate


def test_queued_requests_wait_without_blocking_the_loop_and_run_in_turn() -> None:
    async def scenario():
        gate = GenerationGate(concurrent=1, queue=2)
        order, ticks = [], 0

        async def request(name: str) -> None:
            async with gate.slot(wait_s=5):
                order.append(name)
                await asyncio.sleep(0.1)  # the work (in the service: a worker thread)

        async def ticker() -> None:  # the loop keeps turning while requests wait
            nonlocal ticks
            while len(order) < 3:
                ticks += 1
                await asyncio.sleep(0.01)

        await asyncio.gather(request("a"), request("b"), request("c"), ticker())
        return order, ticks, gate

    order, ticks, gate = asyncio.run(scenario())
    assert order == ["a", "b", "c"] and ticks > 10
    assert gate.admitted == 0 and gate.running == 0 and gate.rejected == 0


def test_a_full_queue_rejects_at_once_and_a_long_wait_times_out() -> None:
    async def scenario():
        gate = GenerationGate(concurrent=1, queue=1)
        holding = asyncio.Event()

        async def hold() -> None:
            async with gate.slot(wait_s=5):
                holding.set()
                await asyncio.sleep(0.5)

        holder = asyncio.create_task(hold())
        await holding.wait()
        waiter = asyncio.create_task(gate.slot(wait_s=0.1).__aenter__())
        await asyncio.sleep(0)
        with pytest.raises(Busy, match="queue places are taken") as full:
            async with gate.slot(wait_s=5):
                pass
        with pytest.raises(Busy, match="within 0.1 s") as late:
            await waiter
        assert (full.value.reason, late.value.reason) == ("queue_full", "wait_timeout")  # the metrics' label
        await holder
        return gate

    gate = asyncio.run(scenario())
    assert gate.rejected == 2 and gate.admitted == 0
