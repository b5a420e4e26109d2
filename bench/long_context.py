"""Prefill and decode cost against context length for the Mamba and transformer backends, the cost
models fitted to them, and how often the router, using those models, picks the faster backend.

Each backend runs as the config sets it up (its engine, as deployments/lm.py builds it), in a process
of its own (as Serve runs it), one request at a time, greedy with ignore_eos, on held-out stdlib
source (text neither model trained on).

1. Calibration, at every context C in --contexts: a streamed request of 128 new tokens after a
   prompt of C - 129 tokens; prefill seconds are the time to its first piece, decode ms per token
   the time from the first piece to the last over 127, so decode is measured at contexts
   C - 128 .. C. Medians of --repeats (5) rounds, each round through every context. The fits: prefill a
   quadratic in the prompt length, decode a line in the context (least squares with coefficients
   kept >= 0, scipy's nnls).
2. Router check, on a grid of contexts x new tokens N (--new), the prompt being the context less
   N tokens: both backends run the whole request (median of --grid-repeats (3) rounds, each round
   through every point); the router (routing.Policy on serve_config.yaml's routing, with the
   fitted cost models) predicts from (L, N); `router_choice_ok` is the share of grid points where
   its choice is the backend that measured faster. Points beyond a backend's max_context are
   skipped for it; points only one backend can take are left out of the share.

    python -m bench.long_context [--contexts 512 1024 2048 4096 8192] [--new 16 128 384] [--write]
                                 [--repeats 5] [--grid-repeats 3]
                                 [--config serve_config.gpu.yaml]

--write stores the fitted cost models in the config (serve_config.yaml: and in
k8s/rayservice-cpu.yaml), on each backend's one-line `capability.cost`. Last line: one JSON object with contexts, mamba_prefill_s,
mamba_decode_ms, transformer_prefill_s, transformer_decode_ms, mamba_flatness (decode ms at the
longest context over decode ms at the shortest), router_choice_ok, the grid and the fits.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from bench.capability import CONFIGS, configs_for, on_backend_interpreter, write_lines
from deployments.config import AppConfig
from deployments.lm import engine_for
from models.engine import Engine, GenerationRequest
from routing.cost import CostModel
from routing.features import Features
from routing.policy import Policy
from training import corpus
from models.checkpoints import resolve_model

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("mamba", "transformer")
DECODE = 128  # tokens decoded per calibration point


def heldout_ids(tokenizer, tokens: int) -> list[int]:
    """The first `tokens` tokens of the held-out split's files, joined."""
    ids: list[int] = []
    for text in corpus.texts("heldout"):
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if len(ids) >= tokens:
            break
    return ids[:tokens]


async def timed(engine: Engine, prompt: str, new: int) -> tuple[float, int]:
    """(seconds, prompt tokens) of one greedy request making exactly `new` tokens."""
    start = time.perf_counter()
    done = await engine.generate(GenerationRequest("bench", prompt=prompt, max_tokens=new, temperature=0,
                                                   ignore_eos=True))
    assert done.completion_tokens == new, done
    return time.perf_counter() - start, done.prompt_tokens


async def streamed(engine: Engine, prompt: str, new: int) -> tuple[float, float, int]:
    """(seconds to the first streamed piece, ms per token after it, prompt tokens) of one greedy
    request making exactly `new` tokens."""
    start = time.perf_counter()
    first = last = None
    async for delta in engine.stream(GenerationRequest("bench", prompt=prompt, max_tokens=new, temperature=0,
                                                       ignore_eos=True)):
        last = time.perf_counter()
        first = first or last
    assert delta.completion_tokens == new, delta
    return first - start, (last - first) / (new - 1) * 1e3, delta.prompt_tokens


