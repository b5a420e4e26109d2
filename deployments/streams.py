"""A relayed stream as the client gets it: OpenAI chunk events in an SSE response, whose end (read to
its last event, cut by the client, or dropped before its first byte) is recorded once."""

import weakref
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from deployments.api import Chunks
from deployments.dispatch import Opened
from deployments.records import Outcome, Records
from models.engine import Delta
from routing.outcome import Verdict


def sse_response(records: Records, out: Outcome, pieces: AsyncIterator[Delta | Verdict], opened: Opened,
                 chunks: Chunks, include_usage: bool) -> StreamingResponse:
    events = _events(records, out, pieces, chunks, include_usage)
    weakref.finalize(events, _dropped, records, out, opened)
    return StreamingResponse(events, media_type="text/event-stream", headers=out.headers())


def _dropped(records: Records, out: Outcome, opened: Opened) -> None:
    """Starlette dropped the events without starting them (the client left before the first byte went
    out), so `_events`' finally never ran: the backend's generation is cancelled and the stream ended."""
    if not out.ended:
        opened.gen.cancel()
        records.ended(out)


async def _events(records: Records, out: Outcome, pieces: AsyncIterator[Delta | Verdict], chunks: Chunks,
                  include_usage: bool) -> AsyncIterator[str]:
    """OpenAI chunk events, ending with `data: [DONE]`: the routing summary on the first chunk and on
    the finishing one (with any migration). Starlette cancels it when the client goes away, which
    cancels the backend's generation."""
    extra: dict[str, Any] = {"switchyard": out.body()}
    try:
        if chunks.chat:
            yield chunks.piece("", role=True, **extra)
            extra = {}
        async for piece in pieces:
            if isinstance(piece, Verdict):
                yield chunks.error(piece.message, piece.type)
                break
            if piece.text:
                yield chunks.piece(piece.text, **extra)
                extra = {}
            if piece.finish_reason is not None:
                yield chunks.piece(None if chunks.chat else "", piece.finish_reason, switchyard=out.body())
                if include_usage:
                    yield chunks.usage(piece.prompt_tokens, piece.completion_tokens)
        yield Chunks.DONE
    finally:
        await pieces.aclose()
        records.ended(out)
