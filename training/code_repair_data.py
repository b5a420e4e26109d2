"""code_repair data for the TRM (seed 003): real Python functions on the 64x48 code grid, each with
one corruption (training/corpus.py: a missing colon, an unbalanced bracket, wrong indentation,
swapped tokens) that makes it fail to parse. The answer is the original function's grid.

Functions come from the standard library: top-level functions and classes and the methods of
classes (dedented), those that parse alone and fit the grid.
Train pairs come from the corpus's train files, test and validation pairs from its held-out files
(split by a hash of the path, training/corpus.py), with any function whose text also occurs in a
train file left out; test and validation are disjoint halves of the held-out functions.
"""

from __future__ import annotations

import ast
import functools
import random
import textwrap
from dataclasses import dataclass

import torch

from models import code_grid
from training import corpus


@dataclass(frozen=True)
class Pair:
    source: str  # the original function
    broken: str
    corruption: str
    grid: code_grid.Grid  # the broken source's grid, with what decoding an answer on it needs
    y: torch.Tensor  # the original, on the broken grid's tables

    @property
    def x(self) -> torch.Tensor:  # (ROWS * COLS,) the broken grid's tokens
        return self.grid.tokens


def definitions(text: str) -> list[str]:
    """A module's top-level functions and classes and its classes' methods, dedented, decorators
    included; [] when the module does not parse."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines()
    nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    nodes += [m for n in nodes if isinstance(n, ast.ClassDef) for m in n.body
              if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
    out = []
    for n in nodes:
        first = min([n.lineno, *(d.lineno for d in n.decorator_list)])
        if n.end_lineno - first < code_grid.ROWS:
            out.append(textwrap.dedent("\n".join(lines[first - 1:n.end_lineno])))
    return out


@functools.cache
def functions(split: str) -> tuple[str, ...]:
    """The split's definitions (`definitions`) that have 2 lines or more, parse alone and fit the grid."""
    out, seen = [], set()
    for text in corpus.texts(split):
        for block in definitions(text):
            if block in seen or len(block.splitlines()) < 2 or not code_grid.is_valid(block):
                continue
            try:
                code_grid.encode(block)
            except code_grid.DoesNotFit:
                continue
            seen.add(block)
            out.append(block)
    return tuple(out)


def make_pair(source: str, rng: random.Random, tries: int = 8) -> Pair | None:
    """`source` with one seeded corruption that breaks parsing and still fits; None if none found."""
    for _ in range(tries):
        broken = corpus.corrupt(source, rng.randrange(1 << 30))
        if broken is None or code_grid.is_valid(broken[0]):
            continue
        try:
            grid = code_grid.encode(broken[0])
            target = code_grid.encode(source, tables=grid)
        except code_grid.DoesNotFit:  # e.g. a bracket taken out of a string literal
            continue
        return Pair(source, broken[0], broken[1], grid, target.tokens)
    return None


def heldout(which: str, n: int, seed: int = 0) -> list[Pair]:
    """`n` pairs (at most) from the held-out functions: "test" or "validation", disjoint halves."""
    if which not in ("test", "validation"):
        raise ValueError(f"which must be 'test' or 'validation', got {which!r}")
    train = set(functions("train"))
    pool = [f for f in functions("heldout") if f not in train]
    random.Random(seed).shuffle(pool)
    pool = pool[0::2] if which == "test" else pool[1::2]
    rng = random.Random(f"{which}-{seed}")
    pairs = []
    for source in pool:
        if len(pairs) == n:
            break
        if (pair := make_pair(source, rng)) is not None:
            pairs.append(pair)
    return pairs


class Stream:
    """Fresh training pairs forever: a random train function, a random corruption each time."""

    def __init__(self, seed: int):
        self.sources, self.rng = functions("train"), random.Random(seed)

    def take(self, n: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        pairs: list[Pair] = []
        while len(pairs) < n:
            if (pair := make_pair(self.rng.choice(self.sources), self.rng)) is not None:
                pairs.append(pair)
        return torch.stack([p.x for p in pairs]).to(device), torch.stack([p.y for p in pairs]).to(device)
