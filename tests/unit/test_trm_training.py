"""training/sudoku_data.py, training/code_repair_data.py and training/trm.py: puzzles are
unique-solution and as hard as asked, code pairs are broken and repairable, splits do not overlap,
augmentation keeps a puzzle and its solution, short training runs write a loadable model with its
evaluation, and the committed defaults' reported figures hold."""

from __future__ import annotations

import json
import random

import pytest
import torch

from models import code_grid, sudoku
from models.trm import TRM
from training import code_repair_data, corpus, sudoku_data, trm
from models.checkpoints import EMBEDDED_DIR


@pytest.mark.parametrize("givens", [24, 36, 45])
def test_puzzles_have_the_givens_asked_and_one_solution(givens):
    for puzzle, solution in sudoku_data.generate(5, [givens], seed=givens):
        cells = [v for row in puzzle for v in row]
        assert sum(v > 0 for v in cells) == givens
        assert sudoku_data.count_solutions(cells) == 1
        assert sudoku.is_solution(puzzle, solution)


def test_solution_counter():
    empty = [0] * 81
    assert sudoku_data.count_solutions(empty, limit=2) == 2
    grid = [v for row in sudoku_data.solution_grid(random.Random(0)) for v in row]
    assert sudoku_data.count_solutions(grid) == 1
    bad = list(grid)
    bad[1] = bad[0]  # two equal digits in a row
    assert sudoku_data.count_solutions(bad) == 0


def test_augmentation_keeps_puzzle_and_solution_together():
    rng = random.Random(1)
    for puzzle, solution in sudoku_data.generate(5, [30], seed=3):
        p, s = sudoku_data.augment(puzzle, solution, rng)
        assert sudoku.is_solution(p, s) and sum(v > 0 for r in p for v in r) == 30


def test_generation_is_seeded_and_excludes():
    a = sudoku_data.generate(4, [40], seed=5)
    assert a == sudoku_data.generate(4, [40], seed=5)
    b = sudoku_data.generate(4, [40], seed=5, exclude={sudoku_data.key(p) for p, _ in a})
    assert not {sudoku_data.key(p) for p, _ in a} & {sudoku_data.key(p) for p, _ in b}


def test_short_training_run_writes_a_loadable_model_and_its_evaluation(tmp_path):
    cfg = trm.TrainConfig(model={"hidden_size": 16, "num_layers": 1, "n_latent": 1, "t_outer": 1, "max_steps": 2},
                          train_puzzles=8, train_givens=[40], test_givens=[45], test_per_givens=4, steps=3,
                          batch=4, checkpoint_every=2, out=str(tmp_path))
    report = trm.train(cfg, "test")
    model = TRM.from_pretrained(tmp_path)
    assert model.config.hidden_size == 16 and not (tmp_path / "checkpoint.pt").exists()
    saved = json.loads((tmp_path / "training.json").read_text())
    assert saved["heldout"]["all_steps"]["curve"]["45"]["n"] == 4 == report["heldout"]["halting"]["curve"][45]["n"]
    assert 1 <= saved["heldout"]["halting"]["mean_steps"] <= 2
    assert saved["heldout"]["all_steps"]["mean_steps"] == 2  # threshold 1.0 never halts


def test_config_is_strict():
    with pytest.raises(ValueError):
        trm.TrainConfig.model_validate({"stepz": 3})


def test_committed_default_reproduces_its_reported_figures():
    """The 45-givens row of training.json's held-out evaluation, recomputed from the committed weights
    on the same puzzles (test_set's seed for that row; no training puzzle collides with them)."""
    report = json.loads((EMBEDDED_DIR / "tiny-trm" / "training.json").read_text())
    model = TRM.from_pretrained(EMBEDDED_DIR / "tiny-trm")
    assert report["parameters"] == model.num_parameters()
    assert report["command"].startswith("python -m training.trm")
    cfg = report["config"]
    row = cfg["test_givens"].index(45)
    held = sudoku_data.generate(cfg["test_per_givens"], [45], seed=10_000 + 1000 * cfg["seed"] + row)
    got = trm.evaluate(model, held, halt_threshold=1.0)["curve"][45]
    assert got == report["heldout"]["all_steps"]["curve"]["45"]
    assert json.loads((EMBEDDED_DIR / "tiny-trm" / "config.json").read_text())["halt_threshold"] == \
        report["calibration"]["chosen"]


