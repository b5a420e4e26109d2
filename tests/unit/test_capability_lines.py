"""bench/capability.py: measured figures written into a serve config's capability lines."""

from __future__ import annotations

import yaml

from bench.capability import CONFIGS, write_lines


def _caps(path) -> dict:
    return {b["name"]: b["capability"] for b in yaml.safe_load(path.read_text())["applications"][0]["args"]["backends"]}


def test_a_new_key_goes_after_cost_and_a_second_write_replaces_it(tmp_path):
    path = tmp_path / "serve_config.yaml"
    text = CONFIGS[0].read_text()
    path.write_text("".join(line for line in text.splitlines(keepends=True) if not line.lstrip().startswith("quality: ")))
    write_lines("quality", {"mamba": '{bits_per_byte: {"text_generation": 2.0}}'}, (path,))
    write_lines("quality", {"mamba": '{bits_per_byte: {"text_generation": 1.5}}'}, (path,))
    caps = _caps(path)
    assert caps["mamba"]["quality"] == {"bits_per_byte": {"text_generation": 1.5}}
    assert "quality" not in caps["transformer"] and caps["mamba"]["cost"] == _caps(CONFIGS[0])["mamba"]["cost"]
    lines = path.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith("quality: "))
    assert lines[at - 1].lstrip().startswith("cost: ")
    assert sum(line.lstrip().startswith("quality: ") for line in lines) == 1
