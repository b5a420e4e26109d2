"""A Ray cluster of three nodes on this machine (`ray.cluster_utils.Cluster`), with the language
model backends placed by custom resources, for tests that kill replicas and remove nodes:

    head      router (1 of 2), Serve's controller and HTTP proxy     router_host
    worker a  mamba, transformer (1 of 2)                            mamba_host, lm_host
    worker b  router (2 of 2), transformer (2 of 2)                  router_host, lm_host

Its own Ray, so it must not share a process with tests/serve's: `pytest tests` runs tests/chaos
first (alphabetical order) and shuts it down before tests/serve starts another.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import pytest
import yaml

from deployments import serve_env
from tests.serve.conftest import ROOT, free_port

serve_env.apply()

WORKER_A = {"num_cpus": 2, "resources": {"mamba_host": 1, "lm_host": 1}}
WORKER_B = {"num_cpus": 2, "resources": {"router_host": 1, "lm_host": 1}}


def chaos_args() -> dict:
    args = copy.deepcopy(yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"])
    args["backends"] = [b for b in args["backends"] if b["kind"] == "lm"]
    args["routing"].pop("intent")
    args["routing"]["strategy"] = "score"  # long documents to mamba first, whatever the measured costs
    args["router"] |= {"request_timeout_s": 20, "default_max_tokens": 8}
    args["router"]["deployment"] |= {"num_replicas": 2, "health_check_period_s": 1, "health_check_timeout_s": 5}
    args["router"]["deployment"]["ray_actor_options"] |= {"resources": {"router_host": 1}}
    for b in args["backends"]:
        d = b["deployment"]
        d |= {"health_check_period_s": 1, "health_check_timeout_s": 5, "graceful_shutdown_timeout_s": 1}
        host = "mamba_host" if b["name"] == "mamba" else "lm_host"
        d["ray_actor_options"] |= {"resources": {host: 1}}
        if b["name"] == "transformer":
            d["num_replicas"] = 2
    return args


@dataclass
class Chaos:
    url: str
    cluster: object
    nodes: dict

    def replicas(self, deployment: str) -> dict[str, int]:
        from ray import serve

        return dict(serve.status().applications["switchyard"].deployments[deployment].replica_states)

    def wait_running(self, deployment: str, count: int, timeout: float = 120) -> float:
        start = time.monotonic()
        while self.replicas(deployment).get("RUNNING", 0) < count:
            assert time.monotonic() - start < timeout, (deployment, self.replicas(deployment))
            time.sleep(0.25)
        return time.monotonic() - start


@pytest.fixture(scope="module")
def chaos() -> Chaos:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from deployments.app import build_app

    assert not ray.is_initialized(), "tests/chaos starts its own Ray: run it before tests/serve, or alone"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"router_host": 1}, "include_dashboard": False})
    nodes = {"a": cluster.add_node(**WORKER_A), "b": cluster.add_node(**WORKER_B)}
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        serve.run(build_app(chaos_args()), name="switchyard", route_prefix="/")
        yield Chaos(f"http://127.0.0.1:{port}", cluster, nodes)
    finally:  # no serve.shutdown(): its controller waits 30 s for replicas on the removed nodes
        ray.shutdown()
        cluster.shutdown()
