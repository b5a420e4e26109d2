"""TRM invariants on tiny seeded models, and the sudoku helpers. CPU only."""

from __future__ import annotations

import copy

import pytest
import torch

from models import sudoku
from models.trm import TRM, Carry, TRMConfig

SOLVED = [
    [5, 3, 4, 6, 7, 8, 9, 1, 2],
    [6, 7, 2, 1, 9, 5, 3, 4, 8],
    [1, 9, 8, 3, 4, 2, 5, 6, 7],
    [8, 5, 9, 7, 6, 1, 4, 2, 3],
    [4, 2, 6, 8, 5, 3, 7, 9, 1],
    [7, 1, 3, 9, 2, 4, 8, 5, 6],
    [9, 6, 1, 5, 3, 7, 2, 8, 4],
    [2, 8, 7, 4, 1, 9, 6, 3, 5],
    [3, 4, 5, 2, 8, 6, 1, 7, 9],
]
PUZZLE = [[v if (r + 2 * c) % 3 == 0 else 0 for c, v in enumerate(row)] for r, row in enumerate(SOLVED)]

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # these models are too small to gain from intra-op threads; on a busy 2-core box they lose
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(hidden_size=32, num_heads=2, n_latent=2, t_outer=2, max_steps=6)


def tiny(mixer: str = "mlp", seed: int = 0, **kw) -> TRM:
    torch.manual_seed(seed)
    return TRM(TRMConfig(mixer=mixer, **{**TINY, **kw})).eval()


def puzzles(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 11, (n, 81), generator=g)


def spread_q(model: TRM) -> TRM:
    """A random halting head, so that samples reach the threshold at different steps."""
    with torch.no_grad():
        model.q_head.weight.normal_(0, 3.0)
        model.q_head.bias.zero_()
    return model


@pytest.mark.parametrize("kw, match", [
    (dict(vocab_size=1), "vocab_size must be at least 2"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
    (dict(n_latent=2.5), "n_latent must be a positive integer"),
    (dict(mixer="conv"), "mixer must be 'attention', 'mlp' or 'axial'"),
    (dict(mixer="axial"), "grid_shape .* is required"),
    (dict(mixer="axial", grid_shape=(8, 9), seq_len=81), "does not hold seq_len 81"),
    (dict(grid_shape=(9, 9)), "for the axial mixer only"),
    (dict(mixer="attention", hidden_size=30, num_heads=4), "divisible by num_heads"),
    (dict(expansion=0), "expansion must be positive"),
    (dict(halt_threshold=0.0), r"halt_threshold must be in \(0, 1\]"),
    (dict(halt_threshold=1.5), r"halt_threshold must be in \(0, 1\]"),
])
def test_config_rejects(kw, match):
    with pytest.raises(ValueError, match=match):
        TRMConfig(**kw)


@pytest.mark.parametrize("mixer", ["mlp", "attention"])
def test_step_shapes_and_detached_carry(mixer):
    model = tiny(mixer).train()
    out = model(model.initial_carry(3), puzzles(3))
    assert out.logits.shape == (3, 81, 11) and out.q.shape == (3,)
    assert out.carry.y.shape == out.carry.z.shape == (3, 81, 32)
    assert not out.carry.y.requires_grad and not out.carry.z.requires_grad
    out.logits.sum().backward()
    assert model.net.layers[0].mlp.down.weight.grad is not None and model.embed.weight.grad is not None
    assert model.y_init.grad is None  # it enters only the first T-1 recursions, run without gradient


def test_step_is_t_latent_recursions():
    model, x = tiny(n_latent=3, t_outer=3), puzzles(2)
    carry = model.initial_carry(2)
    e, y, z = model.embed_input(x), carry.y, carry.z
    with torch.no_grad():
        for _ in range(3):
            for _ in range(3):
                z = model.net(e + y + z)
            y = model.net(y + z)
        out = model(carry, x)
        torch.testing.assert_close(out.carry.y, y)
        torch.testing.assert_close(out.carry.z, z)
        torch.testing.assert_close(out.logits, model.head(y))
        torch.testing.assert_close(out.q, model.q_head(y.mean(1)).squeeze(-1))


@pytest.mark.parametrize("mixer", ["mlp", "attention"])
def test_refine_shapes_and_untrained_runs_max_steps(mixer):
    out = tiny(mixer).refine(puzzles(4), max_steps=3)
    assert out.tokens.shape == (4, 81) and out.tokens.dtype == torch.long
    assert out.steps.tolist() == [3, 3, 3, 3]  # the initial halting bias is -5: never halts at 0.5
    assert out.confidence.shape == (4,) and bool((out.confidence < 0.5).all())


def test_refine_rejects_bad_arguments():
    model = tiny()
    with pytest.raises(ValueError, match=r"tokens must be \(batch, 81\)"):
        model.refine(puzzles(1)[:, :80])
    with pytest.raises(ValueError, match="max_steps must be a positive integer"):
        model.refine(puzzles(1), max_steps=0)
    with pytest.raises(ValueError, match="halt_threshold"):
        model.refine(puzzles(1), halt_threshold=0)


def test_a_threshold_below_float32_range_halts_at_the_first_step():
    """5e-324 is in (0, 1], so the API accepts it; in float32 it would be 0 and an error (the fuzzer
    found it as a 503 from the refine endpoint)."""
    model = tiny()
    assert model.refine(puzzles(2), max_steps=3, halt_threshold=5e-324).steps.tolist() == [1, 1]
    per_sample = torch.tensor([5e-324, 1.0], dtype=torch.float64)
    assert model.refine(puzzles(2), max_steps=3, halt_threshold=per_sample).steps.tolist() == [1, 3]


@pytest.mark.parametrize("mixer", ["mlp", "attention", "axial"])
def test_save_load_round_trip(tmp_path, mixer):
    model = spread_q(tiny(seed=3, **(GRID if mixer == "axial" else {"mixer": mixer})))
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = TRM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    x = puzzles(5) if mixer != "axial" else grids([(3, 5), (6, 2), (1, 8), (8, 8), (2, 2)])
    a, b = model.refine(x, halt_threshold=0.7), loaded.refine(x, halt_threshold=0.7)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.steps, b.steps)
    assert torch.equal(a.confidence, b.confidence)


