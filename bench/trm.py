"""The embedded TRMs on held-out data: solve rate by number of givens (sudoku) or by corruption
(code_repair), adaptive halting's savings, latency and throughput.

Held-out puzzles come from training/sudoku_data.py with other seeds than training's, its test set's
and its calibration set's (and none of the training base puzzles, which are regenerated to check).
Latency and throughput are timed on puzzles drawn across all numbers of givens. Every puzzle is refined twice: with the
halting head (the config's threshold) and with every one of max_steps steps (threshold 1.0).

    python -m bench.trm [--per-givens 100] [--givens 24 28 32 36 40 45]
    python -m bench.trm --task code_repair     # the 500 test pairs of training.trm's report

Last line: one JSON object: task, givens (the curve: solve rate and cell accuracy per givens),
solve_rate and cell_accuracy over puzzles with 36 or more givens (halting on), mean_steps,
max_steps, halting_step_saving (1 - mean steps / max_steps), halting_accuracy_loss (solve-rate points
lost to halting, all held-out puzzles), latency_p50_ms_b1 (one puzzle a call) and
throughput_b16_per_s (batches of 16). For code_repair: corruptions (the curve: solve rate, valid
rate, accuracy on the changed cells) in place of givens, solve_rate (the original function exactly)
and valid_rate (the answer parses) over all pairs; latency and throughput on test pairs in their
order (functions of every size).
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
from models.checkpoints import resolve_model
from training.trm import CodeRepairTask, TrainConfig, evaluate, evaluate_code, test_set


def timed(model: TRM, singles: list[torch.Tensor], batches: list[torch.Tensor]) -> dict[str, float]:
    """Median latency of one input a call, and inputs a second in the given batches."""
    for x in singles[:3]:
        model.refine(x)
    latencies = []
    for x in singles:
        start = time.perf_counter()
        model.refine(x)
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    for x in batches:
        model.refine(x)
    throughput = sum(len(x) for x in batches) / (time.perf_counter() - start)
    return {"latency_p50_ms_b1": round(statistics.median(latencies) * 1e3, 2),
            "throughput_b16_per_s": round(throughput, 1)}


def halting_figures(halting: dict, every: dict, max_steps: int) -> dict[str, float]:
    return {"mean_steps": halting["mean_steps"], "max_steps": max_steps,
            "halting_step_saving": round(1 - halting["mean_steps"] / max_steps, 4),
            "halting_accuracy_loss": round(100 * (every["solve_rate"] - halting["solve_rate"]), 2),
            "solve_rate_all_steps": every["solve_rate"], "solve_rate_halting": halting["solve_rate"]}


def code_repair(model: TRM, path: Path, args: argparse.Namespace) -> dict:
    cfg = TrainConfig.model_validate(json.loads((path / "training.json").read_text())["config"])
    pairs = CodeRepairTask(cfg).test()  # the test set of the model's own report
    halting, every = evaluate_code(model, pairs), evaluate_code(model, pairs, halt_threshold=1.0)
    singles = [p.x[None] for p in pairs[:60]]
    batches = [torch.stack([p.x for p in pairs[i:i + 16]]) for i in range(0, 16 * 10, 16)]
    return {"task": "code_repair", "corruptions": halting["curve"], "solve_rate": halting["solve_rate"],
            "valid_rate": halting["valid_rate"], **halting_figures(halting, every, model.config.max_steps),
            **timed(model, singles, batches), "pairs": len(pairs), "model": args.model,
            "parameters": model.num_parameters(), "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["sudoku", "code_repair"], default="sudoku")
    parser.add_argument("--model", help="default: embedded:tiny-trm, or embedded:tiny-trm-code for code_repair")
    parser.add_argument("--per-givens", type=int, default=100)
    parser.add_argument("--givens", type=int, nargs="+", default=[24, 28, 32, 36, 40, 45])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.model = args.model or ("embedded:tiny-trm" if args.task == "sudoku" else "embedded:tiny-trm-code")

    path = Path(resolve_model(args.model))
    model = TRM.from_pretrained(path)
    if args.task == "code_repair":
        print(json.dumps(code_repair(model, path, args)))
        return
    report = json.loads((path / "training.json").read_text())
    train_cfg = TrainConfig.model_validate(report["config"])
    base = sudoku_data.generate(train_cfg.train_puzzles, train_cfg.train_givens, seed=train_cfg.seed)
    cfg = train_cfg.model_copy(update={"test_givens": args.givens, "test_per_givens": args.per_givens,
                                       "seed": args.seed})
    held = test_set(cfg, {sudoku_data.key(p) for p, _ in base}, offset=30_000)  # apart from test and validation

    halting = evaluate(model, held)
    every = evaluate(model, held, halt_threshold=1.0)
    easy = [v for g, v in halting["curve"].items() if g >= 36]
    n_easy = sum(v["n"] for v in easy)

    mixed = random.Random(0).sample(held, len(held))  # timed puzzles drawn across every number of givens
    singles = [sudoku.encode([p]) for p, _ in mixed[:60]]
    batches = [sudoku.encode([p for p, _ in mixed[i:i + 16]]) for i in range(0, 16 * 10, 16)]
    print(json.dumps({
        "task": "sudoku",
        "givens": {g: v for g, v in halting["curve"].items()},
        "solve_rate": round(sum(v["solve_rate"] * v["n"] for v in easy) / n_easy, 4),
        "cell_accuracy": round(sum(v["cell_accuracy"] * v["n"] for v in easy) / n_easy, 4),
        **halting_figures(halting, every, model.config.max_steps), **timed(model, singles, batches),
        "puzzles": len(held), "model": args.model, "parameters": model.num_parameters(),
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
