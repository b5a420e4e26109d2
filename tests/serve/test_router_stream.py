"""The router's SSE stream ends (backend cancelled, audit line written) whether or not Starlette ever
started it: a client that leaves before the first byte goes out never runs `_events`' finally."""

import asyncio
import gc
import weakref

from deployments.api import Chunks
from deployments.config import RouterConfig
from deployments.dispatch import Opened
from deployments.records import Outcome, Records
from deployments.streams import _dropped, _events
from models.engine import Delta
from routing.access import ANONYMOUS
from routing.policy import Decision


class Gen:
    """A backend's response generator: pieces, and whether it was cancelled."""

    def __init__(self, *pieces: Delta):
        self.pieces, self.cancelled = list(pieces), 0

    def cancel(self) -> None:
        self.cancelled += 1


async def relay(gen: Gen, first: Delta, out: Outcome):  # as Dispatcher.relay: usage set, generation cancelled
    try:
        for piece in (first, *gen.pieces):
            if piece.finish_reason is not None:
                out.usage = (piece.prompt_tokens, piece.completion_tokens)
            yield piece
    finally:
        gen.cancel()


def stream(gen: Gen, first: Delta) -> tuple:
    records = Records(RouterConfig())
    with records.request("completions", "req-1", ANONYMOUS) as out:
        out.decision = Decision("transformer", (), "text_generation", "default", "test", {})
        out.streaming = True
    events = _events(records, out, relay(gen, first, out), Chunks(False, "transformer"), False)
    weakref.finalize(events, _dropped, records, out, Opened("transformer", gen, first))
    return events, out


def test_a_stream_dropped_before_its_first_byte_cancels_the_backend_and_ends():
    gen = Gen(Delta(" world", "stop", 2, 2))
    events, out = stream(gen, Delta("hello"))
    del events
    gc.collect()
    assert gen.cancelled == 1 and out.ended and out.logged["error"] == "stream cut short"


def test_a_stream_read_to_the_end_ends_once():
    gen = Gen(Delta(" world", "stop", 2, 2))
    events, out = stream(gen, Delta("hello"))

    async def read():
        return [e async for e in events]

    chunks = asyncio.run(read())
    assert chunks[-1] == Chunks.DONE and len(chunks) == 4
    del events
    gc.collect()
    assert out.ended and out.logged["error"] is None and gen.cancelled == 1
