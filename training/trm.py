"""Train the Tiny Recursive Model (sudoku or code_repair) with deep supervision and a learned halting head.

Each training step is one supervision step (the paper's scheme): the batch's samples carry their
(y, z) from the step before; the step's loss is cross-entropy of the answer on every cell plus
binary cross-entropy of the halting logit q against "the current answer is entirely right"; a
sample whose q says halt, or that has had `max_steps` steps, is replaced by a fresh puzzle. Sudoku
base puzzles (training/sudoku_data.py) are augmented on the fly by sudoku's symmetries; code_repair
pairs (training/code_repair_data.py) are a fresh corruption of a random function each time; their
loss counts only the part of the grid the model computes (TRM.answered), plus `changed_weight` times
the loss on the cells the corruption changed. An EMA of the weights is what gets evaluated and saved.

    python -m training.trm --task sudoku --config training/configs/trm_sudoku_cpu.yaml
    python -m training.trm --task code_repair --config training/configs/trm_code_repair_cpu.yaml
    python -m training.trm --calibrate models/embedded/tiny-trm   # only the halting threshold again

Writes the EMA model (TRM.save_pretrained: config.json, model.safetensors), weight snapshots (model,
EMA, optimizer; no resume) every `checkpoint_every` steps, and training.json with the held-out evaluation.
Then calibrates the halting threshold on validation puzzles (`calibrate`). A task's solve rate is
the share of answers entirely right: a sudoku solution, or the original function's exact grid.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from models import code_grid, sudoku
from models.trm import TRM, Carry, TRMConfig
from training import code_repair_data, sudoku_data
from training.metrics import TrainingMetrics
from training.metrics import add_argument as add_metrics_argument

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: Literal["sudoku", "code_repair"] = "sudoku"
    model: dict[str, Any] = Field(default_factory=dict, description="TRMConfig fields.")
    train_puzzles: int = Field(2000, gt=0, description="Base puzzles, augmented on the fly.")
    train_givens: list[int] = Field(default_factory=lambda: list(range(30, 46)), min_length=1)
    test_givens: list[int] = Field(default_factory=lambda: [24, 28, 32, 36, 40, 45], min_length=1)
    test_per_givens: int = Field(100, gt=0)
    test_examples: int = Field(500, gt=0, description="code_repair: held-out pairs for test, and for validation.")
    changed_weight: float = Field(0.0, ge=0, description="Extra loss on the cells whose answer differs from the "
                                  "input, averaged over them: the repair itself, in code_repair.")
    steps: int = Field(3000, gt=0, description="Optimizer steps, one supervision step each.")
    batch: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup: int = Field(100, ge=0)
    ema: float = Field(0.999, ge=0, lt=1)
    checkpoint_every: int = Field(500, gt=0)
    out: str = "models/embedded/tiny-trm"
    seed: int = 0
    device: str = Field("cpu", description="torch device: cpu, cuda.")


class Stream:
    """Fresh augmented training samples, forever."""

    def __init__(self, base: list[tuple[sudoku.Grid, sudoku.Grid]], seed: int):
        self.base, self.rng = base, random.Random(seed)

    def take(self, n: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [sudoku_data.augment(*self.rng.choice(self.base), self.rng) for _ in range(n)]
        return sudoku.encode([p for p, _ in pairs]).to(device), sudoku.encode([s for _, s in pairs]).to(device)


def test_set(cfg: TrainConfig, exclude: set, offset: int = 10_000) -> list[tuple[sudoku.Grid, sudoku.Grid]]:
    """`test_per_givens` puzzles at each of `test_givens`, from another seed, none in `exclude`
    (the validation set for calibration uses another offset)."""
    out = []
    for i, g in enumerate(cfg.test_givens):
        out += sudoku_data.generate(cfg.test_per_givens, [g], seed=offset + 1000 * cfg.seed + i, exclude=exclude)
    return out


class SudokuTask:
    """Generated puzzles: base puzzles augmented on the fly; test and validation puzzles apart from them."""

    model_defaults: dict[str, Any] = {}  # TRMConfig's defaults are sudoku's

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.base = sudoku_data.generate(cfg.train_puzzles, cfg.train_givens, seed=cfg.seed)
        self.keys = {sudoku_data.key(p) for p, _ in self.base}

    def stream(self) -> Stream:
        return Stream(self.base, self.cfg.seed)

    def test(self) -> list:
        return test_set(self.cfg, self.keys)

    def validation(self) -> list:
        return test_set(self.cfg, self.keys | {sudoku_data.key(p) for p, _ in self.test()}, offset=20_000)

    def evaluate(self, model: TRM, examples: list, **limits: Any) -> dict[str, Any]:
        return evaluate(model, examples, **limits)


class CodeRepairTask:
    """Corrupted functions of the stdlib corpus on the code grid (training/code_repair_data.py)."""

    model_defaults = {"vocab_size": code_grid.VOCAB_SIZE, "seq_len": code_grid.ROWS * code_grid.COLS,
                      "mixer": "axial", "grid_shape": (code_grid.ROWS, code_grid.COLS)}

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def stream(self) -> code_repair_data.Stream:
        return code_repair_data.Stream(self.cfg.seed)

    def test(self) -> list[code_repair_data.Pair]:
        return code_repair_data.heldout("test", self.cfg.test_examples, self.cfg.seed)

    def validation(self) -> list[code_repair_data.Pair]:
        return code_repair_data.heldout("validation", self.cfg.test_examples, self.cfg.seed)

    def evaluate(self, model: TRM, examples: list, **limits: Any) -> dict[str, Any]:
        return evaluate_code(model, examples, **limits)


TASKS = {"sudoku": SudokuTask, "code_repair": CodeRepairTask}
THRESHOLDS = (0.5, 0.9, 0.99, 0.999)


def calibrate(out_dir: Path, max_loss: float = 0.005, command: str = "") -> dict[str, Any]:
    """Picks the halting threshold: the lowest of THRESHOLDS whose solve rate on validation puzzles
    (neither train nor test) is within `max_loss` of running every step; writes it into the model's
    config.json and the held-out figures (every step, and halting at it) into training.json."""
    report = json.loads((out_dir / "training.json").read_text())
    cfg = TrainConfig.model_validate(report["config"])
    model = TRM.from_pretrained(out_dir)
    task = TASKS[cfg.task](cfg)
    held, validation = task.test(), task.validation()
    full = task.evaluate(model, validation, halt_threshold=1.0)["solve_rate"]
    tried, threshold = {}, 1.0  # 1.0: never halt, when no threshold keeps the solve rate
    for t in THRESHOLDS:
        tried[t] = task.evaluate(model, validation, halt_threshold=t)
        if full - tried[t]["solve_rate"] <= max_loss:
            threshold = t
            break
    config = json.loads((out_dir / "config.json").read_text()) | {"halt_threshold": threshold}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    report["calibration"] = {"validation_solve_rate_all_steps": full, "max_loss": max_loss, "chosen": threshold,
                             "curve_at_chosen": (tried[threshold]["curve"] if threshold in tried else None),
                             "tried": {str(t): {"solve_rate": r["solve_rate"], "mean_steps": r["mean_steps"]}
                                       for t, r in tried.items()}, "command": command}
    report["heldout"] = {"all_steps": task.evaluate(model, held, halt_threshold=1.0),
                         "halting": task.evaluate(TRM.from_pretrained(out_dir), held)}
    (out_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("halting threshold %s: %s", threshold, json.dumps(report["calibration"]))
    return report


@torch.no_grad()
def evaluate(model: TRM, pairs: list[tuple[sudoku.Grid, sudoku.Grid]], max_steps: int | None = None,
             halt_threshold: float | None = None, batch: int = 256) -> dict[str, Any]:
    """Solve rate and cell accuracy (blank cells) by number of givens, and mean steps used."""
    by: dict[int, list[float]] = {}
    steps = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        device = next(model.parameters()).device
        out = model.refine(sudoku.encode([p for p, _ in chunk]).to(device), max_steps, halt_threshold)
        for (puzzle, solution), grid, s in zip(chunk, sudoku.decode(out.tokens), out.steps.tolist()):
            grid = sudoku.fill_givens(puzzle, grid)
            blanks = [(r, c) for r in range(9) for c in range(9) if not puzzle[r][c]]
            cells = sum(grid[r][c] == solution[r][c] for r, c in blanks) / len(blanks)
            givens = 81 - len(blanks)
            by.setdefault(givens, [0, 0, 0.0])
            by[givens][0] += 1
            by[givens][1] += sudoku.is_solution(puzzle, grid)
            by[givens][2] += cells
            steps.append(s)
    curve = {g: {"n": n, "solve_rate": round(solved / n, 4), "cell_accuracy": round(cells / n, 4)}
             for g, (n, solved, cells) in sorted(by.items())}
    total = sum(v[0] for v in by.values())
    return {"curve": curve, "solve_rate": round(sum(v[1] for v in by.values()) / total, 4),
            "mean_steps": round(sum(steps) / len(steps), 3)}


@torch.no_grad()
def evaluate_code(model: TRM, pairs: list[code_repair_data.Pair], max_steps: int | None = None,
                  halt_threshold: float | None = None, batch: int = 32) -> dict[str, Any]:
    """Per corruption kind: solve rate (the original function exactly), valid rate (the answer
    parses), and the accuracy on the cells the corruption changed; mean steps used."""
    by: dict[str, list[float]] = {}
    steps = []
    device = next(model.parameters()).device
    pairs = sorted(pairs, key=lambda p: int((p.x.view(code_grid.ROWS, -1) != 0).any(1).sum()))  # similar sizes together:
    # a batch computes up to its largest grid, and a sample's answer does not depend on its batch
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        out = model.refine(torch.stack([p.x for p in chunk]).to(device), max_steps, halt_threshold)
        for p, answer, s in zip(chunk, out.tokens.cpu(), out.steps.tolist()):
            changed = p.x != p.y
            row = by.setdefault(p.corruption, [0, 0, 0, 0.0])
            row[0] += 1
            row[1] += bool((answer == p.y).all())
            row[2] += code_grid.is_valid(code_grid.decode(answer, p.grid))
            row[3] += float((answer[changed] == p.y[changed]).float().mean())
            steps.append(s)
    curve = {k: {"n": n, "solve_rate": round(solved / n, 4), "valid_rate": round(valid / n, 4),
                 "changed_cell_accuracy": round(cells / n, 4)} for k, (n, solved, valid, cells) in sorted(by.items())}
    total = sum(v[0] for v in by.values())
    return {"curve": curve, "solve_rate": round(sum(v[1] for v in by.values()) / total, 4),
            "valid_rate": round(sum(v[2] for v in by.values()) / total, 4),
            "mean_steps": round(sum(steps) / len(steps), 3)}


def train(cfg: TrainConfig, command: str, metrics: TrainingMetrics | None = None) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    metrics = metrics or TrainingMetrics(f"trm:{cfg.task}", cfg.steps)
    start = time.perf_counter()
    task = TASKS[cfg.task](cfg)
    stream, held = task.stream(), task.test()
    logger.info("%s: %d held-out examples (%.1f s)", cfg.task, len(held), time.perf_counter() - start)

    model = TRM(TRMConfig(**(task.model_defaults | cfg.model))).to(cfg.device)
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    x, y = stream.take(cfg.batch, cfg.device)  # checkpoints below are weight snapshots (model, EMA, optimizer)
    carry, age = model.initial_carry(cfg.batch), torch.zeros(cfg.batch, dtype=torch.long, device=cfg.device)
    out_dir = REPO / cfg.out if not Path(cfg.out).is_absolute() else Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    recent: list[tuple[float, float, float]] = []
    bar = tqdm(range(cfg.steps), desc=f"trm {cfg.task}", file=sys.stderr)
    train_start = time.perf_counter()
    for step in bar:
        began = time.perf_counter()
        model.train()
        out = model(carry, x)
        correct = (out.logits.argmax(-1) == y).all(dim=1)
        content = model.answered(x)  # every cell of a sudoku; of the code grid, the part computed
        loss_y = F.cross_entropy(out.logits[content], y[content])
        changed = x != y
        if cfg.changed_weight and changed.any():
            loss_y = loss_y + cfg.changed_weight * F.cross_entropy(out.logits[changed], y[changed])
        loss_q = F.binary_cross_entropy_with_logits(out.q, correct.float())
        opt.zero_grad(set_to_none=True)
        (loss_y + 0.5 * loss_q).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # the decay ramps up, so the EMA does not remember the random start
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        # samples that halt (or ran out of steps) make room for fresh puzzles
        age += 1
        done = (out.q.detach() > 0) | (age >= model.config.max_steps)
        carry = out.carry
        if done.any():
            n = int(done.sum())
            x[done], y[done] = stream.take(n, cfg.device)
            fresh = model.initial_carry(n)
            carry = Carry(carry.y.clone(), carry.z.clone())
            carry.y[done], carry.z[done] = fresh.y, fresh.z
            age[done] = 0
        recent = (recent + [(loss_y.item(), loss_q.item(), correct.float().mean().item())])[-50:]
        metrics.step(recent[-1][0], time.perf_counter() - began, cfg.batch)
        bar.set_postfix(loss=f"{sum(r[0] for r in recent) / len(recent):.3f}",
                        exact=f"{sum(r[2] for r in recent) / len(recent):.2f}")
        if (step + 1) % cfg.checkpoint_every == 0:
            torch.save({"step": step + 1, "model": model.state_dict(), "ema": ema.state_dict(),
                        "opt": opt.state_dict()}, out_dir / "checkpoint.pt")
    seconds = time.perf_counter() - train_start

    ema.save_pretrained(out_dir)
    (out_dir / "checkpoint.pt").unlink(missing_ok=True)  # the run finished: the EMA model is the artefact
    full = task.evaluate(ema, held, halt_threshold=1.0)  # every step, no halting
    halted = task.evaluate(ema, held)
    metrics.heldout(**{f"{name}_{k}": v for name, r in (("all_steps", full), ("halting", halted))
                       for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    report = {
        "task": cfg.task, "config": cfg.model_dump(), "model": asdict(ema.config), "parameters": ema.num_parameters(),
        "train_seconds": round(seconds, 1), "steps": cfg.steps,
        "final_train_loss": round(sum(r[0] for r in recent) / len(recent), 4),  # mean of the last 50 steps
        "heldout": {"all_steps": full, "halting": halted}, "torch": torch.__version__, "command": command,
    }
    (out_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("%s", json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="sudoku")
    parser.add_argument("--config", type=Path, help="train with this config")
    parser.add_argument("--calibrate", type=Path, metavar="DIR",
                        help="pick the halting threshold of the model trained into DIR (after training)")
    parser.add_argument("--steps", type=int, help="override the config's steps")
    parser.add_argument("--out", help="override the config's out")
    add_metrics_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = "python -m training.trm " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.calibrate is not None:
        return calibrate(args.calibrate, command=command)
    if args.config is None:
        parser.error("--config or --calibrate is required")
    cfg = TrainConfig.model_validate({**yaml.safe_load(args.config.read_text()), "task": args.task})
    cfg = cfg.model_copy(update={k: v for k, v in (("steps", args.steps), ("out", args.out)) if v is not None})
    with TrainingMetrics(f"trm:{cfg.task}", cfg.steps, args.metrics_port) as metrics:
        train(cfg, command, metrics)
    return calibrate(Path(cfg.out) if Path(cfg.out).is_absolute() else REPO / cfg.out, command=command)


if __name__ == "__main__":
    main()
