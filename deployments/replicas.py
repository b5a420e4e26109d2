"""Which backends have a live replica, as the router sees it.

Ray Serve keeps a call waiting, silently, while its deployment has no running replica (the node
lost, the replica restarting) until one comes back; only the caller's own deadline ends it. So the
router keeps its own view:

- every `poll_s` it asks Serve's controller which replicas of this application's backends run
  (the details the dashboard shows: replica actor ids and states);
- a call that fails because its replica died names that replica (the error's actor id), which is
  then taken as dead at once: the controller notices later, after its next health check;
- a backend with no live replica left is unavailable: the decision skips it, and calls already
  waiting on it are told (`lost(name)` is set) so they move on to the next candidate instead of
  waiting for the deadline.

A replica taken as dead on a call's word stays so until the controller stops listing it, or
`dead_hold_s` passes (an `ActorUnavailableError` may be a network blip the replica survives).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger("ray.serve")

Fetch = Callable[[], dict[str, set[str]]]  # backend -> actor ids of its RUNNING replicas


def serve_fetch(app_name: str, backends: Iterable[str]) -> Fetch:
    """Reads the controller's view of `app_name`: the RUNNING replicas of each of `backends`."""
    wanted = set(backends)

    def fetch() -> dict[str, set[str]]:
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
        deployments = details.get("applications", {}).get(app_name, {}).get("deployments", {})
        return {name: {r["actor_id"] for r in d.get("replicas", []) if r.get("state") == "RUNNING"}
                for name, d in deployments.items() if name in wanted}

    return fetch


class ReplicaWatch:
    def __init__(self, backends: Iterable[str], fetch: Fetch, poll_s: float = 0.5, dead_hold_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.fetch, self.poll_s, self.dead_hold_s, self.clock = fetch, poll_s, dead_hold_s, clock
        self.running: dict[str, set[str] | None] = {b: None for b in backends}  # None: not read yet
        self.dead: dict[str, dict[str, float]] = {b: {} for b in self.running}  # actor id -> when told
        self._lost: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task | None = None
        self._polled = asyncio.Event()  # set once a first poll has ended, read or failed

    def available(self, name: str) -> bool:
        """True while `name` has a replica that is running and not known dead (or before the first read)."""
        running = self.running.get(name)
        return running is None or bool(running - self.dead[name].keys())

    def live(self, name: str) -> int | None:
        running = self.running.get(name)
        return None if running is None else len(running - self.dead[name].keys())

    def died(self, name: str, actor_id: str | None) -> None:
        """A call to `name` failed because its replica (`actor_id`) died or became unreachable."""
        if actor_id and name in self.dead:
            self.dead[name][actor_id] = self.clock()
            self._changed(name)

    def lost(self, name: str) -> asyncio.Event:
        """Set when `name` loses its last live replica; a new event once it has one again."""
        event = self._lost.get(name)
        if event is None or (event.is_set() and self.available(name)):
            event = self._lost[name] = asyncio.Event()
        return event

    def update(self, running: dict[str, set[str]]) -> None:
        now = self.clock()
        for name in self.running:  # a backend the controller does not list is unknown, not gone
            self.running[name] = set(running[name]) if name in running else None
            self.dead[name] = {a: t for a, t in self.dead[name].items()
                               if a in (self.running[name] or ()) and now - t < self.dead_hold_s}
            self._changed(name)

    def _changed(self, name: str) -> None:
        if not self.available(name) and (event := self._lost.get(name)) is not None:
            event.set()

    def start(self) -> None:
        """Starts polling on the running event loop (once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def first_read(self, timeout: float) -> None:
        """Starts polling and waits for its first poll to end, `timeout` seconds at most: a caller that
        reports the replicas (/healthz) then says what the controller says, not `unknown`."""
        self.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._polled.wait(), timeout)

    def stopped(self) -> bool:
        """True when polling started and has ended (it only ends by an error it did not expect)."""
        return self._task is not None and self._task.done()

    async def _poll(self) -> None:
        while True:
            try:
                self.update(await asyncio.to_thread(self.fetch))
            except Exception as exc:  # the controller restarting: keep the last view, say so
                logger.warning("could not read the backends' replicas: %s: %s", type(exc).__name__, exc)
            self._polled.set()
            await asyncio.sleep(self.poll_s)


async def until_lost(watch: ReplicaWatch, name: str, call: Any, timeout: float) -> Any:
    """Awaits `call` (a backend response) for `timeout` seconds at most; raises BackendLost when
    `name` loses its last live replica first (Serve would keep the call waiting for a new one). The
    caller cancels the backend request on either error."""
    lost = watch.lost(name)
    task = asyncio.ensure_future(call)
    waiter = asyncio.ensure_future(lost.wait())
    try:
        done, _ = await asyncio.wait((task, waiter), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task in done:
        return task.result()
    task.cancel()
    if waiter in done:
        raise BackendLost(name)
    raise asyncio.TimeoutError


class BackendLost(Exception):
    """The backend lost its last live replica while a call waited on it."""

