"""9x9 sudoku grids <-> TRM tokens, and solution checks. Grids are lists of 9 rows of 9 ints, 0 = blank.

Tokens follow TRMConfig's scheme: token = cell + 1, so 1 = blank and 2..10 = digits 1..9;
0 (pad) never occurs in an encoded grid and decodes, like any non-digit token, to blank.
"""

from __future__ import annotations

import torch

Grid = list[list[int]]

SIZE = 9
DIGITS = set(range(1, SIZE + 1))


def check_grid(grid: object) -> None:
    """Raise ValueError naming the first problem (rows and columns counted from 1)."""
    what = "grid must be 9 rows of 9 integers 0-9"
    if not isinstance(grid, list):
        raise ValueError(f"{what}; got {type(grid).__name__}")
    if len(grid) != SIZE:
        raise ValueError(f"{what}; got {len(grid)} rows")
    for r, row in enumerate(grid, 1):
        if not isinstance(row, list):
            raise ValueError(f"{what}; row {r} is {type(row).__name__}, not a list")
        if len(row) != SIZE:
            raise ValueError(f"{what}; row {r} has {len(row)} values")
        for c, v in enumerate(row, 1):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{what}; row {r}, column {c} is {v!r}, not an integer")
            if not 0 <= v <= 9:
                raise ValueError(f"{what}; row {r}, column {c} is {v}")


def encode(grids: list[Grid]) -> torch.Tensor:
    """(B, 81) LongTensor of tokens."""
    for g in grids:
        check_grid(g)
    return torch.tensor(grids, dtype=torch.long).view(len(grids), SIZE * SIZE) + 1


def decode(tokens: torch.Tensor) -> list[Grid]:
    """(B, 81) tokens -> B grids; tokens that are not digits (pad, blank) become 0."""
    digits = tokens.long().cpu() - 1
    digits = digits.where((digits >= 1) & (digits <= SIZE), 0)
    return digits.view(-1, SIZE, SIZE).tolist()


def is_solution(puzzle: Grid, solution: Grid) -> bool:
    """Whether `solution` is a complete valid grid keeping every given of `puzzle`."""
    check_grid(puzzle)
    try:
        check_grid(solution)
    except ValueError:
        return False
    cols = [[row[c] for row in solution] for c in range(SIZE)]
    boxes = [[solution[r][c] for r in range(br, br + 3) for c in range(bc, bc + 3)]
             for br in range(0, SIZE, 3) for bc in range(0, SIZE, 3)]
    if any(set(unit) != DIGITS for unit in (*solution, *cols, *boxes)):
        return False
    return all(p in (0, s) for prow, srow in zip(puzzle, solution) for p, s in zip(prow, srow))


def fill_givens(puzzle: Grid, solution: Grid) -> Grid:
    """A new grid: `solution` with every nonzero cell of `puzzle` forced in."""
    return [[p or s for p, s in zip(prow, srow)] for prow, srow in zip(puzzle, solution)]
