"""A circuit breaker per backend: closed, open for a cooldown after failures, then half-open.

closed     every call goes through. `after` consecutive failures, or a failure share of at least
           `rate` over the last `window` calls (once `window` calls are in), open it.
open       no call goes through until `cooldown_s` has passed; then the next call is let through
           alone as a probe (half-open).
half_open  the probe is in flight and every other call stays away; its success closes the
           breaker (and clears the counts), its failure opens it for another cooldown. A probe
           that never reports (its caller went away) is replaced by another after a cooldown.

Plain Python with an injectable clock, so every transition is a table row in tests/unit/test_breaker.py.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

State = Literal["closed", "open", "half_open"]


@dataclass
class CircuitBreaker:
    after: int = 3
    cooldown_s: float = 10.0
    rate: float | None = 0.5
    window: int = 20
    clock: Callable[[], float] = time.monotonic
    state: State = "closed"
    failures: int = 0  # consecutive
    recent: deque[bool] = field(default_factory=deque)  # True: a failure
    opened_at: float = 0.0
    probe_at: float = 0.0

    def available(self) -> bool:
        """Whether the router may plan a call here now (the decision's health filter)."""
        if self.state == "closed":
            return True
        since = self.clock() - (self.opened_at if self.state == "open" else self.probe_at)
        return since >= self.cooldown_s  # open: the cooldown is over; half-open: the probe is lost

    def try_call(self) -> bool:
        """Whether a call may go now; a call after the cooldown becomes the one probe."""
        if self.state == "closed":
            return True
        now = self.clock()
        since = now - (self.opened_at if self.state == "open" else self.probe_at)
        if since >= self.cooldown_s:
            self.state, self.probe_at = "half_open", now
            return True
        return False

    def record(self, failed: bool) -> None:
        if self.state == "half_open":
            if failed:
                self._open()
            else:
                self.state, self.failures = "closed", 0
                self.recent.clear()
            return
        if self.state == "open":  # a call planned before it opened: it counts for nothing now
            return
        self.recent.append(failed)
        while len(self.recent) > self.window:
            self.recent.popleft()
        self.failures = self.failures + 1 if failed else 0
        share = sum(self.recent) / len(self.recent)
        if self.failures >= self.after or (
                self.rate is not None and len(self.recent) == self.window and share >= self.rate):
            self._open()

    def _open(self) -> None:
        self.state, self.opened_at, self.failures = "open", self.clock(), 0
        self.recent.clear()