async def calibrate(name: str, engine: Engine, texts: dict[int, str], repeats: int) -> dict[str, list[float]]:
    """Medians over `repeats` rounds, each round going through every context once (interleaved, so a
    noisy moment of this shared machine spreads over the contexts instead of landing on one)."""
    for text in texts.values():
        await streamed(engine, text, 2)  # warm-up at every length
    runs = {c: [] for c in texts}
    for _ in range(repeats):
        for context, text in texts.items():
            runs[context].append(await streamed(engine, text, DECODE))
    prefill = [statistics.median(r[0] for r in runs[c]) for c in texts]
    decode = [statistics.median(r[1] for r in runs[c]) for c in texts]
    lengths = [runs[c][0][2] for c in texts]
    for context, p, d, n in zip(texts, prefill, decode, lengths):
        print(f"  {name} context {context}: prompt {n} tokens, prefill {p:.3f} s, decode {d:.2f} ms/token", flush=True)
    return {"prompt_tokens": lengths, "prefill_s": prefill, "decode_ms": decode}


def _nonnegative_fit(x: np.ndarray, y: list[float], degree: int) -> list[float]:
    """Least-squares polynomial coefficients (constant first), all >= 0: costs do not fall as the
    context grows, and the router extrapolates beyond the measured range (up to 65k for mamba)."""
    import scipy.optimize  # here: the measuring processes (.venv-vllm's among them) need not have it

    scale = x.max()  # columns of similar size, for a well-conditioned solve
    vander = np.vander(x / scale, degree + 1, increasing=True)
    coefficients, _ = scipy.optimize.nnls(vander, np.asarray(y, dtype=float))
    return [c / scale**i for i, c in enumerate(coefficients)]


def fit(curve: dict[str, list[float]], measured: str) -> CostModel:
    lengths = np.array(curve["prompt_tokens"], dtype=float)
    prefill = _nonnegative_fit(lengths, curve["prefill_s"], 2)
    decode = _nonnegative_fit(lengths + DECODE / 2, curve["decode_ms"], 1)
    return CostModel(prefill_s=[float(f"{c:.4g}") for c in prefill],
                     decode_ms=[float(f"{c:.4g}") for c in decode], measured=measured)


def write_costs(costs: dict[str, CostModel], paths=CONFIGS) -> None:
    """Replaces each backend's one-line `cost: {...}` in the config files (comments stay)."""
    write_lines("cost", {name: f"{{prefill_s: {c.prefill_s}, decode_ms: {c.decode_ms}, measured: {json.dumps(c.measured)}}}"
                         for name, c in costs.items()}, paths)


async def _measure(name: str, config: Path, texts: dict[int, str], cases: dict[tuple[int, int], str], repeats: int,
                   grid_repeats: int) -> dict:
    cfg = AppConfig.from_serve_config(config).backend(name)
    # built as deployments/lm.py builds it: hf, or vllm on a GPU config
    engine = engine_for(cfg, adapters=False)
    await engine.start()
    curve = await calibrate(name, engine, texts, repeats)
    runs: dict[tuple[int, int], list[float]] = {case: [] for case in cases}
    prompt_tokens: dict[tuple[int, int], int] = {}
    for _ in range(grid_repeats):
        for (context, n), prompt in cases.items():
            if engine.max_context is None or context <= engine.max_context:
                seconds, prompt_tokens[(context, n)] = await timed(engine, prompt, n)
                runs[(context, n)].append(seconds)
    kernel = engine.info()["kernel"]
    engine.close()
    return {"curve": curve, "seconds": {case: statistics.median(s) for case, s in runs.items() if s},
            "prompt_tokens": prompt_tokens, "kernel": kernel}


def measure(*args) -> dict:
    """One backend's calibration and grid timings, in a process of its own: Serve runs each backend in
    a Ray actor process of its own, and two engines in one process slow each other even when one is
    idle (a Mamba request of 127 + 384 tokens took 0.87 to 0.94 s alone, 1.26 to 1.48 s with the
    transformer engine loaded beside it, 1.71 to 1.87 s once that had generated; their torch thread
    pools compete for the two cores)."""
    return asyncio.run(_measure(*args))


