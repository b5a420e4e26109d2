"""The embedded TRM on held-out sudoku: solve rate by number of givens, adaptive halting's savings,
latency and throughput.

Held-out puzzles come from training/sudoku_data.py with other seeds than training's, its test set's
and its calibration set's (and none of the training base puzzles, which are regenerated to check).
Latency and throughput are timed on puzzles drawn across all numbers of givens. Every puzzle is refined twice: with the
halting head (the config's threshold) and with every one of max_steps steps (threshold 1.0).

    python -m bench.trm [--per-givens 100] [--givens 24 28 32 36 40 45]

Last line: one JSON object: task, givens (the curve: solve rate and cell accuracy per givens),
solve_rate and cell_accuracy over puzzles with 36 or more givens (halting on), mean_steps,
max_steps, halting_step_saving (1 - mean steps / max_steps), halting_accuracy_loss (solve-rate points
lost to halting, all held-out puzzles), latency_p50_ms_b1 (one puzzle a call) and
throughput_b16_per_s (batches of 16).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from models import sudoku
from models.trm import TRM
from training import sudoku_data
from training.defaults import resolve_model
from training.trm import TrainConfig, evaluate, test_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:tiny-trm")
    parser.add_argument("--per-givens", type=int, default=100)
    parser.add_argument("--givens", type=int, nargs="+", default=[24, 28, 32, 36, 40, 45])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    path = resolve_model(args.model)
    model = TRM.from_pretrained(path)
    report = json.loads((Path(path) / "training.json").read_text())
    train_cfg = TrainConfig.model_validate(report["config"])
    base = sudoku_data.generate(train_cfg.train_puzzles, train_cfg.train_givens, seed=train_cfg.seed)
    cfg = train_cfg.model_copy(update={"test_givens": args.givens, "test_per_givens": args.per_givens,
                                       "seed": args.seed})
    held = test_set(cfg, {sudoku_data.key(p) for p, _ in base}, offset=30_000)  # apart from test and validation

    max_steps = model.config.max_steps
    halting = evaluate(model, held)
    every = evaluate(model, held, halt_threshold=1.0)
    easy = [v for g, v in halting["curve"].items() if g >= 36]
    n_easy = sum(v["n"] for v in easy)

    mixed = random.Random(0).sample(held, len(held))  # timed puzzles drawn across every number of givens
    singles = [sudoku.encode([p]) for p, _ in mixed[:60]]
    for x in singles[:3]:
        model.refine(x)
    latencies = []
    for x in singles:
        start = time.perf_counter()
        model.refine(x)
        latencies.append(time.perf_counter() - start)
    batches = [sudoku.encode([p for p, _ in mixed[i:i + 16]]) for i in range(0, 16 * 10, 16)]
    start = time.perf_counter()
    for x in batches:
        model.refine(x)
    throughput = 16 * len(batches) / (time.perf_counter() - start)

    print(json.dumps({
        "task": "sudoku",
        "givens": {g: v for g, v in halting["curve"].items()},
        "solve_rate": round(sum(v["solve_rate"] * v["n"] for v in easy) / n_easy, 4),
        "cell_accuracy": round(sum(v["cell_accuracy"] * v["n"] for v in easy) / n_easy, 4),
        "mean_steps": halting["mean_steps"],
        "max_steps": max_steps,
        "halting_step_saving": round(1 - halting["mean_steps"] / max_steps, 4),
        "halting_accuracy_loss": round(100 * (every["solve_rate"] - halting["solve_rate"]), 2),
        "solve_rate_all_steps": every["solve_rate"], "solve_rate_halting": halting["solve_rate"],
        "latency_p50_ms_b1": round(statistics.median(latencies) * 1e3, 2),
        "throughput_b16_per_s": round(throughput, 1),
        "puzzles": len(held), "model": args.model, "parameters": model.num_parameters(),
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
