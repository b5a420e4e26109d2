"""The router's view of live replicas (deployments/replicas.py), with a fake controller and clock."""

import asyncio
import threading

import pytest

from deployments.replicas import BackendLost, ReplicaWatch, until_lost


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def watch(clock=None) -> ReplicaWatch:
    return ReplicaWatch(["mamba", "transformer"], fetch=lambda: {}, dead_hold_s=30, clock=clock or Clock())


def test_every_backend_counts_as_running_until_the_controller_is_read():
    w = watch()
    assert w.available("mamba") and w.live("mamba") is None
    w.update({"mamba": {"a"}})
    assert w.available("mamba") and w.live("mamba") == 1
    assert w.available("transformer")  # not listed: unknown, not gone
    w.update({"mamba": {"a"}, "transformer": set()})
    assert not w.available("transformer")  # listed, and none running


def test_a_replica_a_call_saw_die_is_dead_at_once_until_the_controller_drops_it():
    w = watch()
    w.update({"transformer": {"a", "b"}})
    w.died("transformer", "a")
    assert w.available("transformer") and w.live("transformer") == 1
    w.died("transformer", "b")
    assert not w.available("transformer")
    w.update({"transformer": {"a", "b"}})  # the controller has not noticed yet: still dead
    assert not w.available("transformer")
    w.update({"transformer": {"c"}})  # replaced
    assert w.available("transformer") and w.dead["transformer"] == {}


def test_an_unreachable_replica_the_controller_keeps_comes_back_after_the_hold():
    clock = Clock()
    w = watch(clock)
    w.update({"mamba": {"a"}})
    w.died("mamba", "a")
    assert not w.available("mamba")
    clock.t = 29.0
    w.update({"mamba": {"a"}})
    assert not w.available("mamba")
    clock.t = 31.0
    w.update({"mamba": {"a"}})
    assert w.available("mamba")


def test_died_without_an_actor_id_or_for_an_unknown_backend_changes_nothing():
    w = watch()
    w.update({"mamba": {"a"}})
    w.died("mamba", None)
    w.died("other", "a")
    assert w.available("mamba")


def test_a_call_waiting_on_a_backend_that_loses_its_last_replica_moves_on():
    async def main():
        w = watch()
        w.update({"mamba": {"a"}})
        never = asyncio.get_running_loop().create_future()  # Serve holding the call for a replica
        waiting = asyncio.create_task(until_lost(w, "mamba", never, timeout=10))
        await asyncio.sleep(0.01)
        w.update({"mamba": set()})
        with pytest.raises(BackendLost):
            await asyncio.wait_for(waiting, 1)
        assert never.cancelled()
        # once a replica runs again, a new call waits on a fresh event
        w.update({"mamba": {"b"}})
        assert not w.lost("mamba").is_set()

    asyncio.run(main())


def test_until_lost_returns_the_answer_or_times_out():
    async def main():
        w = watch()
        w.update({"mamba": {"a"}})

        async def answer():
            return 42

        assert await until_lost(w, "mamba", answer(), timeout=1) == 42
        with pytest.raises(asyncio.TimeoutError):
            await until_lost(w, "mamba", asyncio.sleep(5), timeout=0.05)
        with pytest.raises(ValueError):
            async def fails():
                raise ValueError("backend error")
            await until_lost(w, "mamba", fails(), timeout=1)

    asyncio.run(main())


def test_the_poll_keeps_the_last_view_when_the_controller_cannot_be_read():
    calls = []

    def fetch():  # called in a thread
        calls.append(1)
        if len(calls) == 1:
            return {"mamba": {"a"}}
        raise ConnectionError("controller restarting")

    async def main():
        w = ReplicaWatch(["mamba"], fetch, poll_s=0.01)
        w.start()
        while len(calls) < 3:  # two failed polls after the first view (no bound on how soon)
            await asyncio.sleep(0.01)
        assert w.live("mamba") == 1
        w._task.cancel()

    asyncio.run(main())


def test_first_read_starts_polling_and_waits_for_the_controllers_view():
    async def main():
        w = ReplicaWatch(["mamba", "transformer"], fetch=lambda: {"mamba": {"a"}, "transformer": set()}, poll_s=60)
        await w.first_read(timeout=5)
        return w.live("mamba"), w.available("transformer")

    assert asyncio.run(main()) == (1, False)  # the transformer's replica is starting: listed, not running


def test_first_read_gives_up_after_its_timeout_when_the_controller_does_not_answer():
    answer = threading.Event()

    async def main():
        w = ReplicaWatch(["mamba"], fetch=lambda: answer.wait(10) and {"mamba": {"a"}}, poll_s=60)
        await w.first_read(timeout=0.05)
        unknown = w.live("mamba")
        answer.set()  # the controller answers late: the poll goes on
        while w.live("mamba") is None:
            await asyncio.sleep(0.01)
        return unknown, w.live("mamba")

    assert asyncio.run(main()) == (None, 1)  # unknown, as before the first read; then read
