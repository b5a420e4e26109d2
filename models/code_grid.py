"""Python source <-> the TRM's code grid: 64 lines x 48 tokens (seed 003), and the validity check.

Each physical line is one row: its indentation (leading spaces, one token) and then its tokens,
lexed line by line so that broken code (an unclosed bracket, a lost colon) still lexes. Keywords
and operators have fixed tokens; names are numbered in order of first appearance in the grid
(ID_0, ID_1, ...) and literals, comments and unknown characters likewise (LIT_k), so the
vocabulary is small and fixed while any name or string round-trips: `Grid` keeps the tables and
every token's text and the whitespace before it. A decoded line whose tokens did not change comes
back verbatim; a changed one keeps the spacing of the tokens it kept (difflib alignment; by position
when the count did not change, as in a swap) and gets Python's usual spacing around new ones.
"""

from __future__ import annotations

import ast
import difflib
import re
import tokenize
from dataclasses import dataclass, field

import torch

# The instruction before broken code when a language model repairs it: taught in training/lm.py, sent
# by the router for a code_repair that a language model takes.
FIX_PROMPT = "Fix this code:"

ROWS, COLS = 64, 48  # a row: the indentation token, then up to COLS - 1 tokens
MAX_INDENT = 63
NAMES, LITERALS = 160, 96  # per-grid table sizes

KEYWORDS = ("False", "None", "True", "and", "as", "assert", "async", "await", "break", "class", "continue",
            "def", "del", "elif", "else", "except", "finally", "for", "from", "global", "if", "import", "in",
            "is", "lambda", "nonlocal", "not", "or", "pass", "raise", "return", "try", "while", "with", "yield")
# Python 3.11's exact tokens plus "\" (line continuation); fixed here so the vocabulary does not
# move with the interpreter.
OPERATORS = ("!=", "%", "%=", "&", "&=", "(", ")", "*", "**", "**=", "*=", "+", "+=", ",", "-", "-=", "->",
             ".", "...", "/", "//", "//=", "/=", ":", ":=", ";", "<", "<<", "<<=", "<=", "=", "==", ">",
             ">=", ">>", ">>=", "@", "@=", "[", "]", "^", "^=", "{", "|", "|=", "}", "~", "\\")

PAD = 0
INDENT = 1  # INDENT + n: a line indented by n spaces
KEYWORD = INDENT + MAX_INDENT + 1
OPERATOR = KEYWORD + len(KEYWORDS)
NAME = OPERATOR + len(OPERATORS)
LITERAL = NAME + NAMES
VOCAB_SIZE = LITERAL + LITERALS

_FIXED = {**{k: KEYWORD + i for i, k in enumerate(KEYWORDS)}, **{o: OPERATOR + i for i, o in enumerate(OPERATORS)}}
_TEXT = {v: k for k, v in _FIXED.items()}
_OPS = "|".join(re.escape(o) for o in sorted(OPERATORS, key=len, reverse=True))
_LEX = re.compile(rf"""(?P<space>[ \t\f]*)(?:
    (?P<comment>\#.*)
  | (?P<triple>{tokenize.Triple})
  | (?P<string>{tokenize.StringPrefix}(?:'[^\n'\\]*(?:\\.[^\n'\\]*)*'|"[^\n"\\]*(?:\\.[^\n"\\]*)*"))
  | (?P<number>{tokenize.Number})
  | (?P<name>\w+)
  | (?P<op>{_OPS})
  | (?P<other>\S))""", re.VERBOSE)
_TRIPLE_END = {q: re.compile(r"(?:[^\\]|\\.)*?" + q, re.DOTALL) for q in ("'''", '"""')}


class DoesNotFit(ValueError):
    """The source is too big for the grid (lines, tokens a line, indentation, names, literals)."""


@dataclass
class Line:
    indent: int
    tokens: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # "fixed", "name" or "literal"
    spaces: list[str] = field(default_factory=list)  # whitespace before each token


def lex(source: str) -> list[Line]:
    """Physical lines of `source` as tokens; lossless but for trailing whitespace. Never raises on
    broken code: what no rule matches is a one-character literal."""
    lines, inside = [], None  # inside: the quote of a triple-quoted string left open
    for text in source.expandtabs(8).rstrip("\n").split("\n"):
        text = text.rstrip()
        body = text.lstrip(" ")
        line, pos = Line(len(text) - len(body)), len(text) - len(body)
        if inside is not None:  # the string goes on: up to its closing quote, or the whole line
            end = _TRIPLE_END[inside].match(text, pos)
            stop = end.end() if end else len(text)
            line.tokens.append(text[pos:stop]), line.kinds.append("literal"), line.spaces.append("")
            pos, inside = stop, (None if end else inside)
        while pos < len(text):
            m = _LEX.match(text, pos)
            kind = m.lastgroup
            word = m.group(kind)
            if kind == "triple":
                quote = word[-3:]
                end = _TRIPLE_END[quote].match(text, m.end())
                stop = end.end() if end else len(text)
                word, inside = text[m.start(kind):stop], (None if end else quote)
                pos = stop
            else:
                pos = m.end()
            if kind in ("op", "name") and word in _FIXED:
                kind = "fixed"
            elif kind != "name":
                kind = "literal"
            line.tokens.append(word), line.kinds.append(kind), line.spaces.append(m.group("space"))
        lines.append(line)
    return lines


