"""Engines injected through the config's `engine: module:Class` in serve tests."""

import asyncio

from models.engine import Completion, Engine, GenerationRequest
from models.hf_engine import HFEngine


class FailingEngine(HFEngine):
    """Loads the real model, then fails every call: a backend that is up but broken."""

    async def generate(self, request: GenerationRequest) -> Completion:
        raise RuntimeError("injected failure")

    async def stream(self, request: GenerationRequest):
        raise RuntimeError("injected failure")
        yield  # an async generator that fails on its first step


class HangingEngine(Engine):
    """Never answers: a backend that hangs. Loads nothing; counts the calls the router cancelled."""

    def __init__(self, **_):
        self.cancelled = 0

    async def start(self) -> None:
        pass

    async def generate(self, request: GenerationRequest) -> Completion:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def stream(self, request: GenerationRequest):
        await self.generate(request)
        yield  # never reached

    async def check_health(self) -> None:
        pass

    def info(self) -> dict:
        return {"engine": "hang", "architecture": "none", "kernel": "none", "device": "cpu",
                "cancelled": self.cancelled}
