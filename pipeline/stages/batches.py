"""Batches that do not wait to fill: what is queued now, taken at once.

Faust's ``Stream.take_events(max, within)`` yields when ``max`` messages are buffered or
``within`` seconds have passed. Under a steady load below capacity the buffer rarely fills, so
every batch of every stage waited the whole ``within`` before it was processed: latency added
per stage, and time the worker spent idle with work queued.

:func:`take_ready` yields as soon as the messages that arrived together have been taken: after
the first message it keeps taking while more keep coming (a pause of :data:`GAP` seconds ends
the batch), up to ``max`` messages or ``within`` seconds. While a batch is processed, new
messages wait in the stream's queue; the next batch takes all of them at once, so batches grow
with the backlog by themselves and shrink back when it is gone. Acknowledgements are as in
``take_events``: a batch's messages are acknowledged after the consumer of the batch returns
control, so offsets never pass what was processed; a consumer that removes messages from the
batch list it was given keeps them from being acknowledged.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import faust

GAP = 0.002  # seconds without a new message that end a batch


async def take_ready(stream: faust.StreamT, max_: int, within: float) -> AsyncIterator[list[Any]]:
    """Batches of at most ``max_`` events: the first waits for a message, then takes what keeps
    arriving until a :data:`GAP` without one, or ``within`` seconds after the first."""
    events: list[Any] = []
    added = asyncio.Event()
    buffer_full = asyncio.Event()
    buffer_consumed = asyncio.Event()
    buffer_consuming: asyncio.Future | None = None
    loop = asyncio.get_running_loop()
    self: Any = stream  # Faust's internals, used as take_events uses them
    stream_enable_acks: bool = self.enable_acks
    channel_it = self.channel.__aiter__()

    async def add_to_buffer(value: Any) -> Any:
        nonlocal buffer_consuming
        if buffer_consuming is not None:  # a batch is being processed: hold until it is done
            try:
                await buffer_consuming
            finally:
                buffer_consuming = None
        event = self.current_event
        if event is None:
            raise RuntimeError("take_ready found current_event None")
        events.append(event)
        added.set()
        if len(events) >= max_:
            buffer_full.set()
            buffer_consumed.clear()
            await self.wait(buffer_consumed)  # never more than max_ in one batch
        return value

    self.enable_acks = False  # acknowledged here, after the batch was processed
    self.add_processor(add_to_buffer)
    self._enable_passive(channel_it)
    try:
        while not self.should_stop:
            if not events:
                added.clear()
                await self.wait_for_stopped(added)
                continue
            deadline = loop.time() + within
            while not buffer_full.is_set() and loop.time() < deadline:
                added.clear()
                try:
                    await asyncio.wait_for(added.wait(), GAP)
                except TimeoutError:
                    break  # nothing more arrived: what was queued is taken
            buffer_consuming = loop.create_future()
            batch = list(events)
            try:
                yield batch
            finally:
                events.clear()
                for event in batch:
                    await self.ack(event)
                if not buffer_consuming.done():
                    buffer_consuming.set_result(None)
                buffer_full.clear()
                buffer_consumed.set()
    finally:
        self.enable_acks = stream_enable_acks
        self._processors.remove(add_to_buffer)