@dataclass
class Grid:
    """A source's grid tokens and what decoding needs: the tables and the lexed lines."""

    tokens: torch.Tensor  # (ROWS * COLS,) long
    names: list[str]
    literals: list[str]
    lines: list[Line]


def encode(source: str, tables: Grid | None = None) -> Grid:
    """The grid of `source`. With `tables`, names and literals are numbered as in that grid (the
    target of a training pair is encoded with its broken input's tables); a name it lacks is a
    DoesNotFit."""
    lines = lex(source)
    if len(lines) > ROWS:
        raise DoesNotFit(f"{len(lines)} lines; the code grid holds {ROWS}")
    names = {n: i for i, n in enumerate(tables.names)} if tables else {}
    literals = {n: i for i, n in enumerate(tables.literals)} if tables else {}
    grid = torch.zeros(ROWS, COLS, dtype=torch.long)
    for r, line in enumerate(lines):
        if line.indent > MAX_INDENT:
            raise DoesNotFit(f"line {r + 1} is indented {line.indent} spaces; the grid holds {MAX_INDENT}")
        if len(line.tokens) > COLS - 1:
            raise DoesNotFit(f"line {r + 1} has {len(line.tokens)} tokens; the grid holds {COLS - 1} a line")
        grid[r, 0] = INDENT + line.indent
        for c, (word, kind) in enumerate(zip(line.tokens, line.kinds), 1):
            if kind == "fixed":
                grid[r, c] = _FIXED[word]
                continue
            table, base, size = (names, NAME, NAMES) if kind == "name" else (literals, LITERAL, LITERALS)
            if word not in table:
                if tables is not None or len(table) == size:
                    raise DoesNotFit(f"more than {size} distinct {kind}s" if tables is None
                                     else f"{kind} {word!r} is not in the tables")
                table[word] = len(table)
            grid[r, c] = base + table[word]
    return Grid(grid.view(-1), list(names), list(literals), lines)


def _text(token: int, grid: Grid) -> str | None:
    if token in _TEXT:
        return _TEXT[token]
    table, base = (grid.names, NAME) if NAME <= token < LITERAL else (grid.literals, LITERAL)
    i = token - base
    return table[i] if 0 <= i < len(table) and token >= NAME else None


_NO_SPACE_BEFORE = frozenset(")]}:,.;")
_NO_SPACE_AFTER = frozenset("([{.~")  # and "@" opening a decorator, "(" and "[" after a name (a call, an index)


def _join(words: list[str], spaces: list[str | None]) -> str:
    out = ""
    for i, (word, space) in enumerate(zip(words, spaces)):
        if space is None:  # a token the model put there: the usual Python spacing
            glue = (i == 0 or word in _NO_SPACE_BEFORE or words[i - 1] in _NO_SPACE_AFTER
                    or (word in ("(", "[") and _is_word(words[i - 1])) or (i == 1 and words[0] == "@"))
            space = "" if glue else " "
        out += space + word
    return out


def _is_word(word: str) -> bool:
    return bool(re.fullmatch(r"\w+", word)) and word not in KEYWORDS


def decode(tokens: torch.Tensor, grid: Grid) -> str:
    """The source that `tokens` (an answer on `grid`'s tables) stands for. Rows after the last
    non-pad row end it; a token with no meaning here (a name the tables lack) decodes to nothing."""
    rows = tokens.view(ROWS, COLS).tolist()
    while rows and not any(rows[-1]):
        rows.pop()
    out = []
    for r, row in enumerate(rows):
        row = [t for t in row if t != PAD]
        indent = row[0] - INDENT if row and INDENT <= row[0] < KEYWORD else 0
        words = [w for w in (_text(t, grid) for t in row if not INDENT <= t < KEYWORD) if w is not None]
        source = grid.lines[r] if r < len(grid.lines) else Line(indent)
        spaces: list[str | None] = [None] * len(words)
        if len(words) == len(source.tokens):  # the same tokens, or some replaced or swapped: same gaps
            spaces = list(source.spaces)
        else:
            match = difflib.SequenceMatcher(a=source.tokens, b=words, autojunk=False)
            for a, b, n in match.get_matching_blocks():
                spaces[b:b + n] = source.spaces[a:a + n]
        if spaces:
            spaces[0] = ""
        out.append(" " * indent + _join(words, spaces))
    return "\n".join(out)


def is_valid(source: str) -> bool:
    """Whether `source` is syntactically valid Python (the code_repair task's constraint)."""
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: null bytes
        return False
    return True
