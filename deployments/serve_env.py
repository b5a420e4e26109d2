"""The Ray Serve process settings Switchyard runs with, in one place.

Ray reads them when `ray.serve` is first imported and when its processes start, so they belong in
the environment of the process that starts Ray: `make serve` and the k8s manifests set them on the
command line and in the containers (tests/unit/test_k8s.py checks both against this table); the
tests and benches call `apply()` before they import Ray.

- RAY_SERVE_THROUGHPUT_OPTIMIZED: Ray's latency preset: user code on the replica's event loop,
  gRPC between deployments (router -> backend), direct ingress, buffered request logs.
- RAY_SERVE_PROXY_USE_GRPC: the HTTP proxy also talks gRPC to the ingress replica instead of actor
  calls; the preset does not turn this on (Ray reads it before the preset is applied).

bench.router_overhead measures what they are worth (README, Measured).
"""

from __future__ import annotations

import os
import sys

SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_PROXY_USE_GRPC": "1"}


def apply() -> None:
    """Sets SERVE_ENV where unset. Fails if Ray Serve was imported already, since it would not see them."""
    if "ray.serve" in sys.modules and any(k not in os.environ for k in SERVE_ENV):
        raise RuntimeError("deployments.serve_env.apply() must run before ray.serve is imported")
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
