"""Training's Prometheus metrics (prometheus-client): counted by a real short run, served over HTTP."""

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from training import trm
from training.metrics import TrainingMetrics


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_run_is_scraped_over_http_while_it_runs():
    port = free_port()
    with TrainingMetrics("lm:test", planned_steps=10, port=port, addr="127.0.0.1") as metrics:
        metrics.step(loss=2.5, seconds=0.02, examples=8)
        metrics.step(loss=2.0, seconds=0.03, examples=8)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert metrics.server is None  # closed on leaving
    got, job = samples(text), (("job", "lm:test"),)
    assert got[("switchyard_training_steps_total", job)] == 2
    assert got[("switchyard_training_examples_total", job)] == 16
    assert got[("switchyard_training_loss", job)] == 2.0
    assert got[("switchyard_training_planned_steps", job)] == 10
    assert got[("switchyard_training_step_seconds_count", job)] == 2


def test_a_short_trm_run_records_every_step_and_its_heldout_figures(tmp_path):
    cfg = trm.TrainConfig(model={"hidden_size": 16, "num_layers": 1, "n_latent": 1, "t_outer": 1, "max_steps": 2},
                          train_puzzles=8, train_givens=[40], test_givens=[45], test_per_givens=4, steps=3,
                          batch=4, checkpoint_every=2, out=str(tmp_path))
    metrics = TrainingMetrics("trm:sudoku", cfg.steps)
    report = trm.train(cfg, "test", metrics)
    got, job = samples(metrics.text()), (("job", "trm:sudoku"),)
    assert got[("switchyard_training_steps_total", job)] == 3
    assert got[("switchyard_training_examples_total", job)] == 12
    assert got[("switchyard_training_heldout", (("figure", "halting_mean_steps"), *job))] == \
        report["heldout"]["halting"]["mean_steps"]
