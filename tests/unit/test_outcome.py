"""routing/outcome.py: attempts to status, error type and Retry-After, as tables. The messages in the
rows are reworded on purpose: the rules read kinds only."""

import pytest

from routing import outcome
from routing.access import Caller
from routing.outcome import Attempt, Kind
from routing.policy import AdapterChoice


def tried(*kinds: Kind) -> list[Attempt]:
    return [Attempt(f"b{i}", k, f"reworded message {i}", float(i)) for i, k in enumerate(kinds)]


@pytest.mark.parametrize("kinds, deadline_passed, status, type_, retry", [
    ((Kind.unsupported,), False, 400, "invalid_request_error", None),
    ((Kind.unsupported, Kind.invalid), False, 400, "invalid_request_error", None),
    ((Kind.unsupported, Kind.failed), False, 503, "service_unavailable", 2),
    ((Kind.overloaded,), False, 503, "service_unavailable", 2),
    ((Kind.overloaded, Kind.overloaded), False, 503, "service_unavailable", 2),
    ((Kind.overloaded, Kind.no_replica), False, 503, "service_unavailable", 2),
    ((Kind.failed,), False, 503, "service_unavailable", 2),
    ((Kind.circuit_open, Kind.replica_died), False, 503, "service_unavailable", 2),
    ((Kind.failed, Kind.deadline), False, 504, "timeout", None),
    ((Kind.failed,), True, 504, "timeout", None),
    ((), True, 504, "timeout", None),
    ((Kind.migrated, Kind.no_replica), False, 503, "service_unavailable", 2),
    ((Kind.unsupported,), True, 400, "invalid_request_error", None),  # no backend could take it anyway
])
def test_exhausted(kinds, deadline_passed, status, type_, retry):
    v = outcome.exhausted(tried(*kinds), deadline_passed, retry_after_s=1.5)
    assert (v.status, v.type, v.retry_after) == (status, type_, retry)
    assert all(f"b{i}: reworded message {i}" in v.message for i in range(len(kinds)))


@pytest.mark.parametrize("kind, status, type_", [
    ("invalid", 400, "invalid_request_error"), ("not_found", 404, "model_not_found"),
    ("forbidden", 403, "permission_error"), ("unavailable", 503, "service_unavailable"),
])
def test_routing_errors(kind, status, type_):
    v = outcome.routing(kind, "anything", retry_after_s=3)
    assert (v.status, v.type, v.message) == (status, type_, "anything")
    assert v.retry_after == (3 if status == 503 else None)


def test_one_retry_after_rule():
    assert [outcome.retry_after(s, 0.2) for s in (400, 429, 503, 504)] == [None, None, 1, None]
    assert outcome.retry_after(503, 7.1) == 8


def test_a_stream_cut_off():
    assert outcome.cut_off(Kind.deadline, "m").status == 504 and outcome.cut_off(Kind.deadline, "m").type == "timeout"
    assert outcome.cut_off(Kind.failed, "m").type == "service_unavailable"


def test_capacity():
    assert outcome.capacity(3, 16) == 48 and outcome.capacity("auto", 16) == 16


def test_image_adapter_kept_only_where_the_caller_may_use_it():
    adapters = {"mamba": ["pydoc"], "transformer": ["pydoc"]}
    choice = AdapterChoice(True, "label '3' at 0.90", "pydoc")
    anyone = Caller("a", ("all",))
    assert outcome.permitted(choice, anyone, adapters) == choice
    base_only = Caller("t", ("t",), adapters=frozenset())
    kept = outcome.permitted(choice, base_only, adapters)
    assert not kept.applied and "may not use pydoc: base model" in kept.reason
    pinned = AdapterChoice(True, "label '3' at 0.90", "mamba:pydoc", "mamba")
    mamba_only = Caller("m", ("m",), adapters=frozenset({"mamba:pydoc"}))
    assert outcome.permitted(pinned, mamba_only, adapters) == pinned
    not_applied = AdapterChoice(False, "confidence 0.10 < 0.5: base model")
    assert outcome.permitted(not_applied, base_only, adapters) is not_applied
