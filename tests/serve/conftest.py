"""One real Ray Serve instance per test session, with the app on the embedded tiny models.

Two applications: `switchyard` at / (serve_config.yaml's args) and `fallback` at /fallback,
the same app whose mamba backend fails every call (routed by score, so long prompts go to mamba first),
with only the language models, and with a durable routing log (`routing_log_path`).
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import httpx
import pytest
import yaml

from deployments import serve_env

serve_env.apply()  # before anything imports ray.serve, as `make serve` runs it

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_args() -> dict:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]


@pytest.fixture(scope="session")
def routing_log_path(tmp_path_factory) -> Path:
    """The `fallback` app's durable routing log."""
    return tmp_path_factory.mktemp("router") / "routing.jsonl"


@pytest.fixture(scope="session")
def server(routing_log_path: Path) -> str:
    import ray
    from ray import serve

    from deployments.app import build_app

    args = app_args()
    broken = copy.deepcopy(args)
    broken["backends"] = [b for b in broken["backends"] if b["kind"] == "lm"]
    broken["routing"]["strategy"] = "score"  # mamba first for long prompts, whatever the measured costs
    broken["router"]["routing_log_path"] = str(routing_log_path)
    for b in broken["backends"]:
        if b["name"] == "mamba":
            b["engine"] = "tests.serve.engines:FailingEngine"
    ray.init(num_cpus=8, include_dashboard=False, logging_level="WARNING")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="switchyard", route_prefix="/")
    serve.run(build_app(broken), name="fallback", route_prefix="/fallback")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def client(server: str):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c