def test_from_pretrained_rejects_unknown_config(tmp_path):
    tiny().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden": 32}')
    with pytest.raises(ValueError, match="not a TRMConfig"):
        TRM.from_pretrained(tmp_path)


@pytest.mark.parametrize("bias, steps", [(20.0, 1), (-20.0, 5)])
def test_halting_bias_all_or_none(bias, steps):
    model = tiny()
    with torch.no_grad():
        model.q_head.bias.fill_(bias)
    out = model.refine(puzzles(4), max_steps=5)
    assert out.steps.tolist() == [steps] * 4


def test_per_sample_halting_freezes_answers():
    model, x, max_steps = spread_q(tiny(seed=1)), puzzles(8, seed=1), 6
    # the reference: every sample run for all steps, its tokens and halting probability per step
    carry, tokens, probs = model.initial_carry(8), [], []
    with torch.inference_mode():
        for _ in range(max_steps):
            out = model(carry, x)
            carry = out.carry
            tokens.append(out.logits.argmax(-1))
            probs.append(torch.sigmoid(out.q))
    tokens, probs = torch.stack(tokens, 1), torch.stack(probs, 1)  # (B, S, L), (B, S)
    peaks = probs.max(1).values.sort().values
    threshold = float(peaks[3] + peaks[4]) / 2  # half the samples halt at some step, half never; no ties
    reached = probs >= threshold
    stop = torch.where(reached.any(1), reached.float().argmax(1), max_steps - 1)  # 0-based stop step

    rows = []
    hook = model.register_forward_hook(lambda m, args, out: rows.append(args[1].shape[0]))
    out = model.refine(x, max_steps=max_steps, halt_threshold=threshold)
    hook.remove()
    assert len(set(out.steps.tolist())) > 1, out.steps
    assert rows == [int((out.steps >= s).sum()) for s in range(1, max_steps + 1)]  # halted rows are not computed
    assert out.steps.tolist() == (stop + 1).tolist()
    assert torch.equal(out.tokens, tokens[torch.arange(8), stop])
    torch.testing.assert_close(out.confidence, probs[torch.arange(8), stop])

    for i in range(8):  # a sample refined inside the batch is refined as alone
        alone = model.refine(x[i:i + 1], max_steps=max_steps, halt_threshold=threshold)
        assert torch.equal(alone.tokens[0], out.tokens[i]) and alone.steps[0] == out.steps[i]


def test_max_steps_respected():
    model = tiny(max_steps=4)
    assert model.refine(puzzles(2)).steps.tolist() == [4, 4]  # the config's default
    assert model.refine(puzzles(2), max_steps=2).steps.tolist() == [2, 2]
    calls = []
    probe = copy.deepcopy(model)
    probe.register_forward_hook(lambda m, args, out: calls.append(args[1].shape[0]))
    probe.refine(puzzles(2), max_steps=7)
    assert calls == [2] * 7


