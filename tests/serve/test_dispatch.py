"""deployments/dispatch.py with scripted backends: a stream that breaks after its first byte goes on
on the same backend, then the next, with the text and token ids already sent and the rest of
max_tokens; the client's pieces add up to one answer. (tests/chaos kills real replicas.)"""

import asyncio
import time

import pytest
from ray.exceptions import RayActorError

from deployments.config import RouterConfig
from deployments.dispatch import Call, Dispatcher
from deployments.http import ApiError
from deployments.protocol import Failure
from deployments.records import Outcome
from deployments.replicas import ReplicaWatch
from models.engine import Completion, Delta, GenerationRequest
from routing.breaker import CircuitBreaker
from routing.outcome import Kind, Verdict
from routing.policy import BackendState, Decision

TOKENS = [f" w{i}" for i in range(10)]  # token i is the text " wi"


class Gen:
    """A backend's response generator that sends `pieces`, then raises `then` (None: ends)."""

    def __init__(self, pieces: list, then: BaseException | None = None, hang: bool = False):
        self.pieces, self.then, self.hang, self.cancelled = list(pieces), then, hang, False

    async def __anext__(self):
        if self.pieces:
            return self.pieces.pop(0)
        if self.hang:
            await asyncio.Event().wait()
        raise self.then or StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class Backend:
    """A handle whose stream calls answer from a script: one function of the request per call."""

    def __init__(self, *script):
        self.script, self.requests = list(script), []

    def options(self, **_):
        return self

    @property
    def stream(self):
        return self

    def remote(self, request: GenerationRequest) -> Gen:
        self.requests.append(request)
        return self.script.pop(0)(request)


def pieces(first: int, last: int, tokenizer: str = "tok-t", finish: bool = True) -> list[Delta]:
    """Token i as one piece each, the last finishing (this backend's own counts)."""
    out = [Delta(TOKENS[i], prompt_tokens=5, token_ids=[i], tokenizer=tokenizer) for i in range(first, last)]
    if finish:
        out[-1].finish_reason, out[-1].completion_tokens = "length", last - first
    return out


def dispatcher(**backends: Backend) -> Dispatcher:
    cfg = RouterConfig(stream_stall_s=0.2)
    watch = ReplicaWatch(backends, fetch=dict)  # never read: every backend taken as running
    return Dispatcher(cfg, backends, watch, {n: CircuitBreaker(3, 10) for n in backends},
                      {n: BackendState() for n in backends})


async def run(d: Dispatcher, max_tokens: int = 10, deadline_s: float = 30) -> tuple[Outcome, list]:
    out = Outcome(deadline=time.monotonic() + deadline_s)
    out.decision = Decision("t", ("m",), "text_generation", "default", "test", {})
    request = GenerationRequest("r", prompt="p", max_tokens=max_tokens, temperature=0.0)
    opened = await d.open(out, request)
    return out, [p async for p in d.relay(out, request, opened)]


def test_a_stream_that_breaks_continues_on_the_same_backend_with_its_tokens():
    broken = Gen(pieces(0, 4, finish=False), then=RayActorError())  # the replica died
    t = Backend(lambda r: broken, lambda r: Gen(pieces(4, 10)))
    out, got = asyncio.run(run(dispatcher(t=t, m=Backend())))
    assert "".join(p.text for p in got) == "".join(TOKENS)
    assert (got[-1].finish_reason, got[-1].prompt_tokens, got[-1].completion_tokens) == ("length", 5, 10)
    again = t.requests[1]
    assert again.continuation.text == "".join(TOKENS[:4]) and again.continuation.token_ids == [0, 1, 2, 3]
    assert again.continuation.tokenizer == "tok-t" and again.max_tokens == 6 and again.prompt == "p"
    (moved,) = out.attempts
    assert (moved.kind, moved.cause, moved.tokens, moved.to) == (Kind.migrated, Kind.replica_died, 4, "t")
    assert broken.cancelled and out.usage == (5, 10) and out.served_by == "t"


