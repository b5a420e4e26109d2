"""Serve deployment of a language-model backend (mamba, transformer): an Engine behind a handle."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from ray.serve import metrics
from starlette.requests import Request
from starlette.responses import JSONResponse

from deployments.api import openai_error
from deployments.config import LMBackend
from deployments.protocol import Failure, as_value, stream_values
from models.engine import Completion, Delta, Engine, GenerationRequest
from models.checkpoints import resolve_model

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
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


def engine_for(cfg: LMBackend, adapters: bool = True, **engine_kwargs: Any) -> Engine:
    """The backend's engine as its config builds it; `engine_kwargs` override the config's (benchmarks)."""
    return engine_class(cfg.engine)(
        model=resolve_model(cfg.model),
        device=cfg.device,
        dtype=cfg.dtype,
        max_context=cfg.capability.max_context,
        adapters={name: resolve_model(ref) for name, ref in cfg.adapters.items()} if adapters else {},
        **(cfg.engine_kwargs | engine_kwargs),
    )


class LMServer:
    async def __init__(self, cfg: LMBackend):  # Serve awaits async constructors
        self.cfg = cfg
        self.engine = engine_for(cfg)
        await self.engine.start()
        info = self.engine.info()
        # Which engine and kernel path this replica runs, as a Prometheus info-style gauge (always 1;
        # Serve adds the deployment and replica tags): switchyard_lm_engine{kernel="reference",...}.
        self.engine_gauge = metrics.Gauge(
            "switchyard_lm_engine", tag_keys=("engine", "architecture", "kernel", "device"),
            description="Engine, architecture, kernel path and device of an LM replica (value 1).")
        self.engine_tags = {"engine": str(info.get("engine")), "architecture": str(info.get("architecture")),
                            "kernel": str(info.get("kernel") or "none"), "device": str(info.get("device"))}
        self.engine_gauge.set(1, tags=self.engine_tags)

        self.m_ttft = metrics.Histogram("switchyard_lm_ttft_seconds", boundaries=LATENCY_BUCKETS,
                                        description="Time to the first streamed text of a request.")
        self.m_itl = metrics.Histogram("switchyard_lm_inter_token_seconds", boundaries=LATENCY_BUCKETS,
                                       description="Time between streamed pieces of text.")
        # the engine's own counters, read at each health check (every deployment.health_check_period_s)
        self.m_queue = metrics.Gauge("switchyard_lm_queue_depth", description="Requests waiting for the engine.")
        self.m_running = metrics.Gauge("switchyard_lm_running", description="Requests the engine is generating "
                                       "(the current batch, for the hf engine).")
        self.m_acceptance = metrics.Gauge("switchyard_lm_speculation_acceptance",
                                          description="Accepted over proposed speculative tokens since start.")
        self.m_batches = metrics.Counter("switchyard_lm_batches", description="Batches the engine has run.")
        self.batches_seen = 0
        self.m_tps = metrics.Histogram("switchyard_lm_tokens_per_second", boundaries=[1, 3, 10, 30, 100, 300, 1000],
                                       description="Completion tokens over the request's time, per request.")

    async def generate(self, request: GenerationRequest) -> Completion | Failure:
        start = time.perf_counter()
        result = await as_value(self.engine.generate(request))
        if isinstance(result, Completion) and result.completion_tokens:
            self.m_tps.observe(result.completion_tokens / (time.perf_counter() - start))
        return result

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta | Failure]:
        start = last = time.perf_counter()
        first = True
        async for item in stream_values(self.engine.stream(request)):
            if isinstance(item, Delta) and item.text:
                now = time.perf_counter()
                (self.m_ttft if first else self.m_itl).observe(now - last)
                first, last = False, now
            if isinstance(item, Delta) and item.finish_reason is not None and item.completion_tokens:
                self.m_tps.observe(item.completion_tokens / (time.perf_counter() - start))
            yield item

    async def info(self) -> dict[str, Any]:
        return self.engine.info()

    async def check_health(self) -> None:
        await self.engine.check_health()
        # again at every health check: a gauge set once at start went missing from a later scrape
        # in the serve tests
        self.engine_gauge.set(1, tags=self.engine_tags)
        info = self.engine.info()  # keys an engine lacks (vLLM keeps its own metrics) are skipped
        for gauge, key in ((self.m_queue, "waiting"), (self.m_running, "running"),
                           (self.m_acceptance, "speculation_acceptance")):
            if isinstance(info.get(key), (int, float)):
                gauge.set(float(info[key]))
        if isinstance(batches := info.get("batches"), int) and batches > self.batches_seen:
            self.m_batches.inc(batches - self.batches_seen)
            self.batches_seen = batches

    async def __call__(self, request: Request) -> JSONResponse:
        """HTTP straight to this backend, when it is deployed as an app's ingress (bench.router_overhead):
        a completions body in, the Completion's fields out, errors in OpenAI's shape. The router never
        calls it."""
        try:
            body = await request.json()
            req = GenerationRequest(request_id="direct", prompt=str(body["prompt"]),
                                    max_tokens=int(body.get("max_tokens", 16)),
                                    temperature=float(body.get("temperature", 1.0)))
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse(openai_error(f"a completions body with a prompt is expected: {exc}",
                                             "invalid_request_error"), status_code=400)
        result = await self.generate(req)
        if isinstance(result, Failure):
            status = 500 if result.kind == "internal" else 400
            type_ = "internal_server_error" if status == 500 else "invalid_request_error"
            return JSONResponse(openai_error(result.message, type_), status_code=status)
        return JSONResponse(asdict(result))
