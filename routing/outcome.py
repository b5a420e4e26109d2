"""What happened to a request, and what the client is told: typed attempts, and the rules that turn
them into an HTTP status, an OpenAI error type and a Retry-After.

Every attempt at a backend has a `Kind`; code branches on kinds only, and messages are for people
(STYLE 17). Plain functions over plain data (no Ray, torch or FastAPI), table-tested in
tests/unit/test_outcome.py like the policy.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from routing.access import Caller
from routing.policy import AdapterChoice, ErrorKind


class Kind(StrEnum):
    """Why the router left a backend (or, for `migrated`, moved a stream on)."""

    unsupported = "unsupported"  # a valid request this backend cannot take (the next may)
    invalid = "invalid"  # the backend found the request at fault (a degraded fallback's cut prompt)
    overloaded = "overloaded"  # its queue is full: not broken, no mark against its circuit
    no_replica = "no_replica"  # no live replica (Serve would hold the call until one starts)
    circuit_open = "circuit_open"  # avoided after failures, until its cooldown's probe
    replica_died = "replica_died"  # the replica serving the call died or became unreachable
    deadline = "deadline"  # the request's deadline passed while waiting on it
    stalled = "stalled"  # a stream sent nothing for longer than router.stream_stall_s
    failed = "failed"  # the backend raised or answered with an internal failure
    not_kept = "not_kept"  # it answered, but the answer failed the endpoint's check (a repair that does not parse)
    migrated = "migrated"  # a stream that failed after its first byte, continued on `to`


# Kinds that count against the backend's circuit.
FAULTS = frozenset({Kind.replica_died, Kind.stalled, Kind.failed})
# Kinds where the request, not capacity or a fault, decided: none left means a 400.
REFUSALS = frozenset({Kind.unsupported, Kind.invalid})


@dataclass
class Attempt:
    backend: str
    kind: Kind
    error: str  # for people
    after_ms: float  # since the decision: when the router left this backend
    tokens: int | None = None  # migrated: completion tokens the client had when the stream moved
    to: str | None = None  # migrated: the backend that continued it (None: none could)
    cause: Kind | None = None  # migrated: why the stream left `backend`


@dataclass(frozen=True)
class Verdict:
    """The answer to a request no backend served."""

    status: int
    type: str
    message: str
    retry_after: int | None = None  # seconds, for the Retry-After header


TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
         429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}
ROUTING_STATUS: Mapping[ErrorKind, int] = {"invalid": 400, "not_found": 404, "unavailable": 503, "forbidden": 403}


def error_type(status: int) -> str:
    """OpenAI's error type for a status."""
    return TYPES.get(status, "internal_server_error" if status >= 500 else "invalid_request_error")


def retry_after(status: int, retry_after_s: float) -> int | None:
    """The one Retry-After rule: every 503 the router gives says `router.retry_after_s` (rounded up,
    at least 1); other statuses say nothing (a 429's wait comes from the caller's own bucket)."""
    return max(1, math.ceil(retry_after_s)) if status == 503 else None


def tried(attempts: Sequence[Attempt]) -> str:
    return "; ".join(f"{a.backend}: {a.error}" for a in attempts) or "none"


def exhausted(attempts: Sequence[Attempt], deadline_passed: bool, retry_after_s: float) -> Verdict:
    """Every candidate was tried (or the deadline passed): the status the client gets."""
    kinds = {a.kind for a in attempts}
    if kinds and kinds <= REFUSALS:
        status, message = 400, "no backend can take this request"
    elif deadline_passed or Kind.deadline in kinds:
        status, message = 504, "request deadline passed"
    elif kinds == {Kind.overloaded}:
        status, message = 503, "every capable backend is at capacity"
    else:
        status, message = 503, "every capable backend failed"
    return Verdict(status, error_type(status), f"{message}; tried {tried(attempts)}",
                   retry_after(status, retry_after_s))


def routing(kind: ErrorKind, message: str, retry_after_s: float) -> Verdict:
    """The policy found no candidate (routing.policy.RoutingError)."""
    status = ROUTING_STATUS[kind]
    type_ = "model_not_found" if status == 404 else error_type(status)
    return Verdict(status, type_, message, retry_after(status, retry_after_s))


def cut_off(kind: Kind, message: str) -> Verdict:
    """A stream that failed after its first byte and could not be continued: the error event's shape."""
    status = 504 if kind is Kind.deadline else 503
    return Verdict(status, error_type(status), message)


def capacity(replicas: int | str, per_replica: int) -> int:
    """Requests a backend takes at once: its replicas (1 until an autoscaled one is read) times
    max_ongoing_requests each."""
    return (replicas if isinstance(replicas, int) else 1) * per_replica


def permitted(choice: AdapterChoice, caller: Caller, adapters: Mapping[str, Collection[str]]) -> AdapterChoice:
    """A chat image's adapter choice, kept only when the caller may use that adapter on a backend
    that has it (and that the choice allows); otherwise the base model answers, and the reason says why."""
    if not choice.applied:
        return choice
    name = (choice.adapter or "").rpartition(":")[2]
    if any(caller.may_use(b, name) for b, names in adapters.items() if name in names and choice.backend in (None, b)):
        return choice
    return AdapterChoice(False, f"{choice.reason}, but caller {caller.name} may not use {choice.adapter}: base model")

