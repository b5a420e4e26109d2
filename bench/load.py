"""Load: concurrent clients for a while on the default app (serve_config.yaml), a mix of endpoints.

Each client loops, drawing its next request from MIX (weights): short chats with the router
choosing, completions, streamed chats, sudoku and code repair, images, routing decisions and the
model list. Every response is counted by status; a request with no answer within the client's 90 s
timeout counts as an error too.

    python -m bench.load [--clients 64] [--duration 60]

Last line: one JSON object: clients, duration_s, requests, ok, errors_5xx, p50_ms, p99_ms, rps, then
the status counts, client timeouts, and p50 per kind of request.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import io
import json
import random
import statistics
import time
from collections import Counter, defaultdict

import httpx

from deployments import serve_env

serve_env.apply()  # before Ray is imported, as `make serve` runs it

SUDOKU = [[5, 3, 0, 0, 7, 0, 0, 0, 0], [6, 0, 0, 1, 9, 5, 0, 0, 0], [0, 9, 8, 0, 0, 0, 0, 6, 0],
          [8, 0, 0, 0, 6, 0, 0, 0, 3], [4, 0, 0, 8, 0, 3, 0, 0, 1], [7, 0, 0, 0, 2, 0, 0, 0, 6],
          [0, 6, 0, 0, 0, 0, 2, 8, 0], [0, 0, 0, 4, 1, 9, 0, 0, 5], [0, 0, 0, 0, 8, 0, 0, 7, 9]]
PROMPTS = ["Write a haiku about the sea.", "Explain what a hash map is.", "def add(a, b):",
           "my script dies with IndexError: list index out of range", "What is 17 times 23?",
           "Summarise: the quarterly numbers went up again and the board was pleased."]


@functools.cache
def digit_pngs() -> list[str]:
    """The digits as base64 PNGs, made once: the load generator shares the cores with the server."""
    from training.classifier_default import digits_images

    out = []
    for image in digits_images()[0]:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def request(kind: str, rng: random.Random) -> tuple[str, str, dict | None, bool]:
    """(method, path, JSON body, stream) of one request of this kind."""
    prompt = rng.choice(PROMPTS)
    if kind == "chat":
        return "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], "max_tokens": 16}, False
    if kind == "chat_stream":
        return "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
                                                "stream": True}, True
    if kind == "completion":
        return "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 16}, False
    if kind == "sudoku":
        return "POST", "/v1/refine", {"task": "sudoku", "grid": SUDOKU}, False
    if kind == "code_repair":
        return "POST", "/v1/refine", {"task": "code_repair", "code": "def add(a, b)\n    return a + b\n"}, False
    if kind == "classify":
        return "POST", "/v1/classify", {"image": rng.choice(digit_pngs())}, False
    if kind == "route":
        return "POST", "/v1/route", {"prompt": prompt, "max_tokens": 16}, False
    return "GET", "/v1/models", None, False


MIX = {"chat": 35, "completion": 15, "chat_stream": 10, "sudoku": 10, "code_repair": 5, "classify": 10,
       "route": 10, "models": 5}


async def client(c: httpx.AsyncClient, seed: int, until: float, results: list) -> None:
    rng = random.Random(seed)
    kinds, weights = list(MIX), list(MIX.values())
    while time.monotonic() < until:
        kind = rng.choices(kinds, weights)[0]
        method, path, body, stream = request(kind, rng)
        start = time.perf_counter()
        try:
            if stream:
                async with c.stream(method, path, json=body) as r:
                    async for _ in r.aiter_bytes():
                        pass
            else:
                r = await c.request(method, path, json=body)
            status = r.status_code
        except httpx.TimeoutException:
            status = "timeout"
        results.append((kind, status, (time.perf_counter() - start) * 1e3))


async def run(base: str, clients: int, duration: float) -> list:
    results: list = []
    async with httpx.AsyncClient(base_url=base, timeout=90,
                                 limits=httpx.Limits(max_connections=clients + 8)) as c:
        for kind in MIX:  # one of each first: loads and warms every path
            method, path, body, stream = request(kind, random.Random(0))
            await c.request(method, path, json=body)
        until = time.monotonic() + duration
        await asyncio.gather(*(client(c, i, until, results) for i in range(clients)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60)
    args = parser.parse_args()

    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.config import AppConfig

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": 8766})
    serve.run(build_app(AppConfig.from_serve_config().model_dump()), name="switchyard", route_prefix="/")
    start = time.monotonic()
    try:
        results = asyncio.run(run("http://127.0.0.1:8766", args.clients, args.duration))
    finally:
        elapsed = time.monotonic() - start
        serve.shutdown()
        ray.shutdown()
    statuses = Counter(str(s) for _, s, _ in results)
    latencies = sorted(ms for _, _, ms in results)
    by_kind = defaultdict(list)
    for kind, _, ms in results:
        by_kind[kind].append(ms)
    print(json.dumps({
        "clients": args.clients, "duration_s": args.duration, "requests": len(results),
        "ok": sum(1 for _, s, _ in results if s == 200),
        "errors_5xx": sum(1 for _, s, _ in results if isinstance(s, int) and s >= 500),
        "p50_ms": round(statistics.median(latencies), 1),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
        "rps": round(len(results) / args.duration, 1),
        "statuses": dict(statuses), "client_timeouts": statuses.get("timeout", 0),
        "p50_ms_by_kind": {k: round(statistics.median(v), 1) for k, v in sorted(by_kind.items())},
        "wall_s": round(elapsed, 1),
    }))


if __name__ == "__main__":
    main()
