"""What the router hop costs: the same tiny request over HTTP through router -> transformer, and over
HTTP straight to a transformer replica deployed as its own app; sequential and concurrent, interleaved
so that machine noise hits both alike. Also the in-process routing decision alone, and the floor:
the same two paths with a FastAPI ingress that only forwards to a deployment that only echoes, which is
what any Serve app pays for one more deployment hop on this machine (`serve_hop_floor_p50_ms`).

    python -m bench.router_overhead [--requests 300] [--concurrency 8]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

from deployments import serve_env

serve_env.apply()  # before Ray is imported, as `make serve` runs it

from deployments.config import AppConfig


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def policy_us(cfg: AppConfig, n: int = 20000) -> tuple[float, float]:
    """p50 of Policy.decide alone and of feature extraction (tokenising a chat prompt) in microseconds."""
    from transformers import AutoTokenizer

    from routing.features import text_features
    from routing.policy import Policy
    from models.checkpoints import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.router.tokenizer))
    count = lambda t: len(tok(t, add_special_tokens=False).input_ids)  # noqa: E731
    policy = Policy({b.name: b.capability for b in cfg.backends}, cfg.routing)
    prompt = "Please write a short poem about the sea and the ships that sail on it."
    f = text_features(endpoint="chat", prompt=prompt, documents=[], count_tokens=count, max_new_tokens=64)
    decide, extract = [], []
    for _ in range(n):
        t = time.perf_counter()
        policy.decide(f)
        decide.append(time.perf_counter() - t)
    for _ in range(n // 10):
        t = time.perf_counter()
        text_features(endpoint="chat", prompt=prompt, documents=[], count_tokens=count, max_new_tokens=64)
        extract.append(time.perf_counter() - t)
    return statistics.median(decide) * 1e6, statistics.median(extract) * 1e6


def floor_apps():
    """A FastAPI ingress that forwards the body to an echo deployment, and the echo deployment alone."""
    from fastapi import FastAPI
    from ray import serve

    @serve.deployment(name="echo", ray_actor_options={"num_cpus": 0})
    class Echo:
        async def echo(self, body: dict) -> dict:
            return {"text": "", "body": body}

        async def __call__(self, request) -> dict:
            return await self.echo(await request.json())

    app = FastAPI()

    @serve.deployment(name="forward", ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Forward:
        def __init__(self, echo):
            self.echo = echo

        @app.post("/")
        async def forward(self, body: dict) -> dict:
            return await self.echo.echo.remote(body)

    return Echo.bind(), Forward.bind(Echo.options(name="echo_behind").bind())


async def measure(base: str, requests: int, concurrency: int) -> dict[str, list[float]]:
    routed_body = {"model": "transformer", "prompt": "hi", "max_tokens": 1, "temperature": 0}
    direct_body = {"prompt": "hi", "max_tokens": 1, "temperature": 0}
    keys = ("direct", "routed", "direct_conc", "routed_conc", "echo", "forward")
    lat: dict[str, list[float]] = {k: [] for k in keys}
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        async def one(path: str, body: dict, key: str) -> None:
            t = time.perf_counter()
            r = await c.post(path, json=body)
            r.raise_for_status()
            lat[key].append((time.perf_counter() - t) * 1e3)

        for _ in range(20):  # warm every path
            await one("/direct", direct_body, "direct")
            await one("/v1/completions", routed_body, "routed")
            await one("/echo", direct_body, "echo")
            await one("/forward/", direct_body, "forward")
        for v in lat.values():
            v.clear()
        for _ in range(requests):  # interleaved, one at a time
            await one("/direct", direct_body, "direct")
            await one("/v1/completions", routed_body, "routed")
            await one("/echo", direct_body, "echo")
            await one("/forward/", direct_body, "forward")
        for _ in range(requests // concurrency):  # interleaved rounds of `concurrency` at once
            await asyncio.gather(*(one("/direct", direct_body, "direct_conc") for _ in range(concurrency)))
            await asyncio.gather(*(one("/v1/completions", routed_body, "routed_conc") for _ in range(concurrency)))
    return lat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.lm import LMServer

    cfg = AppConfig.from_serve_config()
    decide_us, features_us = policy_us(cfg)

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": 8765})
    serve.run(build_app(cfg.model_dump()), name="switchyard", route_prefix="/")
    transformer = next(b for b in cfg.backends if b.name == "transformer")
    direct = serve.deployment(LMServer, name="direct", **transformer.deployment.options())
    serve.run(direct.bind(transformer), name="direct", route_prefix="/direct")
    echo, forward = floor_apps()
    serve.run(echo, name="echo", route_prefix="/echo")
    serve.run(forward, name="forward", route_prefix="/forward")
    try:
        lat = asyncio.run(measure("http://127.0.0.1:8765", args.requests, args.concurrency))
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "direct_p50_ms": round(pct(lat["direct"], 0.5), 2),
        "routed_p50_ms": round(pct(lat["routed"], 0.5), 2),
        "added_p50_ms": round(pct(lat["routed"], 0.5) - pct(lat["direct"], 0.5), 2),
        "added_p99_ms": round(pct(lat["routed"], 0.99) - pct(lat["direct"], 0.99), 2),
        "direct_concurrent_p50_ms": round(pct(lat["direct_conc"], 0.5), 2),
        "routed_concurrent_p50_ms": round(pct(lat["routed_conc"], 0.5), 2),
        "added_concurrent_p50_ms": round(pct(lat["routed_conc"], 0.5) - pct(lat["direct_conc"], 0.5), 2),
        "echo_p50_ms": round(pct(lat["echo"], 0.5), 2),
        "forward_p50_ms": round(pct(lat["forward"], 0.5), 2),
        "serve_hop_floor_p50_ms": round(pct(lat["forward"], 0.5) - pct(lat["echo"], 0.5), 2),
        "router_own_p50_ms": round(pct(lat["routed"], 0.5) - pct(lat["direct"], 0.5)
                                   - (pct(lat["forward"], 0.5) - pct(lat["echo"], 0.5)), 2),
        "policy_p50_us": round(decide_us, 1),
        "features_p50_us": round(features_us, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
