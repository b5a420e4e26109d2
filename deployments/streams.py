"""A relayed stream as the client gets it: OpenAI chunk events in an SSE response, whose end (read to
its last event, cut by the client, or dropped before its first byte) is recorded once."""

import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi.responses import StreamingResponse

from deployments.api import Chunks
from deployments.dispatch import Opened
from deployments.records import Outcome, Records
from models.engine import Completion, Delta
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
            scored = piece.logprobs  # the logprobs of the piece's tokens, when asked
            if piece.text:
                yield chunks.piece(piece.text, scored=scored, **extra)
                extra, scored = {}, None
            if piece.finish_reason is not None:  # with the logprobs of tokens that made no text (end of sequence)
                yield chunks.piece(None if chunks.chat else "", piece.finish_reason, scored=scored,
                                   switchyard=out.body())
                if include_usage:
                    yield chunks.usage(piece.prompt_tokens, piece.completion_tokens)
        yield Chunks.DONE
    finally:
        await pieces.aclose()
        records.ended(out)


def tool_call_stream(chunks: Chunks, calls: list[dict[str, Any]] | None, result: Completion, include_usage: bool,
                     out: Outcome) -> StreamingResponse:
    """A forced tool call, streamed once it is whole: the calls in one chunk, then the finishing chunk (an
    answer cut short without calls, ChatCompletionRequest.tool_calls, as its text). The router made it
    with a unary call, which it could retry elsewhere while nothing had been sent."""

    def events() -> Iterator[str]:
        yield chunks.piece("", role=True, switchyard=out.body())
        if calls:
            yield chunks.tool_calls(calls)
        else:
            yield chunks.piece(result.text, scored=result.logprobs)
        finish = "tool_calls" if calls and result.finish_reason == "stop" else result.finish_reason
        yield chunks.piece(None, finish, switchyard=out.body())
        if include_usage:
            yield chunks.usage(result.prompt_tokens, result.completion_tokens)
        yield Chunks.DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers=out.headers())
