"""Writing measured figures into the serve configs: each backend's one-line `capability.KEY: {...}`,
replaced where it is or added after the backend's `cost:` line, comments kept (bench.long_context
writes `cost`, bench.quality writes `quality`)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# serve_config.yaml and the RayService that embeds its applications (tests/unit/test_k8s.py)
CONFIGS = (ROOT / "serve_config.yaml", ROOT / "k8s" / "rayservice-cpu.yaml")


def configs_for(config: Path) -> tuple[Path, ...]:
    """The files a --write updates: both for serve_config.yaml, else the one named."""
    return CONFIGS if config.resolve() == CONFIGS[0] else (config,)


def write_lines(key: str, values: dict[str, str], paths=CONFIGS) -> None:
    """Sets `KEY: VALUE` (VALUE a one-line flow mapping) in each named backend's capability."""
    for path in paths:
        out, current = [], None
        for line in path.read_text().splitlines(keepends=True):
            if m := re.match(r"\s*- name: (\S+)", line):
                current = m.group(1)
            if current in values and re.match(rf"\s*{key}: ", line):
                if key == "cost":
                    out.append(re.match(r"\s*", line).group(0) + f"{key}: {values[current]}\n")
                continue  # not cost: written again below, after cost
            out.append(line)
            if key != "cost" and current in values and (m := re.match(r"(\s*)cost: ", line)):
                out.append(f"{m.group(1)}{key}: {values[current]}\n")
        path.write_text("".join(out))
