"""One real Ray Serve instance, with the app on the embedded tiny models (tests/support.tiny_args), started when a test first
asks for `server` and again after tests/chaos held the process's Ray (tests/support.py).

Five applications: `switchyard` at / (serve_config.yaml's args); `fallback` at /fallback, the same
app whose mamba backend fails every call (routed by score, so long prompts go to mamba first) and
whose circuits never open, so every request there tries mamba first, with only the language models,
a durable routing log (`routing_log_path`) and an audit log; `stubs` at /stubs, backends that load no
model (one fails every call, one echoes, one streams until cancelled) whose opened circuits stay open;
`secure` at /secure, with auth on
and only trm and dinov2 (and a backend that hangs); and `fuzz` at /fuzz, the default app with answers
capped at 8 tokens, for tests/serve/test_fuzz.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import RAY, free_port, tiny_args


# The `secure` app's callers: keys (their sha256 in the config, as a Secret would hold them) and a
# JWT secret, passed to the replicas through the environment as KubeRay would.
# The `secure` app's request deadline: the hanging backend's 504 comes after it, and a burst's admitted
# requests must finish within it on a machine shared with other work.
SECURE_DEADLINE_S = 10

KEYS = {"sk-refiner": ["refiner"], "sk-admin": ["admin"], "sk-slow": ["slow"]}
JWT_SECRET = "serve-test-secret-of-32-bytes-or-more"
SECURE_AUTH = {
    "enabled": True,
    "keys_env": "SWITCHYARD_TEST_API_KEYS",
    "jwt": {"algorithms": ["HS256"], "secret_env": "SWITCHYARD_TEST_JWT_SECRET", "audience": "switchyard"},
    "roles": {"refiner": {"endpoints": ["refine", "models"], "backends": ["trm"]},
              "admin": {},
              "slow": {"endpoints": ["refine"], "requests_per_minute": 3}},
}


def _secure_env() -> None:
    import json
    import os

    from routing.access import hash_key

    os.environ["SWITCHYARD_TEST_API_KEYS"] = json.dumps(
        [{"name": key.removeprefix("sk-"), "sha256": hash_key(key), "roles": roles} for key, roles in KEYS.items()])
    os.environ["SWITCHYARD_TEST_JWT_SECRET"] = JWT_SECRET


@pytest.fixture(scope="session")
def routing_log_path(tmp_path_factory) -> Path:
    """The `fallback` app's durable routing log."""
    return tmp_path_factory.mktemp("router") / "routing.jsonl"


@pytest.fixture(scope="session")
def audit_log_path(tmp_path_factory) -> Path:
    """The `fallback` app's audit log (prompts included)."""
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


def apps(routing_log_path: Path, audit_log_path: Path) -> dict[str, dict]:
    """Each application's args, by name; the name is its route prefix but for `switchyard` at /."""
    args = tiny_args()
    broken = copy.deepcopy(args)
    broken["backends"] = [b for b in broken["backends"] if b["kind"] == "lm"]
    broken["routing"]["strategy"] = "score"  # mamba first for long prompts, whatever the measured costs
    broken["router"]["routing_log_path"] = str(routing_log_path)
    broken["router"] |= {"audit_log_path": str(audit_log_path), "audit_include_prompt": True, "audit_flush_s": 0.2,
                         "unhealthy_after": 1_000_000, "breaker_failure_rate": None}  # mamba tried every time
    for b in broken["backends"]:
        if b["name"] == "mamba":
            b["engine"] = "tests.serve.engines:FailingEngine"
    stubs = copy.deepcopy(args)  # backends that load no model; an opened circuit stays open
    stubs["routing"].pop("intent")
    stubs["router"] |= {"unhealthy_after": 3, "unhealthy_cooldown_s": 3600}
    text = {"modalities": ["text"], "max_context": 1024, "outputs": []}  # they make neither logprobs nor JSON
    stubs["backends"] = [
        {"name": "broken", "kind": "lm", "engine": "tests.serve.engines:BrokenEngine", "model": "unused",
         "capability": text | {"tasks": {"text_generation": 1.0}}, "deployment": {"ray_actor_options": {"num_cpus": 0}}},
        {"name": "echo", "kind": "lm", "engine": "tests.serve.engines:EchoEngine", "model": "unused",
         "capability": text | {"tasks": {"text_generation": 0.5}}, "deployment": {"ray_actor_options": {"num_cpus": 0}}},
        {"name": "trickle", "kind": "lm", "engine": "tests.serve.engines:TrickleEngine", "model": "unused",
         "capability": text | {"tasks": {"streaming": 1.0}}, "deployment": {"ray_actor_options": {"num_cpus": 0}}}]
    secure = copy.deepcopy(args)  # auth on, with the cheap backends only
    secure["backends"] = [b for b in secure["backends"] if b["kind"] != "lm"]
    secure["routing"].pop("intent")
    for b in secure["backends"]:
        b.pop("label_adapters", None)  # no language model here to have the adapters
        if b["kind"] == "trm":  # a small queue, for the overload test
            b["max_batch_size"] = 4
            b["deployment"] |= {"max_ongoing_requests": 4, "max_queued_requests": 4}
    secure["router"] |= {"max_body_bytes": 65536, "request_timeout_s": SECURE_DEADLINE_S}
    secure["backends"].append({
        "name": "hang", "kind": "lm", "engine": "tests.serve.engines:HangingEngine", "model": "unused",
        "capability": text | {"tasks": {"text_generation": 1.0}}, "deployment": {"ray_actor_options": {"num_cpus": 0}}})
    secure["auth"] = SECURE_AUTH
    fuzz = copy.deepcopy(args)  # for schemathesis: every model, answers capped at 8 tokens
    fuzz["router"] |= {"max_tokens": 8, "default_max_tokens": 8}
    return {"switchyard": args, "fallback": broken, "stubs": stubs, "secure": secure, "fuzz": fuzz}


@dataclass
class Serve:
    """The applications on a local Ray; `url` is set while they run."""

    apps: dict[str, dict]
    url: str = ""

    def start(self):
        import ray
        from ray import serve

        from deployments.app import build_app

        _secure_env()  # before Ray starts: its workers inherit the environment
        ray.init(num_cpus=8, include_dashboard=False, logging_level="WARNING")
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, args in self.apps.items():
            serve.run(build_app(args), name=name, route_prefix="/" if name == "switchyard" else f"/{name}")
        self.url = f"http://127.0.0.1:{port}"
        return self.stop

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        self.url = ""


@pytest.fixture(scope="session")
def serve_apps(routing_log_path: Path, audit_log_path: Path) -> Serve:
    return Serve(apps(routing_log_path, audit_log_path))


@pytest.fixture
def server(serve_apps: Serve) -> str:
    """The base URL of the running applications (started here if another Ray held the process)."""
    RAY.claim("serve", serve_apps.start)
    return serve_apps.url


@pytest.fixture
def client(server: str):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c
