"""The one candidate loop: calls a decision's candidates in order until one answers, for unary calls,
stream openings and stream continuations alike (STYLE 18).

Each backend a request leaves is an Attempt with a Kind (routing/outcome.py); what the client is told
when none answers comes from outcome.exhausted. A stream that fails after its first byte (the replica
dies, its node goes, the engine fails, or it sends nothing for router.stream_stall_s) continues on the
next candidate, the same backend first: the request goes again with the text already sent as the
answer's start (models.engine.Continuation, with its token ids for an engine with the same tokenizer),
and max_tokens less the tokens already spent. The client sees one stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, RequestCancelledError
from ray.serve.handle import DeploymentHandle

from deployments.api import new_id
from deployments.config import RouterConfig
from deployments.http import ApiError
from deployments.protocol import Failure
from deployments.records import Outcome
from deployments.replicas import BackendLost, ReplicaWatch, until_lost
from models.engine import Continuation, Delta, GenerationRequest
from routing import outcome
from routing.breaker import CircuitBreaker
from routing.outcome import FAULTS, Kind, Verdict
from routing.policy import BackendState, Decision

logger = logging.getLogger(__name__)


@dataclass
class Call:
    """What a request sends each candidate: `method(arg)` on the backend's handle."""

    method: str  # "generate", "stream", "refine", "classify"
    arg: Any

    def to(self, name: str, decision: Decision) -> tuple[str, Any]:
        """The method and argument backend `name` gets; a degraded fallback gets the prompt cut to fit."""
        if name in decision.degraded and isinstance(self.arg, GenerationRequest):
            return self.method, replace(self.arg, truncate=True)
        return self.method, self.arg

    def accept(self, name: str, decision: Decision, result: Any) -> tuple[Any, str | None]:
        """(the result as the endpoint returns it, why it is not kept or None)."""
        return result, None


@dataclass
class Opened:
    """A stream that has sent its first piece."""

    backend: str
    gen: Any  # the handle's response generator
    first: Delta


@dataclass
class _Progress:
    """What a stream has delivered so far, across the backends it ran on."""

    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # every token of `text`, while one tokenizer made them all
    tokenizer: str | None = None  # its fingerprint (models.engine.tokenizer_fingerprint)
    mixed: bool = False  # backends with different tokenizers made the text: continue from text alone
    before: int = 0  # completion tokens spent by the backends it left
    now: int = 0  # completion tokens of the backend streaming now
    prompt_tokens: int | None = None  # the first backend's count

    def add(self, piece: Delta) -> None:
        if self.prompt_tokens is None:
            self.prompt_tokens, self.tokenizer = piece.prompt_tokens, piece.tokenizer
        self.mixed = self.mixed or piece.tokenizer != self.tokenizer
        self.text.append(piece.text)
        self.ids.extend(piece.token_ids)
        self.now += len(piece.token_ids)

    def moved(self) -> int:
        """The tokens spent when the stream leaves a backend."""
        self.before, self.now = self.before + self.now, 0
        return self.before

    def continuation(self) -> Continuation:
        if self.mixed or self.tokenizer is None:
            return Continuation("".join(self.text), [], None)
        return Continuation("".join(self.text), list(self.ids), self.tokenizer)


