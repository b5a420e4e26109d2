"""routing/breaker.py: every transition of the circuit breaker, on a fake clock."""

from __future__ import annotations

import pytest

from routing.breaker import CircuitBreaker


def breaker(**kw) -> tuple[CircuitBreaker, list[float]]:
    now = [0.0]
    return CircuitBreaker(**({"after": 3, "cooldown_s": 10, "rate": 0.5, "window": 10, "clock": lambda: now[0]} | kw)), now


def test_consecutive_failures_open_it_and_a_success_resets_the_count():
    b, _ = breaker()
    for failed in (True, True, False, True, True):
        b.record(failed)
    assert b.state == "closed" and b.available() and b.try_call()
    b.record(True)
    assert b.state == "open" and not b.available() and not b.try_call()


def test_a_failure_rate_over_a_full_window_opens_it():
    b, _ = breaker(after=100)
    for failed in [True, False] * 4 + [True]:  # 5 of 9: the window is not full yet
        b.record(failed)
    assert b.state == "closed"
    b.record(False)  # 5 of 10
    assert b.state == "open"
    c, _ = breaker(after=100, rate=None)
    for _ in range(30):
        c.record(True)
        c.record(False)
    assert c.state == "closed"  # rate off: consecutive failures only


def test_after_the_cooldown_one_probe_goes_and_its_success_closes_it():
    b, now = breaker(after=1)
    b.record(True)
    now[0] = 9.9
    assert not b.available() and not b.try_call()
    now[0] = 10.0
    assert b.available()
    assert b.try_call() and b.state == "half_open"
    assert not b.available() and not b.try_call()  # one probe at a time
    b.record(False)
    assert b.state == "closed" and b.try_call() and b.try_call()


def test_a_failed_probe_opens_it_for_another_cooldown():
    b, now = breaker(after=1)
    b.record(True)
    now[0] = 10
    assert b.try_call()
    now[0] = 12
    b.record(True)
    assert b.state == "open" and b.opened_at == 12
    now[0] = 21.9
    assert not b.try_call()
    now[0] = 22
    assert b.try_call()


def test_a_probe_that_never_reports_is_replaced_after_a_cooldown():
    b, now = breaker(after=1)
    b.record(True)
    now[0] = 10
    assert b.try_call()  # its caller goes away without a word
    now[0] = 19.9
    assert not b.try_call()
    assert not b.available()
    now[0] = 20
    assert b.available()  # the router plans calls here again, so the next one can be the probe
    assert b.try_call() and b.state == "half_open"


def test_calls_planned_before_it_opened_do_not_count_while_open():
    b, now = breaker(after=1)
    b.record(True)
    b.record(False)  # a late success from a call made while closed
    assert b.state == "open"
    now[0] = 10
    assert b.try_call()


@pytest.mark.parametrize("window", [1, 5])
def test_half_open_clears_the_history(window):
    b, now = breaker(after=2, window=window, rate=1.0)
    b.record(True)
    b.record(True)
    now[0] = 10
    b.try_call()
    b.record(False)
    assert b.state == "closed" and list(b.recent) == [] and b.failures == 0
