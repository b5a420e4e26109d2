"""The offline text corpus: the Python standard library's own source, read from this interpreter.

Reproducible on a given Python version with no download; the version is recorded with every
artefact built from it.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path


def stdlib_files(limit: int | None = None) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    return files[:limit] if limit else files


def stdlib_texts(limit: int | None = None) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(limit)]


def corpus_id(limit: int | None = None) -> str:
    return f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib-top{limit or 'all'}"
