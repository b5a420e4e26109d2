"""Structured outputs on every language-model backend of serve_config.yaml: do sampled answers follow the
schema, and what does constraining cost per token.

Each backend runs as the config builds it (deployments.lm.engine_for: the Mamba on the hf engine with
llguidance, the transformer on vLLM with its own structured outputs), in a process of its own on the
interpreter Serve gives it. For each of the five schemas of bench/data/schemas.json, --generations (20)
streamed chat answers at temperature 1 (seeds 0..), one request at a time:

  valid         the answer parses as JSON and validates against the schema (jsonschema)
  constrained   decode ms per token of the constrained answer (first piece to last, over its tokens less one)
  free          the same for an unconstrained answer of as many tokens (ignore_eos, same prompt and seed),
                run right after it, so machine noise hits both alike

    python -m bench.structured [--generations 20] [--backends mamba transformer]

Last line: one JSON object: per backend, valid answers over generations (per schema and in all), finish
reasons, median decode ms per token constrained and free, and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter
from pathlib import Path

from bench.capability import on_backend_interpreter

SCHEMAS = json.loads((Path(__file__).parent / "data" / "schemas.json").read_text())


async def _stream(engine, request) -> tuple[str, int, float | None, str | None]:
    """(text, completion tokens, decode ms per token from the first piece to the last, finish reason)."""
    text, first, last, tokens, reason = "", None, None, 0, None
    async for delta in engine.stream(request):
        now = time.perf_counter()
        if delta.token_ids:
            first = first or now
            last = now
        text += delta.text
        if delta.finish_reason is not None:
            tokens, reason = delta.completion_tokens, delta.finish_reason
    per_token = (last - first) * 1000 / (tokens - 1) if first is not None and tokens > 1 else None
    return text, tokens, per_token, reason


async def _measure(name: str, generations: int) -> dict:
    import jsonschema

    from deployments.config import AppConfig
    from deployments.lm import engine_for
    from models.engine import GenerationRequest

    engine = engine_for(AppConfig.from_serve_config().backend(name), adapters=False)
    await engine.start()
    valid, reasons = Counter(), Counter()
    constrained, free = [], []
    for schema_name, schema in SCHEMAS.items():
        messages = [{"role": "user", "content": f"Reply with a JSON object describing a {schema_name}."}]
        for seed in range(generations):
            ask = GenerationRequest(f"{schema_name}-{seed}", messages=messages, max_tokens=256, temperature=1.0,
                                    seed=seed, json_schema=schema)
            text, tokens, per_token, reason = await _stream(engine, ask)
            reasons[reason] += 1
            try:
                jsonschema.validate(json.loads(text), schema)
                valid[schema_name] += 1
            except (ValueError, jsonschema.ValidationError) as exc:
                print(f"  {name} {schema_name} seed {seed}: invalid ({type(exc).__name__}): {text[:120]!r}", flush=True)
            plain = GenerationRequest(f"free-{schema_name}-{seed}", messages=messages, max_tokens=max(tokens, 2),
                                      temperature=1.0, seed=seed, ignore_eos=True)
            _, _, free_per_token, _ = await _stream(engine, plain)
            if per_token is not None and free_per_token is not None:
                constrained.append(per_token)
                free.append(free_per_token)
        print(f"  {name} {schema_name}: {valid[schema_name]}/{generations} valid", flush=True)
    info = engine.info()
    engine.close()
    total = generations * len(SCHEMAS)
    c, f = statistics.median(constrained), statistics.median(free)
    return {"engine": info["engine"], "valid": sum(valid.values()), "generations": total,
            "valid_per_schema": {s: valid[s] for s in SCHEMAS}, "finish_reasons": dict(reasons),
            "constrained_ms_per_token_p50": round(c, 2), "free_ms_per_token_p50": round(f, 2),
            "constrained_over_free": round(c / f, 3), "pairs": len(constrained)}


def measure(name: str, generations: int) -> dict:
    return asyncio.run(_measure(name, generations))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=20, help="sampled answers per schema")
    parser.add_argument("--backends", nargs="+", default=["mamba", "transformer"])
    args = parser.parse_args()
    from deployments.config import AppConfig

    app = AppConfig.from_serve_config()
    result = {}
    for name in args.backends:
        result[name] = on_backend_interpreter(app.backend(name), measure, name, args.generations)
        print(name, result[name], flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
