"""Engines injected through the config's `engine: module:Class` in serve tests."""

from models.engine import Completion, GenerationRequest
from models.hf_engine import HFEngine


class FailingEngine(HFEngine):
    """Loads the real model, then fails every call: a backend that is up but broken."""

    async def generate(self, request: GenerationRequest) -> Completion:
        raise RuntimeError("injected failure")

    async def stream(self, request: GenerationRequest):
        raise RuntimeError("injected failure")
        yield  # an async generator that fails on its first step