def test_a_backend_that_refuses_the_continuation_is_skipped_for_the_next():
    t = Backend(lambda r: Gen(pieces(0, 3, finish=False), then=StopAsyncIteration()),  # ended without finishing
                lambda r: Gen([Failure("unsupported", "cannot continue mid-word")]))
    m = Backend(lambda r: Gen(pieces(3, 10, tokenizer="tok-m")))
    out, got = asyncio.run(run(dispatcher(t=t, m=m)))
    assert "".join(p.text for p in got) == "".join(TOKENS) and got[-1].completion_tokens == 10
    assert [a.kind for a in out.attempts] == [Kind.migrated, Kind.unsupported]
    assert out.attempts[0].to == "m" and m.requests[0].continuation.tokenizer == "tok-t"
    assert out.served_by == "m"


def test_a_stalled_stream_moves_on():
    stalled = Gen(pieces(0, 2, finish=False), hang=True)
    t = Backend(lambda r: stalled, lambda r: Gen(pieces(2, 10)))
    out, got = asyncio.run(run(dispatcher(t=t, m=Backend())))
    assert "".join(p.text for p in got) == "".join(TOKENS) and stalled.cancelled
    moved = out.attempts[0]
    assert (moved.cause, moved.tokens, moved.to) == (Kind.stalled, 2, "t")


def test_no_candidate_left_ends_the_stream_with_an_error_event():
    t = Backend(lambda r: Gen([*pieces(0, 4, finish=False), Failure("internal", "engine failed")]),
                lambda r: Gen([Failure("internal", "still broken")]))
    m = Backend(lambda r: Gen([Failure("unsupported", "no")]))
    out, got = asyncio.run(run(dispatcher(t=t, m=m)))
    assert isinstance(got[-1], Verdict) and got[-1].status == 503
    assert "after 4 tokens" in out.error and out.usage is None
    assert [a.kind for a in out.attempts] == [Kind.migrated, Kind.failed, Kind.unsupported]


def test_a_break_after_the_last_token_only_finishes():
    t = Backend(lambda r: Gen([*pieces(0, 4, finish=False), Failure("internal", "engine failed")]))
    out, got = asyncio.run(run(dispatcher(t=t, m=Backend()), max_tokens=4))
    assert got[-1].finish_reason == "length" and got[-1].completion_tokens == 4 and len(t.requests) == 1


class Reply:
    """A unary response: its result or the exception it raises."""

    def __init__(self, value):
        self.value, self.cancelled = value, False

    def __await__(self):
        yield from asyncio.sleep(0).__await__()
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value

    def cancel(self) -> None:
        self.cancelled = True


class Unary(Backend):
    @property
    def generate(self):
        return self


def test_a_unary_call_whose_replica_died_goes_again_to_the_same_backend():
    answer = Completion("ok", 5, 2, "length")
    t = Unary(lambda r: Reply(RayActorError()), lambda r: Reply(answer))
    d = dispatcher(t=t, m=Unary())
    out = Outcome(deadline=time.monotonic() + 30)
    out.decision = Decision("t", ("m",), "text_generation", "default", "test", {})
    assert asyncio.run(d.call(out, Call("generate", GenerationRequest("r", prompt="p")))) is answer
    assert [a.kind for a in out.attempts] == [Kind.replica_died] and out.served_by == "t"
    assert d.breakers["t"].failures == 0  # a replica died, the backend lives: no mark against its circuit


def test_every_candidate_failing_is_a_503_with_the_attempts():
    t = Unary(lambda r: Reply(Failure("internal", "boom")))
    m = Unary(lambda r: Reply(Failure("unsupported", "no")))
    d = dispatcher(t=t, m=m)
    out = Outcome(deadline=time.monotonic() + 30)
    out.decision = Decision("t", ("m",), "text_generation", "default", "test", {})
    with pytest.raises(ApiError) as err:
        asyncio.run(d.call(out, Call("generate", GenerationRequest("r", prompt="p"))))
    assert (err.value.status, err.value.headers) == (503, {"Retry-After": "1"})
    assert [a.kind for a in out.attempts] == [Kind.failed, Kind.unsupported] and d.breakers["t"].failures == 1
