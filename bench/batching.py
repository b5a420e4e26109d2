"""Batching in an LM deployment: `concurrency` streamed requests of `tokens` new tokens sent together,
against the same requests sent one at a time (concurrency 1), through a Serve handle to the deployment
as serve_config.yaml configures it. Greedy, ignore_eos so every request makes exactly `tokens` tokens.
The transformer batches statically (one generate() per batch); the mamba backend (`--backend mamba`,
a Mamba-1 on the reference path) batches continuously (models/hf_engine.py).

    python -m bench.batching [--backend transformer|mamba] [--concurrency 16] [--tokens 64]

Last line: one JSON object with concurrency, sequential_tok_s and batched_tok_s (output tokens/s at
concurrency 1 and at `concurrency`), ratio (their quotient), ttft_p50_ms and sequential_ttft_p50_ms
(time to the first streamed piece, median over requests, at `concurrency` and at 1), ttft_ratio (their
quotient), itl_p50_ms (mean gap between a request's pieces, median over requests), and the engine's
continuous_batching flag as its replica reports it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from deployments import serve_env

serve_env.apply()  # before Ray is imported, as `make serve` runs it

from deployments.config import AppConfig  # noqa: E402
from models.engine import GenerationRequest  # noqa: E402

PROMPTS = [
    "def parse_args(argv):", "class LRUCache:\n    def __init__(self, size):", "import os\nimport sys\n\n",
    "def read_config(path):\n    with open(path) as f:", "for i, line in enumerate(lines):",
    "async def fetch(url):", "def __repr__(self):", "if __name__ == '__main__':",
]


async def one(handle, prompt: str, tokens: int) -> tuple[float, float, int, float]:
    """(seconds to the first piece, mean seconds between pieces, tokens, total seconds)."""
    req = GenerationRequest("bench", prompt=prompt, max_tokens=tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    stamps, made = [], 0
    async for delta in handle.options(stream=True).stream.remote(req):
        stamps.append(time.perf_counter())
        made = delta.completion_tokens or made
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return stamps[0] - start, statistics.mean(gaps) if gaps else 0.0, made, stamps[-1] - start


async def measure(handle, concurrency: int, tokens: int) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(concurrency)]
    for p in prompts[:2]:  # warm-up
        await one(handle, p, 8)
    start = time.perf_counter()
    seq = [await one(handle, p, tokens) for p in prompts]
    seq_s = time.perf_counter() - start
    start = time.perf_counter()
    together = await asyncio.gather(*(one(handle, p, tokens) for p in prompts))
    together_s = time.perf_counter() - start
    seq_tok_s = sum(r[2] for r in seq) / seq_s
    batched_tok_s = sum(r[2] for r in together) / together_s
    return {
        "concurrency": concurrency,
        "tokens": tokens,
        "sequential_tok_s": round(seq_tok_s, 1),
        "batched_tok_s": round(batched_tok_s, 1),
        "ratio": round(batched_tok_s / seq_tok_s, 2),
        "ttft_p50_ms": round(statistics.median(r[0] for r in together) * 1e3, 1),
        "ttft_ratio": round(statistics.median(r[0] for r in together) / statistics.median(r[0] for r in seq), 2),
        "itl_p50_ms": round(statistics.median(r[1] for r in together) * 1e3, 2),
        "sequential_ttft_p50_ms": round(statistics.median(r[0] for r in seq) * 1e3, 1),
        "sequential_itl_p50_ms": round(statistics.median(r[1] for r in seq) * 1e3, 2),
        "all_tokens_made": all(r[2] == tokens for r in seq + together),
        "continuous_batching": (await handle.info.remote()).get("continuous_batching", False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--backend", default="transformer", help="an lm backend of serve_config.yaml")
    args = parser.parse_args()

    import ray
    from ray import serve

    from deployments.lm import LMServer

    backend = AppConfig.from_serve_config().backend(args.backend)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    options = backend.deployment.options() | {"max_ongoing_requests": max(args.concurrency, 16)}
    handle = serve.run(serve.deployment(LMServer, name=args.backend, **options).bind(backend), name="bench",
                       route_prefix=None)
    try:
        result = asyncio.run(measure(handle, args.concurrency, args.tokens))
    finally:
        ray.shutdown()  # the local cluster, Serve with it (serve.shutdown needs the closed loop)
    result |= {"backend": args.backend, "model": backend.model,
               "engine_kwargs": backend.engine_kwargs, "num_cpus": backend.deployment.ray_actor_options.get("num_cpus")}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