def test_initial_carry_is_learned():
    model = tiny()
    carry = model.initial_carry(2)
    assert isinstance(carry, Carry) and carry.y.shape == (2, 81, 32)
    assert model.y_init.requires_grad and model.z_init.requires_grad


def test_encode_decode_round_trip():
    tokens = sudoku.encode([PUZZLE, SOLVED])
    assert tokens.shape == (2, 81) and tokens.dtype == torch.long
    assert tokens[0, 1].item() == 1 and tokens[1, 0].item() == 6  # blank -> 1, digit 5 -> 6
    assert sudoku.decode(tokens) == [PUZZLE, SOLVED]
    assert sudoku.decode(torch.zeros(1, 81, dtype=torch.long)) == [[[0] * 9 for _ in range(9)]]  # pad -> blank


def test_decoded_model_output_is_a_grid():
    model = tiny()
    grid = sudoku.decode(model.refine(sudoku.encode([PUZZLE]), max_steps=1).tokens)[0]
    sudoku.check_grid(grid)


def test_is_solution():
    assert sudoku.is_solution(PUZZLE, SOLVED)
    assert sudoku.is_solution([[0] * 9 for _ in range(9)], SOLVED)
    swapped = [row[:] for row in SOLVED]
    swapped[0][0], swapped[0][1] = swapped[0][1], swapped[0][0]  # row still 1-9, columns not
    assert not sudoku.is_solution([[0] * 9 for _ in range(9)], swapped)
    assert not sudoku.is_solution(PUZZLE, PUZZLE)  # incomplete
    assert not sudoku.is_solution(PUZZLE, [row[:8] for row in SOLVED])  # malformed
    relabelled = [[v % 9 + 1 for v in row] for row in SOLVED]  # valid sudoku, givens not kept
    assert sudoku.is_solution([[0] * 9 for _ in range(9)], relabelled)
    assert not sudoku.is_solution(PUZZLE, relabelled)
    box_broken = [row[1:] + row[:1] for row in SOLVED]  # rows and columns still 1-9, boxes not
    assert not sudoku.is_solution([[0] * 9 for _ in range(9)], box_broken)


@pytest.mark.parametrize("grid, message", [
    ("x", "grid must be 9 rows of 9 integers 0-9; got str"),
    (SOLVED[:8], "; got 8 rows"),
    ([*SOLVED[:2], SOLVED[2][:8], *SOLVED[3:]], "; row 3 has 8 values"),
    ([*SOLVED[:4], (1,) * 9, *SOLVED[5:]], "; row 5 is tuple, not a list"),
    ([[*SOLVED[0][:4], 10, *SOLVED[0][5:]], *SOLVED[1:]], "; row 1, column 5 is 10"),
    ([[*SOLVED[0][:4], -1, *SOLVED[0][5:]], *SOLVED[1:]], "; row 1, column 5 is -1"),
    ([*SOLVED[:8], [*SOLVED[8][:8], 2.0]], "; row 9, column 9 is 2.0, not an integer"),
    ([*SOLVED[:8], [*SOLVED[8][:8], True]], "; row 9, column 9 is True, not an integer"),
])
def test_check_grid_messages(grid, message):
    with pytest.raises(ValueError) as err:
        sudoku.check_grid(grid)
    assert message in str(err.value)


def test_check_grid_accepts_valid():
    sudoku.check_grid(PUZZLE)
    sudoku.check_grid(SOLVED)


def test_fill_givens():
    wrong = [[1] * 9 for _ in range(9)]
    filled = sudoku.fill_givens(PUZZLE, wrong)
    assert all(filled[r][c] == (PUZZLE[r][c] or 1) for r in range(9) for c in range(9))
    assert wrong == [[1] * 9 for _ in range(9)]  # inputs are not mutated
    assert sudoku.fill_givens(PUZZLE, SOLVED) == SOLVED


