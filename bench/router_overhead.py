"""What the router hop costs: the same tiny request over HTTP through router -> transformer, and over
HTTP straight to a transformer replica deployed as its own app; sequential and concurrent, interleaved
so that machine noise hits both alike. Also the in-process routing decision alone, and the floor:
the same two paths with a FastAPI ingress that only forwards to a deployment that only echoes, which is
what any Serve app pays for one more deployment hop on this machine (`serve_hop_floor_p50_ms`).

    python -m bench.router_overhead [--requests 300] [--concurrency 8] [--baseline REF]

With --baseline, the router of commit REF (`git archive` into a temporary folder, deployed from it
through Ray's runtime_env working_dir) serves beside this one in the same Serve instance, with its own
backends, and its requests are interleaved with the others: `split_cost_p50_ms` is this router's
median less REF's, measured side by side. `overhead_header_p50_ms` is the median of this router's
own `x-switchyard-overhead-ms`.

Ray Serve's settings come from deployments/serve_env.py; one given in the environment wins, so
`RAY_SERVE_ENABLE_HA_PROXY=1 python -m bench.router_overhead` measures the HAProxy ingress. The JSON's
`serve_env` says which were in force.

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from deployments import serve_env

serve_env.apply()  # before Ray is imported, as `make serve` runs it

from deployments.config import AppConfig, LMBackend


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


def deploy_baseline(ref: str) -> None:
    """The app of commit `ref`, as the application `baseline` at /baseline, from its own source tree."""
    tree = Path(tempfile.mkdtemp(prefix="switchyard-baseline-"))
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "archive", ref], cwd=root, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    script = (  # its own driver: the baseline's modules must not meet this process's
        "import ray\nfrom ray import serve\n"
        f"ray.init(address='auto', namespace='serve', runtime_env={{'working_dir': {str(tree)!r}}}, "
        "logging_level='ERROR')\n"
        "from deployments.app import build_app\nfrom deployments.config import AppConfig\n"
        "serve.run(build_app(AppConfig.from_serve_config().model_dump()), name='baseline', "
        "route_prefix='/baseline', blocking=False)\n")
    subprocess.run([sys.executable, "-c", script], cwd=tree, check=True, env=os.environ | {"PYTHONPATH": str(tree)})


async def timed_post(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, httpx.Response]:
    """Milliseconds from sending the request to the whole response read; raises on an error status."""
    t = time.perf_counter()
    r = await client.post(url, json=body)
    r.raise_for_status()
    return (time.perf_counter() - t) * 1e3, r


async def interleaved(client: httpx.AsyncClient, calls: dict[str, tuple[str, dict]], rounds: int, warmup: int = 20,
                      order: random.Random | None = None,
                      seen: Callable[[str, httpx.Response], None] | None = None) -> dict[str, list[float]]:
    """Latencies (ms) of named POSTs (url, JSON body), one request at a time: `warmup` rounds that are not
    kept (a first request loads what is lazy), then `rounds` rounds, each call once a round in a new
    order. The path after another pays for what that one left (a warm or a busy core); with one fixed
    order, two identical apps differed by 2.4 ms at p50. `seen` gets each kept call's response."""
    order = order or random.Random(0)
    lat: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(warmup + rounds):
        for key in order.sample(list(calls), len(calls)):
            ms, r = await timed_post(client, *calls[key])
            if i >= warmup:
                lat[key].append(ms)
                if seen is not None:
                    seen(key, r)
    return lat


def added_ms(via: list[float], direct: list[float], q: float = 0.5) -> float:
    """What a hop adds at quantile q: that quantile of the latencies through it less that of the direct ones."""
    return round(pct(via, q) - pct(direct, q), 2)


def deploy_direct(backend: LMBackend) -> str:
    """The backend's replica as an app of its own, the way the router's app deploys it, so that HTTP
    reaches it without the router (LMServer.__call__: a completions body in); its route prefix."""
    from ray import serve

    from deployments.lm import LMServer

    direct = serve.deployment(LMServer, name="direct", **backend.deployment.options())
    serve.run(direct.bind(backend), name="direct", route_prefix="/direct")
    return "/direct"


