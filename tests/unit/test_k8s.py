"""k8s manifests are tested artefacts: valid against the KubeRay CRDs, and serving the repo's config."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT.parent / "shared" / "kuberay"


def crd_schema(kind: str) -> dict:
    crd = yaml.safe_load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


PAIRS = {"rayservice-cpu.yaml": "serve_config.yaml", "rayservice-gpu.yaml": "serve_config.gpu.yaml"}


@pytest.fixture(scope="module", params=sorted(PAIRS))
def manifest(request) -> dict:
    return {**yaml.safe_load((ROOT / "k8s" / request.param).read_text()), "_serve_config": PAIRS[request.param]}


def _groups(manifest: dict) -> list[dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


@pytest.mark.skipif(not CRDS.exists(), reason="../shared/kuberay not beside the checkout")
def test_rayservice_matches_the_crd(manifest):
    jsonschema.validate({k: v for k, v in manifest.items() if k != "_serve_config"}, crd_schema(manifest["kind"]))


def test_serve_config_is_the_repos(manifest):
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    repo = yaml.safe_load((ROOT / manifest["_serve_config"]).read_text())
    assert embedded["applications"] == repo["applications"]


def test_custom_resources_asked_for_are_started_with_room(manifest):
    """Each custom resource the deployments ask for is started on a worker group (KubeRay's quoted
    JSON in rayStartParams.resources) with room for all of them on one node of that group."""
    asked: dict[str, float] = {}
    for app in yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]:
        for b in app["args"]["backends"]:
            for name, amount in b["deployment"].get("ray_actor_options", {}).get("resources", {}).items():
                asked[name] = asked.get(name, 0) + amount * b["deployment"].get("num_replicas", 1)
    started: dict[str, float] = {}
    for group in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        if raw := group["rayStartParams"].get("resources"):
            for name, amount in json.loads(json.loads(raw)).items():
                started[name] = max(started.get(name, 0), amount)
    assert set(asked) <= set(started), (asked, started)
    assert all(asked[n] <= started[n] for n in asked), (asked, started)


def test_gpu_groups_request_and_limit_gpus(manifest):
    for group in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        gpus = group["rayStartParams"].get("num-gpus")
        for container in group["template"]["spec"]["containers"]:
            res = container["resources"]
            if gpus is not None:
                assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == gpus, group["groupName"]
            else:
                assert "nvidia.com/gpu" not in res.get("limits", {}), group["groupName"]


def test_head_takes_no_serve_work(manifest):
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    images = [c["image"] for g in _groups(manifest) for c in g["template"]["spec"]["containers"]]
    assert all(":" in i and not i.endswith(":latest") for i in images)


def test_serve_env_is_set_where_ray_starts(manifest):
    from deployments.serve_env import SERVE_ENV

    for group in _groups(manifest):
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert SERVE_ENV.items() <= env.items(), container["name"]
    makefile = (ROOT / "Makefile").read_text()
    assert "SERVE_ENV := " + " ".join(f"{k}={v}" for k, v in SERVE_ENV.items()) in makefile


def test_grafana_dashboard_shows_only_metrics_the_code_records():
    """Every series a panel queries is one that deployments/ defines (Ray adds the ray_ prefix and
    Prometheus the _total, _bucket, _sum and _count suffixes), and every metric has a panel."""
    import re

    dashboard = json.loads((ROOT / "k8s" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queried = {re.sub(r"_(total|bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"ray_(switchyard_\w+)", e)}
    code = "".join(p.read_text() for p in (ROOT / "deployments").glob("*.py"))
    defined = set(re.findall(r'metrics\.\w+\(\s*"(switchyard_\w+)"', code))
    assert defined and queried == defined, (queried - defined, defined - queried)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_the_gpu_service_reads_its_api_keys_from_a_secret_in_every_container():
    """serve_config.gpu.yaml turns auth on with keys and a JWT secret from the environment; the router
    may run on any node, so every container gets them from the Secret."""
    manifest = yaml.safe_load((ROOT / "k8s" / "rayservice-gpu.yaml").read_text())
    auth = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"]["auth"]
    assert auth["enabled"] and auth["keys_env"] == "SWITCHYARD_API_KEYS"
    for group in _groups(manifest):
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in container.get("env", [])}
            assert env[auth["keys_env"]] == {"name": "switchyard-api-keys", "key": "keys.json"}
            assert env[auth["jwt"]["secret_env"]] == {"name": "switchyard-api-keys", "key": "jwt-secret"}