def run(contexts: list[int], new: list[int], repeats: int, config: Path = CONFIGS[0], grid_repeats: int = 3
        ) -> tuple[dict, dict[str, CostModel]]:
    app = AppConfig.from_serve_config(config)
    tok = AutoTokenizer.from_pretrained(resolve_model(app.backend("transformer").model))
    ids = heldout_ids(tok, max(contexts))
    texts = {c: tok.decode(ids[:c - DECODE - 1]) for c in contexts}  # the context holds the last token too
    cases = {(context, n): tok.decode(ids[:context - n - 1]) for context in contexts for n in new if n < context}
    stamp = f"python -m bench.long_context, {torch.get_num_threads()} threads, {datetime.date.today()}"
    results = {}
    for name in BACKENDS:  # one at a time, each in a fresh process, on the interpreter Serve would give it
        results[name] = on_backend_interpreter(app.backend(name), measure, name, config, texts, cases, repeats,
                                               grid_repeats)
    curves = {name: r["curve"] for name, r in results.items()}
    costs = {name: fit(curve, stamp) for name, curve in curves.items()}

    backends = {b.name: b.capability for b in app.backends}
    backends |= {n: backends[n].model_copy(update={"cost": costs[n]}) for n in BACKENDS}
    policy = Policy({n: backends[n] for n in BACKENDS}, app.routing.model_copy(update={"strategy": "cost"}))
    measured = {case: {name: r["seconds"][case] for name, r in results.items() if case in r["seconds"]}
                for case in cases}
    prompt_tokens = results["transformer"]["prompt_tokens"] | results["mamba"]["prompt_tokens"]
    grid = []
    for (context, n), seconds in measured.items():
        if len(seconds) < 2:  # only one backend takes it
            continue
        point = {"prompt_tokens": prompt_tokens[(context, n)], "new_tokens": n, "seconds": seconds}
        f = Features(endpoint="bench", modality="text", tokens=point["prompt_tokens"], max_new_tokens=n, pages=0,
                     text="")
        d = policy.decide(f)
        point |= {"router": d.backend, "predicted_s": d.predicted_s,
                  "faster": min(point["seconds"], key=point["seconds"].get)}
        point["seconds"] = {k: round(v, 3) for k, v in point["seconds"].items()}
        grid.append(point)
        print(f"  L={point['prompt_tokens']} N={n}: measured {point['seconds']}, predicted "
              f"{point['predicted_s']}, router {d.backend}", flush=True)

    m, t = curves["mamba"], curves["transformer"]
    result = {
        "contexts": contexts,
        "mamba_prefill_s": [round(x, 4) for x in m["prefill_s"]],
        "mamba_decode_ms": [round(x, 2) for x in m["decode_ms"]],
        "transformer_prefill_s": [round(x, 4) for x in t["prefill_s"]],
        "transformer_decode_ms": [round(x, 2) for x in t["decode_ms"]],
        "mamba_flatness": round(m["decode_ms"][-1] / m["decode_ms"][0], 3),
        "transformer_growth": round(t["decode_ms"][-1] / t["decode_ms"][0], 3),
        "router_choice_ok": round(sum(p["router"] == p["faster"] for p in grid) / len(grid), 3),
        "grid_points": len(grid),
        "grid": grid,
        "cost_models": {n: c.model_dump() for n, c in costs.items()},
        "repeats": repeats,
        "grid_repeats": grid_repeats,
        "torch_threads": torch.get_num_threads(),
        "kernel": results["mamba"]["kernel"],
    }
    return result, costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--new", type=int, nargs="+", default=[16, 128, 384])
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the calibration")
    parser.add_argument("--grid-repeats", type=int, default=3, help="rounds of the router check")
    parser.add_argument("--config", type=Path, default=CONFIGS[0], help="serve config to read (and --write)")
    parser.add_argument("--write", action="store_true", help="store the fitted cost models in the config (and in "
                        "the k8s manifest when it is serve_config.yaml)")
    args = parser.parse_args()
    result, costs = run(sorted(args.contexts), args.new, args.repeats, args.config, args.grid_repeats)
    if args.write:
        write_costs(costs, configs_for(args.config))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