async def measure(base: str, requests: int, concurrency: int, baseline: bool) -> dict[str, list[float]]:
    routed_body = {"model": "transformer", "prompt": "hi", "max_tokens": 1, "temperature": 0}
    direct_body = {"prompt": "hi", "max_tokens": 1, "temperature": 0}
    paths = {"direct": "/direct", "routed": "/v1/completions", "echo": "/echo", "forward": "/forward/",
             "baseline": "/baseline/v1/completions"}
    calls = {k: (path, routed_body if path.endswith("completions") else direct_body) for k, path in paths.items()
             if baseline or k != "baseline"}
    header: list[float] = []
    order = random.Random(0)
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        def own_time(key: str, r: httpx.Response) -> None:
            if key == "routed":
                header.append(float(r.headers["x-switchyard-overhead-ms"]))

        lat = await interleaved(c, calls, requests, order=order, seen=own_time)
        lat["overhead_header"] = header

        async def one(key: str) -> None:
            ms, _ = await timed_post(c, *calls[key])
            lat[f"{key}_conc"].append(ms)

        concurrent = ["direct", "routed", "baseline"][: 3 if baseline else 2]
        lat |= {f"{key}_conc": [] for key in concurrent}
        for _ in range(requests // concurrency):  # rounds of `concurrency` at once
            for key in order.sample(concurrent, len(concurrent)):
                await asyncio.gather(*(one(key) for _ in range(concurrency)))
    return lat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--baseline", metavar="REF", help="Also measure the router of this git commit, side by side.")
    args = parser.parse_args()

    import ray
    from ray import serve

    from deployments.app import build_app

    cfg = AppConfig.from_serve_config()
    decide_us, features_us = policy_us(cfg)

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": 8765})
    serve.run(build_app(cfg.model_dump()), name="switchyard", route_prefix="/")
    deploy_direct(cfg.backend("transformer"))
    echo, forward = floor_apps()
    serve.run(echo, name="echo", route_prefix="/echo")
    serve.run(forward, name="forward", route_prefix="/forward")
    if args.baseline:
        deploy_baseline(args.baseline)
    try:
        lat = asyncio.run(measure("http://127.0.0.1:8765", args.requests, args.concurrency, bool(args.baseline)))
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "direct_p50_ms": round(pct(lat["direct"], 0.5), 2),
        "routed_p50_ms": round(pct(lat["routed"], 0.5), 2),
        "added_p50_ms": added_ms(lat["routed"], lat["direct"]),
        "added_p99_ms": added_ms(lat["routed"], lat["direct"], 0.99),
        "direct_concurrent_p50_ms": round(pct(lat["direct_conc"], 0.5), 2),
        "routed_concurrent_p50_ms": round(pct(lat["routed_conc"], 0.5), 2),
        "added_concurrent_p50_ms": added_ms(lat["routed_conc"], lat["direct_conc"]),
        "echo_p50_ms": round(pct(lat["echo"], 0.5), 2),
        "forward_p50_ms": round(pct(lat["forward"], 0.5), 2),
        "serve_hop_floor_p50_ms": added_ms(lat["forward"], lat["echo"]),
        "router_own_p50_ms": round(pct(lat["routed"], 0.5) - pct(lat["direct"], 0.5)
                                   - (pct(lat["forward"], 0.5) - pct(lat["echo"], 0.5)), 2),
        "overhead_header_p50_ms": round(pct(lat["overhead_header"], 0.5), 2),
        "policy_p50_us": round(decide_us, 1),
        "features_p50_us": round(features_us, 1),
        # what Ray ran with: serve_env's table and any RAY_SERVE_ setting given beside it
        "serve_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")},
    }
    if args.baseline:
        result |= {
            "baseline": args.baseline,
            "baseline_routed_p50_ms": round(pct(lat["baseline"], 0.5), 2),
            "split_cost_p50_ms": round(pct(lat["routed"], 0.5) - pct(lat["baseline"], 0.5), 2),
            "baseline_routed_concurrent_p50_ms": round(pct(lat["baseline_conc"], 0.5), 2),
            "split_cost_concurrent_p50_ms": round(pct(lat["routed_conc"], 0.5) - pct(lat["baseline_conc"], 0.5), 2),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
