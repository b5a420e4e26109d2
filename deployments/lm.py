"""Serve deployment of a language-model backend (mamba, transformer): an Engine behind a handle."""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from ray.serve import metrics
from starlette.requests import Request

from deployments.config import LMBackend
from deployments.protocol import Failure, as_value, stream_values
from models.engine import Completion, Delta, Engine, GenerationRequest
from training.defaults import resolve_model

logger = logging.getLogger(__name__)

# Imported when named: vllm is an optional extra.
ENGINES = {"hf": "models.hf_engine:HFEngine", "vllm": "models.vllm_engine:VLLMEngine"}


def engine_class(name: str) -> type[Engine]:
    """`hf`, `vllm`, or `module:Class` naming an Engine subclass (tests inject engines this way)."""
    module, _, attr = ENGINES.get(name, name).partition(":")
    if not attr:
        raise ValueError(f"unknown engine {name!r}: use one of {sorted(ENGINES)} or 'module:Class'")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise ValueError(f"engine {name!r} is not an Engine subclass")
    return cls


class LMServer:
    async def __init__(self, cfg: LMBackend):  # Serve awaits async constructors
        self.cfg = cfg
        self.engine = engine_class(cfg.engine)(
            model=resolve_model(cfg.model),
            device=cfg.device,
            dtype=cfg.dtype,
            max_context=cfg.capability.max_context,
            adapters={name: resolve_model(ref) for name, ref in cfg.adapters.items()},
            **cfg.engine_kwargs,
        )
        await self.engine.start()
        info = self.engine.info()
        # Which engine and kernel path this replica runs, as a Prometheus info-style gauge (always 1;
        # Serve adds the deployment and replica tags): switchyard_lm_engine{kernel="reference",...}.
        self.engine_gauge = metrics.Gauge(
            "switchyard_lm_engine", tag_keys=("engine", "architecture", "kernel", "device"),
            description="Engine, architecture, kernel path and device of an LM replica (value 1).")
        self.engine_gauge.set(1, tags={"engine": str(info.get("engine")), "architecture": str(info.get("architecture")),
                                       "kernel": str(info.get("kernel") or "none"), "device": str(info.get("device"))})

    async def generate(self, request: GenerationRequest) -> Completion | Failure:
        return await as_value(self.engine.generate(request))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta | Failure]:
        async for item in stream_values(self.engine.stream(request)):
            yield item

    async def info(self) -> dict[str, Any]:
        return self.engine.info()

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def __call__(self, request: Request) -> dict[str, Any]:
        """HTTP straight to this backend, when it is deployed as an app's ingress (bench.router_overhead):
        a completions body in, the Completion's fields out. The router never calls it."""
        body = await request.json()
        result = await self.generate(GenerationRequest(
            request_id="direct", prompt=str(body["prompt"]), max_tokens=int(body.get("max_tokens", 16)),
            temperature=float(body.get("temperature", 1.0)),
        ))
        if isinstance(result, Failure):
            raise ValueError(result.message)
        return asdict(result)
