"""k8s manifests are tested artefacts: valid against the KubeRay CRDs, and serving the repo's config."""

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


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load((ROOT / "k8s" / "rayservice-cpu.yaml").read_text())


@pytest.mark.skipif(not CRDS.exists(), reason="../shared/kuberay not beside the checkout")
def test_rayservice_matches_the_crd(manifest):
    jsonschema.validate(manifest, crd_schema(manifest["kind"]))


def test_serve_config_is_the_repos(manifest):
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    repo = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    assert embedded["applications"] == repo["applications"]


def test_head_takes_no_serve_work(manifest):
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    images = [c["image"] for c in head["template"]["spec"]["containers"]]
    assert all(":" in i and not i.endswith(":latest") for i in images)


def test_serve_env_is_set_where_ray_starts(manifest):
    from deployments.serve_env import SERVE_ENV

    groups = [manifest["spec"]["rayClusterConfig"]["headGroupSpec"],
              *manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            assert SERVE_ENV.items() <= env.items(), container["name"]
    makefile = (ROOT / "Makefile").read_text()
    assert "SERVE_ENV := " + " ".join(f"{k}={v}" for k, v in SERVE_ENV.items()) in makefile
