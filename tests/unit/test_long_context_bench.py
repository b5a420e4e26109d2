"""bench.long_context's pieces that do not need a run: the fit recovers known curves, and --write
rewrites only the backends' cost lines, leaving comments and the rest of the file as they were."""

from __future__ import annotations

import pytest
import yaml

from bench import long_context
from deployments.config import AppConfig
from routing.cost import CostModel


def test_fit_recovers_a_quadratic_prefill_and_a_linear_decode():
    lengths = [480, 992, 2016, 4064, 8160]
    curve = {"prompt_tokens": lengths,
             "prefill_s": [0.01 + 2e-4 * n + 3e-8 * n * n for n in lengths],
             "decode_ms": [4.0 + 1e-3 * (n + long_context.DECODE / 2) for n in lengths]}
    cost = long_context.fit(curve, "test")
    assert cost.prefill_s == pytest.approx([0.01, 2e-4, 3e-8], rel=1e-3, abs=1e-6)
    assert cost.decode_ms == pytest.approx([4.0, 1e-3], rel=1e-3)


def test_write_replaces_the_cost_lines_only(tmp_path):
    path = tmp_path / "serve_config.yaml"
    original = long_context.CONFIGS[0].read_text()
    path.write_text(original)
    costs = {"mamba": CostModel(prefill_s=[0.1, 1e-4], decode_ms=[5.0], measured="here"),
             "transformer": CostModel(prefill_s=[0.02, 1e-4, 1e-8], decode_ms=[3.0, 1e-3], measured="here")}
    long_context.write_costs(costs, (path,))
    cfg = AppConfig.model_validate(yaml.safe_load(path.read_text())["applications"][0]["args"])
    assert cfg.backend("mamba").capability.cost == costs["mamba"]
    assert cfg.backend("transformer").capability.cost == costs["transformer"]
    changed = [(a, b) for a, b in zip(original.splitlines(), path.read_text().splitlines()) if a != b]
    assert len(changed) == 2 and all(b.strip().startswith("cost: {") for _, b in changed)
    assert len(original.splitlines()) == len(path.read_text().splitlines())


def test_fit_never_has_a_falling_curve():
    lengths = [480, 992, 2016, 4064, 8160]
    curve = {"prompt_tokens": lengths, "prefill_s": [0.5, 0.9, 1.6, 3.0, 5.5],
             "decode_ms": [9.0, 8.8, 9.1, 8.7, 8.9]}  # flat with noise: a free fit can slope down
    cost = long_context.fit(curve, "test")
    assert all(c >= 0 for c in cost.prefill_s + cost.decode_ms)
    assert cost.predict_s(65536, 100) > cost.predict_s(8192, 100)
