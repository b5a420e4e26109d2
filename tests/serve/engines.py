"""Engines injected through the config's `engine: module:Class` in serve tests."""

import asyncio

from models.engine import Completion, Delta, Engine, GenerationRequest
from models.hf_engine import HFEngine


class _Fails:
    """Fails every call."""

    async def generate(self, request: GenerationRequest) -> Completion:
        raise RuntimeError("injected failure")

    async def stream(self, request: GenerationRequest):
        raise RuntimeError("injected failure")
        yield  # an async generator that fails on its first step


class FailingEngine(_Fails, HFEngine):
    """Loads the real model, then fails every call: a backend that is up but broken."""


class _NoModel(Engine):
    """An engine that loads nothing and is always healthy."""

    name = "none"

    def __init__(self, **_):
        pass

    async def start(self) -> None:
        pass

    async def check_health(self) -> None:
        pass

    def info(self) -> dict:
        return {"engine": self.name, "architecture": "none", "kernel": "none", "device": "cpu"}

    def close(self) -> None:
        pass


class BrokenEngine(_Fails, _NoModel):
    """Fails every call, loading nothing."""

    name = "broken"


class EchoEngine(_NoModel):
    """Answers "echo" at once, loading nothing."""

    name = "echo"

    async def generate(self, request: GenerationRequest) -> Completion:
        return Completion("echo", prompt_tokens=1, completion_tokens=1, finish_reason="stop")

    async def stream(self, request: GenerationRequest):
        yield Delta("echo", finish_reason="stop", prompt_tokens=1, completion_tokens=1)


class TrickleEngine(_NoModel):
    """Streams "x" every 10 ms until cancelled, and counts the streams cancelled."""

    name = "trickle"

    def __init__(self, **_):
        self.cancelled = 0

    async def generate(self, request: GenerationRequest) -> Completion:
        raise RuntimeError("trickle only streams")

    async def stream(self, request: GenerationRequest):
        try:
            while True:
                yield Delta("x", prompt_tokens=1, completion_tokens=1)
                await asyncio.sleep(0.01)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise

    def info(self) -> dict:
        return super().info() | {"cancelled": self.cancelled}


class HangingEngine(_NoModel):
    """Never answers: a backend that hangs. Counts the calls the router cancelled."""

    name = "hang"

    def __init__(self, **_):
        self.cancelled = 0

    async def generate(self, request: GenerationRequest) -> Completion:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def stream(self, request: GenerationRequest):
        await self.generate(request)
        yield  # never reached

    def info(self) -> dict:
        return super().info() | {"cancelled": self.cancelled}