class Dispatcher:
    def __init__(self, cfg: RouterConfig, handles: Mapping[str, DeploymentHandle], watch: ReplicaWatch,
                 breakers: Mapping[str, CircuitBreaker], states: Mapping[str, BackendState]):
        self.cfg, self.handles, self.watch, self.breakers, self.states = cfg, handles, watch, breakers, states

    # --- the loop ------------------------------------------------------------------

    async def _answers(self, out: Outcome, call: Call, candidates: Sequence[str], stream: bool = False,
                       continuing: bool = False) -> AsyncIterator[tuple[str, Any, Any]]:
        """(backend, answer, response) for each candidate that answers, in order, until the consumer
        stops or none is left. A stream's answer is its first piece. Every backend left on the way is
        an attempt in `out`; a request the backend finds at fault is a 400 unless another may take it
        (a degraded fallback's cut prompt, or a continuation)."""
        pending = deque(candidates)
        while pending and (remaining := out.deadline - time.monotonic()) > 0:
            name = pending.popleft()
            if not self._may_call(out, name):
                continue
            method, arg = call.to(name, out.decision)
            handle = self.handles[name]
            response = handle.options(stream=True).stream.remote(arg) if stream else getattr(handle, method).remote(arg)
            state, start = self.states[name], time.perf_counter()
            state.in_flight += 1
            try:
                result = await until_lost(self.watch, name, response.__anext__() if stream else response, remaining)
            except (asyncio.TimeoutError, BackendLost, BackPressureError, RayActorError, RayTaskError,
                    RequestCancelledError, StopAsyncIteration) as exc:
                response.cancel()
                kind = self._left(out, name, exc)
                if kind is Kind.deadline:
                    break
                if kind is Kind.replica_died and self._another_replica(out, name):
                    pending.appendleft(name)
                continue
            finally:
                state.in_flight -= 1
                out.waited_s += time.perf_counter() - start
            if isinstance(result, Failure):
                response.cancel()
                self._refused(out, name, result, continuing)
                continue
            self.breakers[name].record(failed=False)
            cut = getattr(result, "truncated_tokens", 0)  # the engine's count: the router's estimate may differ
            if name in out.decision.degraded and cut:
                out.degraded = f"{name}: {out.decision.degraded[name]} ({cut} tokens)"
            out.served_by = name
            yield name, result, response

    def _may_call(self, out: Outcome, name: str) -> bool:
        """Whether `name` may be called now: a live replica and a closed circuit (or its probe's turn)."""
        if not self.watch.available(name):
            out.tried(name, Kind.no_replica, "no live replica (Serve would hold the call until one starts)")
            return False
        if not self.breakers[name].try_call():
            out.tried(name, Kind.circuit_open, f"circuit {self.breakers[name].state}")
            return False
        return True

    def _left(self, out: Outcome, name: str, exc: BaseException) -> Kind:
        """Records why the call to `name` ended without an answer; returns its kind."""
        kind, error = self.kind_of(name, exc)
        self._fault(name, kind, error, deadline=True)
        out.tried(name, kind, error)
        return kind

    def _fault(self, name: str, kind: Kind, error: str, deadline: bool = False) -> None:
        """Counts a failure against `name`'s circuit when `kind` is the backend's fault. A replica that
        died is not, while the backend has another live replica: Serve replaces it, and the circuit is
        the backend's."""
        if kind is Kind.replica_died and self.watch.available(name):
            return
        if kind in FAULTS or (deadline and kind is Kind.deadline):
            logger.warning("backend %s failed: %s", name, error)
            self.breakers[name].record(failed=True)

    def kind_of(self, name: str, exc: BaseException) -> tuple[Kind, str]:
        if isinstance(exc, asyncio.TimeoutError):
            return Kind.deadline, f"no answer within the {self.cfg.request_timeout_s:g} s deadline"
        if isinstance(exc, BackendLost):
            return Kind.no_replica, "lost its last live replica"
        if isinstance(exc, BackPressureError):  # full, not broken
            return Kind.overloaded, "overloaded: its queue is full"
        if isinstance(exc, RayActorError):
            self.watch.died(name, exc.actor_id)
            return Kind.replica_died, f"replica died: {type(exc).__name__}"
        return Kind.failed, type(exc).__name__

    def _another_replica(self, out: Outcome, name: str) -> bool:
        """A call whose replica died goes once more to the same backend when it has another live
        replica (Serve's handle routes around the dead one)."""
        return self.watch.available(name) and sum(a.backend == name and a.kind is Kind.replica_died
                                                  for a in out.attempts) == 1

    def _refused(self, out: Outcome, name: str, failure: Failure, continuing: bool) -> None:
        """A backend's Failure value: the next candidate, or a 400 when the request is at fault."""
        if failure.kind == "unsupported":
            out.tried(name, Kind.unsupported, f"cannot take it: {failure.message}")
        elif failure.kind == "invalid" and (continuing or name in out.decision.degraded):
            out.tried(name, Kind.invalid, f"refused: {failure.message}")
        elif failure.kind == "invalid":
            self.breakers[name].record(failed=False)  # the backend is fine: the request is not
            raise ApiError(400, failure.message, param=failure.param)
        else:
            logger.warning("backend %s failed: %s", name, failure.message)
            self.breakers[name].record(failed=True)
            out.tried(name, Kind.failed, failure.message)

    def exhausted(self, out: Outcome) -> ApiError:
        return ApiError.of(outcome.exhausted(out.attempts, time.monotonic() >= out.deadline, self.cfg.retry_after_s))

    # --- unary calls and streams ---------------------------------------------------

    async def call(self, out: Outcome, call: Call) -> Any:
        """The first kept answer of the decision's candidates. An answer the call does not keep moves
        on to the next; when none does better, the first such answer is the result after all."""
        kept: tuple[str, Any] | None = None
        async with aclosing(self._answers(out, call, out.decision.candidates)) as answers:
            async for name, result, _ in answers:
                result, fault = call.accept(name, out.decision, result)
                if fault is None:
                    return result
                out.tried(name, Kind.not_kept, f"answer not kept: {fault}")
                kept = kept or (name, result)
        if kept is None:
            raise self.exhausted(out)
        out.served_by = kept[0]
        out.attempts = [a for a in out.attempts if a.backend != kept[0] or a.kind is not Kind.not_kept]
        return kept[1]

    async def open(self, out: Outcome, request: GenerationRequest, candidates: Sequence[str] | None = None,
                   continuing: bool = False) -> Opened:
        """A stream on the first candidate that sends a first piece (fallback before any byte)."""
        call = Call("stream", request)
        async with aclosing(self._answers(out, call, candidates or out.decision.candidates, True, continuing)) as it:
            async for name, first, gen in it:
                return Opened(name, gen, first)
        raise self.exhausted(out)

    async def relay(self, out: Outcome, request: GenerationRequest, opened: Opened) -> AsyncIterator[Delta | Verdict]:
        """The stream's pieces, continued on the next candidate when the backend fails after the first
        byte; ends with the finishing piece (its usage over the whole stream), or a Verdict when no
        candidate could go on. Sets `out.usage` or `out.error`."""
        done = _Progress()
        backend, gen, piece = opened.backend, opened.gen, opened.first
        try:
            while True:
                if isinstance(piece, Delta):
                    done.add(piece)
                    if piece.finish_reason is not None:
                        out.usage = (done.prompt_tokens or piece.prompt_tokens, done.before + piece.completion_tokens)
                        yield replace(piece, prompt_tokens=out.usage[0], completion_tokens=out.usage[1])
                        return
                    yield piece
                    kind, error = await self._next(out, backend, gen)
                    if kind is None:
                        piece = error
                        continue
                else:  # a Failure value after the first byte
                    kind, error = Kind.failed, f"{piece.message} mid-stream"
                self._fault(backend, kind, error)
                gen.cancel()
                spent = done.moved()
                migrated = out.tried(backend, Kind.migrated, error, tokens=spent, cause=kind)
                if kind is Kind.deadline:
                    out.error = f"request deadline passed mid-stream after {spent} tokens"
                    yield outcome.cut_off(kind, out.error)
                    return
                if spent >= request.max_tokens:  # every token was sent; only the finishing piece is missing
                    piece = Delta("", "length", done.prompt_tokens or 0, 0, tokenizer=done.tokenizer)
                    continue
                next_ = await self._continue(out, request, backend, done, spent)
                if isinstance(next_, Verdict):
                    out.error = next_.message
                    yield next_
                    return
                migrated.to = next_.backend
                backend, gen, piece = next_.backend, next_.gen, next_.first
        finally:
            gen.cancel()

    async def _next(self, out: Outcome, backend: str, gen: Any) -> tuple[Kind | None, Any]:
        """(None, the stream's next piece), or (the kind, the message) of why it broke."""
        remaining = out.deadline - time.monotonic()
        stall = min(remaining, self.cfg.stream_stall_s)
        start = time.perf_counter()
        try:
            return None, await until_lost(self.watch, backend, gen.__anext__(), max(0.0, stall))
        except asyncio.TimeoutError:
            if stall < remaining:
                return Kind.stalled, f"sent nothing for {self.cfg.stream_stall_s:g} s mid-stream"
            return Kind.deadline, "request deadline passed mid-stream"
        except (BackendLost, RayActorError, RayTaskError, RequestCancelledError, StopAsyncIteration) as exc:
            kind, error = self.kind_of(backend, exc)
            return kind, f"{error} mid-stream"
        finally:
            out.waited_s += time.perf_counter() - start

    async def _continue(self, out: Outcome, request: GenerationRequest, backend: str, done: _Progress,
                        spent: int) -> Opened | Verdict:
        """The stream continued on `backend` (another replica) or a candidate after it, or why none could."""
        candidates = out.decision.candidates
        after = candidates[candidates.index(backend):]
        again = replace(request, request_id=new_id("gen"), continuation=done.continuation(),
                        max_tokens=request.max_tokens - spent)
        try:
            return await self.open(out, again, after, continuing=True)
        except ApiError as exc:
            return Verdict(exc.status, exc.type, f"the stream broke after {spent} tokens and could not be "
                           f"continued: {exc.message}")
