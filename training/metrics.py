"""Prometheus metrics of a training run, with prometheus-client.

Training runs outside Ray, where Ray's metrics agent does not see it. A run started with
`--metrics-port N` serves its metrics at http://HOST:N/metrics for Prometheus to scrape while it
runs (the same `switchyard_` prefix as the serving metrics, with the run's `job` label):

    switchyard_training_steps_total          optimizer steps taken
    switchyard_training_planned_steps        steps the run will take
    switchyard_training_examples_total       training examples seen
    switchyard_training_loss                 the last step's training loss
    switchyard_training_step_seconds         histogram of the time of one step
    switchyard_training_heldout{figure}      held-out figures, as each is measured

Without a port the figures are still kept (`text()`), which the tests read.
"""

from __future__ import annotations

import argparse
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server


class TrainingMetrics:
    def __init__(self, job: str, planned_steps: int, port: int | None = None, addr: str = "0.0.0.0"):
        self.registry = CollectorRegistry()
        self.job = job
        r, labels = self.registry, ("job",)
        self._steps = Counter("switchyard_training_steps", "Optimizer steps taken.", labels, registry=r)
        self._planned = Gauge("switchyard_training_planned_steps", "Steps the run will take.", labels, registry=r)
        self._examples = Counter("switchyard_training_examples", "Training examples seen.", labels, registry=r)
        self._loss = Gauge("switchyard_training_loss", "The last step's training loss.", labels, registry=r)
        self._seconds = Histogram("switchyard_training_step_seconds", "Time of one optimizer step.", labels,
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self._heldout = Gauge("switchyard_training_heldout", "Held-out figures of the run, as each is measured.",
                              ("job", "figure"), registry=r)
        self._planned.labels(job).set(planned_steps)
        self.server: Any = None
        if port is not None:
            self.server, _ = start_http_server(port, addr=addr, registry=self.registry)

    def step(self, loss: float, seconds: float, examples: int) -> None:
        self._steps.labels(self.job).inc()
        self._examples.labels(self.job).inc(examples)
        self._loss.labels(self.job).set(loss)
        self._seconds.labels(self.job).observe(seconds)

    def heldout(self, **figures: float) -> None:
        for name, value in figures.items():
            self._heldout.labels(self.job, name).set(value)

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def __enter__(self) -> TrainingMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="serve Prometheus metrics of the run at :PORT/metrics while it runs")