def test_per_sample_limits_in_one_batch_equal_each_sample_alone():
    """A batch of requests with their own max_steps and halt_threshold: each row is what it would be
    alone, and a halted row stops changing while the others go on."""
    model = tiny()
    with torch.no_grad():
        model.q_head.bias.fill_(0.0)  # sigmoid(q) near 0.5: the thresholds below decide
    x = puzzles(3)
    limits, thresholds = torch.tensor([1, 4, 2]), torch.tensor([1.0, 1.0, 1e-6])
    together = model.refine(x, limits, thresholds)
    alone = [model.refine(x[i:i + 1], int(limits[i]), float(thresholds[i])) for i in range(3)]
    assert together.steps.tolist() == [1, 4, 1]  # max_steps 1; all 4; halts at the first step
    for i, out in enumerate(alone):
        assert torch.equal(together.tokens[i], out.tokens[0]) and int(out.steps[0]) == together.steps.tolist()[i]
    with pytest.raises(ValueError, match="shape"):
        model.refine(x, torch.tensor([1, 2]))


def test_threshold_one_never_halts_even_when_sigmoid_rounds_to_one():
    model = tiny()
    with torch.no_grad():
        model.q_head.bias.fill_(40.0)  # sigmoid(40.) is exactly 1.0 in float32
    assert model.refine(puzzles(2), max_steps=3, halt_threshold=1.0).steps.tolist() == [3, 3]
    assert model.refine(puzzles(2), max_steps=3, halt_threshold=0.999).steps.tolist() == [1, 1]


# --- the axial mixer on a grid with padding (the code grid's scheme: token 0 is pad) -------------

GRID = dict(mixer="axial", grid_shape=(8, 10), seq_len=80, vocab_size=12)


def grids(extents: list[tuple[int, int]], seed: int = 0) -> torch.Tensor:
    """One grid per (rows, columns) extent: random non-pad tokens there, pad elsewhere."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(extents), 8, 10, dtype=torch.long)
    for i, (r, c) in enumerate(extents):
        out[i, :r, :c] = torch.randint(1, 12, (r, c), generator=g)
    return out.view(len(extents), 80)


def test_axial_answers_do_not_depend_on_the_batch():
    model = spread_q(tiny(**GRID))
    x = grids([(2, 3), (8, 9), (5, 1)])
    together = model.refine(x, halt_threshold=0.6)
    for i in range(3):
        alone = model.refine(x[i:i + 1], halt_threshold=0.6)
        assert torch.equal(alone.tokens[0], together.tokens[i]) and alone.steps[0] == together.steps[i]
        torch.testing.assert_close(alone.confidence[0], together.confidence[i])


def test_axial_computes_a_sample_only_up_to_its_extent():
    model = tiny(**GRID).train()
    x = grids([(2, 3), (4, 5)])
    carry = model.initial_carry(2)
    out = model(carry, x)
    answer = out.logits.argmax(-1).view(2, 8, 10)
    # the first sample: rows past its 2nd and columns past its 4th (one spare) answer pad
    assert not answer[0, 2:].any() and not answer[0, :, 4:].any() and not answer[1, 4:].any()
    answered = model.answered(x).view(2, 8, 10)
    assert answered[0, :2, :4].all() and answered.sum(dim=(1, 2)).tolist() == [2 * 4, 4 * 6]
    assert tiny().answered(puzzles(2)).all()
    # cells no sample reaches keep their carry
    torch.testing.assert_close(out.carry.y.view(2, 8, 10, -1)[:, 4:], carry.y.view(2, 8, 10, -1)[:, 4:])
    out.logits.sum().backward()
    assert model.col_pos.grad[:6].abs().sum() > 0 and not model.col_pos.grad[6:].any()


def test_axial_pad_cells_are_not_attended_to():
    model = tiny(**GRID)
    x = grids([(3, 4)])
    carry = model.initial_carry(1)
    y = carry.y.clone().view(8, 10, -1)
    y[1, 4] += 3.0  # a pad cell inside the computed part (the spare column)
    a = model(carry, x).logits.view(8, 10, -1)
    b = model(Carry(y.view(1, 80, -1), carry.z), x).logits.view(8, 10, -1)
    torch.testing.assert_close(a[:3, :4], b[:3, :4])  # no token cell saw it
    assert not torch.allclose(a[1, 4], b[1, 4])


@pytest.mark.parametrize("extra", [{}, GRID])
def test_copy_input_starts_the_answer_from_the_input(extra):
    x = grids([(3, 4), (8, 10)]) if extra else puzzles(2)
    copying, plain = tiny(**{**extra, "copy_input": True}), tiny(**extra)
    with torch.no_grad():
        copying.head.weight.zero_()
        plain.head.weight.zero_()
    assert torch.equal(copying.refine(x, max_steps=1).tokens, x)
    assert not plain.refine(x, max_steps=1).tokens.any()  # all logits equal: token 0
