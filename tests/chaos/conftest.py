"""A Ray cluster of three nodes on this machine (`ray.cluster_utils.Cluster`), with the language
model backends placed by custom resources, for tests that kill replicas and remove nodes:

    head      router (1 of 2), Serve's controller and HTTP proxy     router_host
    worker a  mamba                                                  mamba_host
    worker b  router (2 of 2)                                        router_host
    worker c  transformer (both replicas)                            lm_host: 2

The cluster is started when a test first asks for `chaos`, and again after tests/serve held the
process's Ray (tests/support.py). Each test starts from the whole cluster: `chaos` adds back a node an
earlier test removed and waits until every replica runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

from tests.support import RAY, free_port, tiny_args

WORKER_A = {"num_cpus": 2, "resources": {"mamba_host": 1}}
WORKER_B = {"num_cpus": 1, "resources": {"router_host": 1}}
WORKER_C = {"num_cpus": 2, "resources": {"lm_host": 2}}
WORKERS = {"a": WORKER_A, "b": WORKER_B, "c": WORKER_C}


def chaos_args() -> dict:
    args = tiny_args()
    args["backends"] = [b for b in args["backends"] if b["kind"] == "lm"]
    args["routing"].pop("intent")
    args["routing"]["strategy"] = "score"  # long documents to mamba first, whatever the measured costs
    # a deadline with room for a machine shared with other work: a request past it is a 504, which fails a test
    # a stream that sends nothing for 5 s continues elsewhere (a removed node's replicas may not fail at once)
    args["router"] |= {"request_timeout_s": 60, "default_max_tokens": 8, "stream_stall_s": 5}
    args["router"]["deployment"] |= {"num_replicas": 2, "health_check_period_s": 1, "health_check_timeout_s": 5}
    args["router"]["deployment"]["ray_actor_options"] |= {"resources": {"router_host": 1}}
    for b in args["backends"]:
        d = b["deployment"]
        d |= {"health_check_period_s": 1, "health_check_timeout_s": 5, "graceful_shutdown_timeout_s": 1}
        host = "mamba_host" if b["name"] == "mamba" else "lm_host"
        d["ray_actor_options"] |= {"resources": {host: 1}}
        if b["name"] == "transformer":  # 8 calls each: 16 streams are split evenly, so a kill hits half of them
            d |= {"num_replicas": 2, "max_ongoing_requests": 8}
    return args


REPLICAS = {"router": 2, "mamba": 1, "transformer": 2}


@dataclass
class Chaos:
    url: str = ""
    cluster: object = None
    nodes: dict = field(default_factory=dict)

    def start(self):
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster

        from deployments.app import build_app

        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "resources": {"router_host": 1}, "include_dashboard": False})
        self.nodes = {name: self.cluster.add_node(**options) for name, options in WORKERS.items()}
        ray.init(address=self.cluster.address, logging_level="WARNING")
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        serve.run(build_app(chaos_args()), name="switchyard", route_prefix="/")
        self.url = f"http://127.0.0.1:{port}"
        return self.stop

    def stop(self) -> None:  # no serve.shutdown(): its controller waits 30 s for replicas on removed nodes
        import ray

        ray.shutdown()
        self.cluster.shutdown()
        self.url, self.cluster, self.nodes = "", None, {}

    def restore(self) -> None:
        """Adds back the worker nodes that are gone and waits until every replica runs."""
        for name, options in WORKERS.items():
            if self.nodes[name] not in self.cluster.list_all_nodes():  # removed by an earlier test
                self.nodes[name] = self.cluster.add_node(**options)
        for deployment, count in REPLICAS.items():
            self.wait_running(deployment, count)
        self.wait_callable()

    def wait_callable(self, timeout: float = 120) -> None:
        """Until both routers would call every backend: none has an open circuit or no live replica
        in their view (10 /healthz answers in a row, which the proxy spreads over both routers)."""
        import httpx

        start, in_a_row = time.monotonic(), 0
        with httpx.Client(base_url=self.url, timeout=10) as c:
            while in_a_row < 10:
                assert time.monotonic() - start < timeout, c.get("/healthz").text
                states = {b["state"] for b in c.get("/healthz").json()["backends"].values()}
                in_a_row = in_a_row + 1 if states <= {"ok", "probing"} else 0
                time.sleep(0.05 if in_a_row else 0.5)

    def replicas(self, deployment: str) -> dict[str, int]:
        from ray import serve

        return dict(serve.status().applications["switchyard"].deployments[deployment].replica_states)

    def running_replica(self, deployment: str):
        """A handle to one RUNNING replica of `deployment`, as Serve's controller lists it."""
        import ray
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()["applications"]["switchyard"]["deployments"][deployment]
        name = next(r["actor_name"] for r in details["replicas"] if r["state"] == "RUNNING")
        return ray.get_actor(name, namespace="serve")

    def wait_running(self, deployment: str, count: int, timeout: float = 300) -> float:
        start = time.monotonic()
        while self.replicas(deployment).get("RUNNING", 0) < count:
            assert time.monotonic() - start < timeout, (deployment, self.replicas(deployment))
            time.sleep(0.25)
        return time.monotonic() - start


@pytest.fixture(scope="session")
def cluster() -> Chaos:
    return Chaos()


@pytest.fixture
def chaos(cluster: Chaos) -> Chaos:
    RAY.claim("chaos", cluster.start)
    cluster.restore()
    return cluster
