"""Seeded 9x9 sudoku puzzles with a unique solution, at a chosen number of givens.

A solution grid is a random backtracking fill (seeded). Cells are then emptied in a random order, each only if the puzzle keeps exactly one solution
(`count_solutions`, a bitmask backtracking search that stops at two), until `givens` remain; a
puzzle that cannot get that low restarts from a new grid. Sudoku's symmetries (digit relabelling, rows
within a band, bands, columns within a stack, stacks, transposition) augment training puzzles on the
fly (`augment`): a puzzle and its solution transformed alike stay a puzzle and its unique solution.

Splits do not overlap: train and test draw from different seeds, and `generate` skips any puzzle
already in `exclude`.

    python -m training.sudoku_data --givens 36 --n 5   # print a few
"""

from __future__ import annotations

import argparse
import random

Grid = list[list[int]]
ALL = 0x3FE  # bits 1..9
UNITS = [[(r, c) for c in range(9)] for r in range(9)] + [[(r, c) for r in range(9)] for c in range(9)] + [
    [(br + r, bc + c) for r in range(3) for c in range(3)] for br in (0, 3, 6) for bc in (0, 3, 6)]
PEERS = [[sorted({p for u in UNITS if (r, c) in u for p in u} - {(r, c)}) for c in range(9)] for r in range(9)]
PEER_INDEX = [[9 * pr + pc for pr, pc in PEERS[i // 9][i % 9]] for i in range(81)]


def count_solutions(cells: list[int], limit: int = 2) -> int:
    """Solutions of the puzzle (81 ints, 0 = blank), counted up to `limit`."""
    cells = list(cells)
    used = [0] * 81  # digits seen among each cell's peers
    for i, v in enumerate(cells):
        if v:
            for p in PEER_INDEX[i]:
                used[p] |= 1 << v
            if used[i] & (1 << v):
                return 0
    found = 0

    def search() -> None:
        nonlocal found
        best, best_options, best_count = -1, 0, 10
        for i in range(81):
            if not cells[i]:
                options = ALL & ~used[i]
                n = bin(options).count("1")
                if n < best_count:
                    best, best_options, best_count = i, options, n
                    if n <= 1:
                        break
        if best < 0:
            found += 1
            return
        saved = [used[p] for p in PEER_INDEX[best]]
        for v in range(1, 10):
            if best_options & (1 << v):
                cells[best] = v
                for p in PEER_INDEX[best]:
                    used[p] |= 1 << v
                search()
                for p, s in zip(PEER_INDEX[best], saved):
                    used[p] = s
                cells[best] = 0
                if found >= limit:
                    return

    search()
    return found


def _symmetry(rng: random.Random) -> tuple[list[int], list[int], list[int], bool]:
    """A random symmetry: digit map, row order, column order, transpose."""
    def order() -> list[int]:
        bands = rng.sample(range(3), 3)
        return [3 * b + r for b in bands for r in rng.sample(range(3), 3)]

    return [0, *rng.sample(range(1, 10), 9)], order(), order(), rng.random() < 0.5


def _apply(grid: Grid, sym: tuple[list[int], list[int], list[int], bool]) -> Grid:
    digits, rows, cols, transpose = sym
    out = [[digits[grid[r][c]] for c in cols] for r in rows]
    return [list(x) for x in zip(*out)] if transpose else out


def solution_grid(rng: random.Random) -> Grid:
    """A random complete grid: backtracking fill, cells in order, digits in a random order each time
    (a shuffled fixed pattern would make every grid a relabelling of one)."""
    cells, used = [0] * 81, [0] * 81

    def fill(i: int) -> bool:
        if i == 81:
            return True
        for v in rng.sample(range(1, 10), 9):
            if not used[i] & (1 << v):
                saved = [used[p] for p in PEER_INDEX[i]]
                cells[i] = v
                for p in PEER_INDEX[i]:
                    used[p] |= 1 << v
                if fill(i + 1):
                    return True
                for p, u in zip(PEER_INDEX[i], saved):
                    used[p] = u
        cells[i] = 0
        return False

    fill(0)
    return [cells[r * 9:r * 9 + 9] for r in range(9)]


def make_puzzle(rng: random.Random, givens: int, tries: int = 20) -> tuple[Grid, Grid]:
    """(puzzle, solution) with exactly `givens` givens and a unique solution."""
    for _ in range(tries):
        solution = solution_grid(rng)
        cells = [v for row in solution for v in row]
        order = rng.sample(range(81), 81)
        blanks = 0
        for i in order:
            if 81 - blanks == givens:
                break
            kept, cells[i] = cells[i], 0
            if count_solutions(cells) == 1:
                blanks += 1
            else:
                cells[i] = kept
        if 81 - blanks == givens:
            return [cells[r * 9:r * 9 + 9] for r in range(9)], solution
    raise RuntimeError(f"no unique puzzle with {givens} givens in {tries} tries")


def augment(puzzle: Grid, solution: Grid, rng: random.Random) -> tuple[Grid, Grid]:
    sym = _symmetry(rng)
    return _apply(puzzle, sym), _apply(solution, sym)


def key(puzzle: Grid) -> tuple[int, ...]:
    return tuple(v for row in puzzle for v in row)


def generate(n: int, givens: list[int], seed: int, exclude: set[tuple[int, ...]] = frozenset()
             ) -> list[tuple[Grid, Grid]]:
    """`n` puzzles, givens drawn uniformly from `givens`, none of them in `exclude`."""
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        puzzle, solution = make_puzzle(rng, rng.choice(givens))
        if key(puzzle) not in seen:
            seen.add(key(puzzle))
            out.append((puzzle, solution))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--givens", type=int, default=36)
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for p, s in generate(args.n, [args.givens], args.seed):
        print("\n".join(" ".join(str(v) for v in row) for row in p), "\n")
