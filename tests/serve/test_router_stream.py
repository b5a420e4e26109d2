"""The router's SSE stream ends (backend cancelled, audit line written) whether or not Starlette ever
started it: a client that leaves before the first byte goes out never runs `_sse`'s finally."""

import asyncio
import gc
import time

from deployments.router import _on_drop, _Outcome, _sse
from models.engine import Delta
from routing.policy import Decision


class Gen:
    """A backend's response generator: pieces, and whether it was cancelled."""

    def __init__(self, *pieces: Delta):
        self.pieces, self.cancelled = list(pieces), 0

    async def __anext__(self) -> Delta:
        if not self.pieces:
            raise StopAsyncIteration
        return self.pieces.pop(0)

    def cancel(self) -> None:
        self.cancelled += 1


def stream(gen: Gen, first: Delta) -> tuple:
    out = _Outcome(Decision("transformer", (), "text_generation", "default", "test", {}))
    ends = []

    def on_end(last):
        out.ended = True  # as Router._ended does
        ends.append(last)

    events = _sse(gen, first, False, "transformer", out, time.monotonic() + 10, False, on_end)
    _on_drop(events, gen, out, on_end)
    return events, ends


def test_a_stream_dropped_before_its_first_byte_cancels_the_backend_and_ends():
    gen = Gen(Delta(" world", "stop", 2, 2))
    events, ends = stream(gen, Delta("hello"))
    del events
    gc.collect()
    assert gen.cancelled == 1 and ends == [None]  # None: cut short


def test_a_stream_read_to_the_end_ends_once():
    gen = Gen(Delta(" world", "stop", 2, 2))
    events, ends = stream(gen, Delta("hello"))

    async def read():
        return [e async for e in events]

    chunks = asyncio.run(read())
    assert chunks[-1] == "data: [DONE]\n\n" and len(chunks) == 4
    del events
    gc.collect()
    assert len(ends) == 1 and ends[0].finish_reason == "stop" and gen.cancelled == 1
