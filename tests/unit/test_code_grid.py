"""models/code_grid.py: Python source <-> the 64x48 code grid, lossless, and what does not fit."""

from __future__ import annotations

import pytest
import torch

from models import code_grid as cg
from training import code_repair_data, corpus

TRICKY = '''\
@decorator(x=1)
def f(a, b=(1, 2),
      *args, **kw) -> "str":   # a comment: with a colon
    """A docstring
        that spans   lines, with 'quotes' and a \\""" escaped triple
    """
    s = f"{a!r}" + 'it''s' + r'\\d+' + b'\\x00'
    if a and not b or a is None:
        return [i ** 2 for i in range(10) if i % 2 == 0]
    x = {'k': 1.5e-3, 0x1F: 1_000j}; y = x @ a
    return lambda q: q >> 2 ... ; z := 3
'''


def _lines(source: str) -> str:
    return "\n".join(line.rstrip() for line in source.expandtabs(8).rstrip("\n").split("\n"))


@pytest.mark.parametrize("source", [TRICKY, "x = 1", "def f(:\n  return [1, 2\n\n   'open string\n$ ? !"])
def test_encode_then_decode_gives_the_source_back(source):
    grid = cg.encode(source)
    assert grid.tokens.shape == (cg.ROWS * cg.COLS,) and int(grid.tokens.max()) < cg.VOCAB_SIZE
    assert cg.decode(grid.tokens, grid) == _lines(source)


def test_round_trip_on_real_functions():
    functions = [f for text in corpus.texts("heldout", limit=8) for f in code_repair_data.definitions(text)]
    assert len(functions) > 50
    for source in functions:
        try:
            grid = cg.encode(source)
        except cg.DoesNotFit:
            continue
        assert cg.decode(grid.tokens, grid) == _lines(source)


def test_names_and_literals_are_numbered_by_first_appearance():
    grid = cg.encode("b = a\na = 'x' + 'x'")
    assert grid.names == ["b", "a"] and grid.literals == ["'x'"]
    rows = grid.tokens.view(cg.ROWS, cg.COLS)
    assert rows[0, :4].tolist() == [cg.INDENT, cg.NAME, cg._FIXED["="], cg.NAME + 1]
    assert rows[1, 0] == cg.INDENT and rows[1, 3] == rows[1, 5] == cg.LITERAL
    assert not rows[2:].any()  # rows past the source are padding
    assert cg.encode("    pass").tokens[0] == cg.INDENT + 4


def test_the_answer_is_encoded_with_the_inputs_tables():
    broken = cg.encode("def f(x)\n    return y")
    fixed = cg.encode("def f(x):\n    return y", tables=broken)
    assert fixed.names == broken.names
    with pytest.raises(cg.DoesNotFit, match="not in the tables"):
        cg.encode("def g(x):\n    return y", tables=broken)


def test_a_changed_line_keeps_its_spacing_and_gets_python_spacing_where_new():
    broken = cg.encode("if  a ==b\n    foo( x, y\n")
    fixed = cg.encode("if  a ==b:\n    foo( x, y)\n", tables=broken)
    assert cg.decode(fixed.tokens, broken) == "if  a ==b:\n    foo( x, y)"
    swapped = cg.encode("x = y\ny = x", tables=cg.encode("x y =\ny = x"))
    assert cg.decode(swapped.tokens, cg.encode("x y =\ny = x")) == "x = y\ny = x"


def test_tokens_without_meaning_decode_to_nothing():
    grid = cg.encode("a = 1")
    tokens = grid.tokens.clone()
    tokens[4] = cg.NAME + 7  # no 8th name in this grid
    tokens[5] = cg.INDENT + 3  # an indentation token mid-line
    assert cg.decode(tokens, grid) == "a = 1"


@pytest.mark.parametrize(("source", "why"), [
    ("x\n" * 65, "65 lines"),
    ("x = [" + ", ".join(["1"] * 30) + "]", "tokens"),
    (" " * 64 + "x", "indented 64"),
    ("\n".join(", ".join(f"v{r}_{i}" for i in range(20)) + " = 0" for r in range(9)), "distinct names"),
])
def test_what_does_not_fit_says_why(source, why):
    with pytest.raises(cg.DoesNotFit, match=why):
        cg.encode(source)


def test_validity_is_parsing():
    assert cg.is_valid("def f(x):\n    return x\n")
    assert not cg.is_valid("def f(x)\n    return x\n")
    assert not cg.is_valid("x = '\x00'\x00")
    assert torch.equal(cg.encode("").tokens[:2], torch.tensor([cg.INDENT, cg.PAD]))
