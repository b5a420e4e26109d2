"""The offline text corpus: the Python standard library's own source, read from this interpreter.

Reproducible on a given Python version with no download; `corpus_id()` names the version and is
recorded with every artefact built from it. Files are split by a hash of their path (one in ten
held out), so the split does not move when a file is added or removed elsewhere.
"""

from __future__ import annotations

import random
import re
import sys
import sysconfig
import zlib
from collections.abc import Callable
from pathlib import Path

ROOT = Path(sysconfig.get_paths()["stdlib"])
# Tests, vendored packages, generated tables and demos are not the code people send us.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "pydoc_data", "lib2to3", "encodings", "turtledemo"}
HELDOUT_MOD = 10


def source_files(split: str = "train") -> list[Path]:
    """The stdlib's .py files in `split` ("train", "heldout" or "all"), sorted by path."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"unknown split {split!r}")
    files = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        heldout = zlib.crc32(rel.as_posix().encode()) % HELDOUT_MOD == 0
        if split == "all" or heldout == (split == "heldout"):
            files.append(path)
    return files


def texts(split: str = "train", limit: int | None = None) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in source_files(split)[:limit]]


def corpus_id() -> str:
    return f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib-crc32mod{HELDOUT_MOD}"


_TOP = re.compile(r"^(?:async def|def|class) ", re.M)


def blocks_of(text: str, min_lines: int = 3, max_lines: int = 24) -> list[str]:
    """Top-level functions and classes of a module, cut to `max_lines` at a line boundary."""
    starts = [m.start() for m in _TOP.finditer(text)] + [len(text)]
    blocks = []
    for a, b in zip(starts, starts[1:]):
        lines = text[a:b].rstrip().splitlines()[:max_lines]
        if len(lines) >= min_lines:
            blocks.append("\n".join(lines))
    return blocks


def code_chats(blocks: list[str], seed: int) -> list[list[dict[str, str]]]:
    """One code-editing chat per block: "Rewrite this code", and every other one a seeded corruption to
    "Fix" (bench.speculative's prompts on held-out blocks, the SmolLM2 draft's training chats on train ones)."""
    out = []
    for i, block in enumerate(blocks):
        broken = corrupt(block, seed + i) if i % 2 else None
        task = f"Fix this code:\n{broken[0]}" if broken else f"Rewrite this code:\n{block}"
        out.append([{"role": "user", "content": task}])
    return out


def heldout_blocks(n: int, seed: int = 0, max_lines: int = 24) -> list[str]:
    """`n` code blocks from held-out files, a seeded sample: prompts no model here trained on."""
    blocks = [b for t in texts("heldout") for b in blocks_of(t, max_lines=max_lines)]
    return random.Random(seed).sample(blocks, min(n, len(blocks)))


# Corruptions for "fix this code" tasks. Each returns the broken text, or None when the block has
# nothing it can break that way.
def _missing_colon(block: str, rng: random.Random) -> str | None:
    lines = block.splitlines()
    hits = [i for i, line in enumerate(lines) if line.rstrip().endswith(":")]
    if not hits:
        return None
    i = rng.choice(hits)
    lines[i] = lines[i].rstrip()[:-1]
    return "\n".join(lines)


def _unbalanced_bracket(block: str, rng: random.Random) -> str | None:
    hits = [m.start() for m in re.finditer(r"\)", block)]
    if not hits:
        return None
    i = rng.choice(hits)
    return block[:i] + block[i + 1:]


def _wrong_indentation(block: str, rng: random.Random) -> str | None:
    lines = block.splitlines()
    hits = [i for i, line in enumerate(lines) if i and line.startswith("    ") and line.strip()]
    if not hits:
        return None
    i = rng.choice(hits)
    lines[i] = lines[i][2:]
    return "\n".join(lines)


def _swapped_tokens(block: str, rng: random.Random) -> str | None:
    words = list(re.finditer(r"\b\w+\b", block))
    if len(words) < 4:
        return None
    i = rng.randrange(len(words) - 1)
    a, b = words[i], words[i + 1]
    if a.group() == b.group():
        return None
    return block[:a.start()] + b.group() + block[a.end():b.start()] + a.group() + block[b.end():]


CORRUPTIONS: dict[str, Callable[[str, random.Random], str | None]] = {
    "missing_colon": _missing_colon,
    "unbalanced_bracket": _unbalanced_bracket,
    "wrong_indentation": _wrong_indentation,
    "swapped_tokens": _swapped_tokens,
}


def corrupt(block: str, seed: int) -> tuple[str, str] | None:
    """(broken block, corruption name), seeded; None when no corruption applies."""
    rng = random.Random(seed)
    names = list(CORRUPTIONS)
    rng.shuffle(names)
    for name in names:
        broken = CORRUPTIONS[name](block, rng)
        if broken is not None and broken != block:
            return broken, name
    return None