# --- code_repair -------------------------------------------------------------------------------

def test_code_pairs_are_broken_functions_whose_answer_is_the_original():
    rng = random.Random(0)
    sources = [f for text in corpus.texts("train", limit=12) for f in code_repair_data.definitions(text)]
    pairs = [p for p in (code_repair_data.make_pair(f, rng) for f in sources[:100]) if p is not None]
    assert len(pairs) >= 20 and {p.corruption for p in pairs} <= set(corpus.CORRUPTIONS)
    for p in pairs:
        assert code_grid.is_valid(p.source) and not code_grid.is_valid(p.broken)
        grid = code_grid.encode(p.broken)
        assert torch.equal(grid.tokens, p.x) and not torch.equal(p.x, p.y)
        assert code_grid.decode(p.y, grid) == "\n".join(line.rstrip() for line in p.source.splitlines())


def test_definitions_include_methods_dedented():
    text = "class A:\n    @staticmethod\n    def f(x):\n        return x\n\ndef g():\n    pass\n"
    assert code_repair_data.definitions(text) == [
        "class A:\n    @staticmethod\n    def f(x):\n        return x", "def g():\n    pass",
        "@staticmethod\ndef f(x):\n    return x"]
    assert code_repair_data.definitions("def broken(:\n") == []


def test_code_test_and_validation_sets_are_held_out_and_disjoint():
    test, validation = code_repair_data.heldout("test", 50), code_repair_data.heldout("validation", 50)
    assert len(test) == len(validation) == 50
    assert [p.broken for p in test] == [p.broken for p in code_repair_data.heldout("test", 50)]  # seeded
    train = set(code_repair_data.functions("train"))
    assert not {p.source for p in test} & {p.source for p in validation}
    assert not {p.source for p in test + validation} & train


def test_short_code_repair_training_run(tmp_path):
    cfg = trm.TrainConfig(task="code_repair", model={"hidden_size": 16, "num_heads": 2, "num_layers": 1,
                                                      "n_latent": 1, "t_outer": 1, "max_steps": 2},
                          test_examples=6, steps=2, batch=2, out=str(tmp_path))
    report = trm.train(cfg, "test")
    model = TRM.from_pretrained(tmp_path)
    assert model.config.mixer == "axial" and model.config.grid_shape == (code_grid.ROWS, code_grid.COLS)
    assert model.config.vocab_size == code_grid.VOCAB_SIZE
    halting = report["heldout"]["halting"]
    assert sum(row["n"] for row in halting["curve"].values()) == 6
    assert set(halting) == {"curve", "solve_rate", "valid_rate", "mean_steps"}


def test_committed_code_repair_default_reproduces_its_reported_figures():
    """The swapped_tokens row of tiny-trm-code's held-out evaluation, recomputed from the committed weights."""
    report = json.loads((EMBEDDED_DIR / "tiny-trm-code" / "training.json").read_text())
    model = TRM.from_pretrained(EMBEDDED_DIR / "tiny-trm-code")
    assert report["parameters"] == model.num_parameters() and report["task"] == "code_repair"
    cfg = trm.TrainConfig.model_validate(report["config"])
    pairs = [p for p in code_repair_data.heldout("test", cfg.test_examples, cfg.seed) if p.corruption == "swapped_tokens"]
    got = trm.evaluate_code(model, pairs, halt_threshold=1.0)["curve"]["swapped_tokens"]
    assert got == report["heldout"]["all_steps"]["curve"]["swapped_tokens"]
