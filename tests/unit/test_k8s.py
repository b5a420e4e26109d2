"""k8s manifests are tested artefacts: valid against the KubeRay CRDs, serving the repo's config, and
consistent with each other (labels, ports, Secrets, images) and with the Dockerfile that builds the image.
Nothing here talks to a cluster: what a cluster would reject or do is modelled from the CRD schemas and
from Kubernetes' own rules (NetworkPolicy, label selectors)."""

import copy
import functools
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT.parent / "shared" / "kuberay"
K8S = ROOT / "k8s"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 18k lines: the C loader is 7x faster
needs_crds = pytest.mark.skipif(not CRDS.exists(), reason="../shared/kuberay not beside the checkout")


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=Loader) if d is not None]


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=Loader)
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


DOCS = [(f"{p.name}#{i}", d) for p in sorted(K8S.glob("*.yaml")) for i, d in enumerate(load_all(p))]
RAY_KINDS = {"RayService", "RayCluster"}
PAIRS = {"rayservice-cpu.yaml": "serve_config.yaml", "rayservice-gpu.yaml": "serve_config.gpu.yaml"}


def doc(kind: str, name: str) -> dict:
    return next(d for _, d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.fixture(scope="module", params=sorted(PAIRS))
def manifest(request) -> dict:
    return {**yaml.safe_load((K8S / request.param).read_text()), "_serve_config": PAIRS[request.param]}


def _groups(manifest: dict) -> list[dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def _apps(manifest: dict) -> list[dict]:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]


# -- the CRDs: jsonschema, plus what the API server adds (pruning of unknown fields, list-map keys) --

def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Fields the API server would drop without an error: a structural schema prunes every key that its
    `properties` do not name, and jsonschema alone does not flag them (the CRDs set no
    additionalProperties: false). Also list-map items with the same key, which the API server refuses."""
    found = []
    if isinstance(obj, dict) and schema.get("type") == "object":
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key in props:
                found += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                found.append(f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
        if schema.get("x-kubernetes-list-type") == "map":
            item_props = schema["items"].get("properties", {})
            keys = [tuple(it.get(k, item_props.get(k, {}).get("default")) for k in schema["x-kubernetes-list-map-keys"])
                    for it in obj]
            found += [f"{path}: duplicate {k}" for k in {k for k in keys if keys.count(k) > 1}]
    return found


@needs_crds
@pytest.mark.parametrize("where", [w for w, d in DOCS if d["kind"] in RAY_KINDS])
def test_ray_resources_match_their_crd(where):
    manifest = dict(DOCS)[where]
    validator = crd_validator(manifest["kind"])
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
    assert not errors, errors
    assert not unknown_fields(manifest, validator.schema)


@needs_crds
def test_the_crd_checks_can_fail():
    """A typo'd field, a wrong type and a duplicate port each fail, so a pass above means something."""
    base = yaml.safe_load((K8S / "rayservice-cpu.yaml").read_text())
    validator = crd_validator("RayService")
    typo = copy.deepcopy(base)
    typo["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    assert unknown_fields(typo, validator.schema) == [".spec.rayClusterConfig.enableInTreeAutoscalling"]
    wrong = copy.deepcopy(base)
    wrong["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "4"
    assert list(validator.iter_errors(wrong))
    dup = copy.deepcopy(base)
    ports = dup["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    ports.append({"containerPort": 8080, "name": "metrics2"})
    assert any("duplicate" in f for f in unknown_fields(dup, validator.schema))


def test_every_document_is_a_kind_this_file_checks():
    kinds = {"RayService", "PersistentVolumeClaim", "Deployment", "Service", "NetworkPolicy", "PodMonitor"}
    for where, d in DOCS:
        assert d["kind"] in kinds, f"{where}: {d['kind']} is not modelled here (pods, labels, ports)"
        assert d.get("apiVersion") and d.get("metadata", {}).get("name"), where
        assert "namespace" not in d["metadata"], f"{where}: applied in the namespace the docs choose"
    names = [(d["kind"], d["metadata"]["name"]) for _, d in DOCS]
    assert len(names) == len(set(names)), names


# -- serve config, resources, autoscaling --

def test_serve_config_is_the_repos(manifest):
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    repo = yaml.safe_load((ROOT / manifest["_serve_config"]).read_text())
    assert embedded["applications"] == repo["applications"]


def test_custom_resources_asked_for_are_started_with_room(manifest):
    """Each custom resource the deployments ask for is started on a worker group (KubeRay's quoted
    JSON in rayStartParams.resources) with room for all of them, at their starting replicas, on one
    node of that group (mamba, trm and dinov2 share one GPU node)."""
    asked: dict[str, float] = {}
    for app in _apps(manifest):
        for b in app["args"]["backends"]:
            needs, fewest, _ = _replica_needs(b["deployment"])
            for name, amount in needs.items():
                if name not in ("CPU", "GPU"):
                    asked[name] = asked.get(name, 0) + amount * fewest
    started: dict[str, float] = {}
    for group in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        if raw := group["rayStartParams"].get("resources"):
            for name, amount in json.loads(json.loads(raw)).items():
                started[name] = max(started.get(name, 0), amount)
    assert set(asked) <= set(started), (asked, started)
    assert all(asked[n] <= started[n] for n in asked), (asked, started)


def _node_resources(group: dict) -> dict[str, float]:
    """What Ray sees on one pod of the group: num-cpus (else the container's CPU limit), num-gpus,
    and the custom resources."""
    params, limits = group["rayStartParams"], group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpu = params.get("num-cpus", limits["cpu"])
    out = {"CPU": float(cpu[:-1]) / 1000 if str(cpu).endswith("m") else float(cpu),
           "GPU": float(params.get("num-gpus", 0))}
    if raw := params.get("resources"):
        out |= {k: float(v) for k, v in json.loads(json.loads(raw)).items()}
    return out


def _replica_needs(deployment: dict) -> tuple[dict[str, float], int, int]:
    """One replica's resources (Serve's default is one CPU), and the fewest and most replicas Serve
    may run: num_replicas, or autoscaling_config's min_replicas (Serve's default 1) and max_replicas."""
    opts = deployment.get("ray_actor_options", {})
    needs = {"CPU": opts.get("num_cpus", 1), "GPU": opts.get("num_gpus", 0), **opts.get("resources", {})}
    auto = deployment.get("autoscaling_config")
    if auto is None:
        assert deployment.get("num_replicas", 1) != "auto", "size the cluster: give autoscaling_config.max_replicas"
        return needs, deployment.get("num_replicas", 1), deployment.get("num_replicas", 1)
    return needs, auto.get("min_replicas", 1), auto["max_replicas"]


def test_the_ray_autoscaler_can_add_nodes_for_every_replica_serve_may_ask_for(manifest):
    """The in-tree autoscaler is on and every worker group may grow; each replica fits one node of some
    group, and at every group's maxReplicas the cluster holds every deployment at its most replicas
    (summed per resource: necessary, not sufficient, since nodes are bins)."""
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    workers = cluster["workerGroupSpecs"]
    for g in workers:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert g["maxReplicas"] > g["minReplicas"], f"{g['groupName']} cannot grow"
    nodes = [(_node_resources(g), g["maxReplicas"]) for g in workers]
    assert _node_resources(cluster["headGroupSpec"])["CPU"] == 0
    total: dict[str, float] = {}
    for app in _apps(manifest):
        router = app["args"]["router"]["deployment"]
        for name, d in [("router", router)] + [(b["name"], b["deployment"]) for b in app["args"]["backends"]]:
            needs, _, most = _replica_needs(d)
            assert any(all(node.get(r, 0) >= v for r, v in needs.items()) for node, _ in nodes), (name, needs)
            for r, v in needs.items():
                total[r] = total.get(r, 0) + v * most
    capacity = {r: sum(node.get(r, 0) * n for node, n in nodes) for r in total}
    assert all(total[r] <= capacity[r] for r in total), (total, capacity)


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


# -- GCS fault tolerance: Redis --

def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_gcs_fault_tolerance_points_at_the_redis_of_redis_yaml(manifest):
    ft = manifest["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert "ray.io/ft-enabled" not in manifest["metadata"].get("annotations", {}), "one way, not both"
    host, port = ft["redisAddress"].split(":")
    service = doc("Service", host)
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    redis = doc("Deployment", host)
    pod = redis["spec"]["template"]
    assert _selects(service["spec"]["selector"], pod["metadata"]["labels"])
    container = pod["spec"]["containers"][0]
    target = next(p["targetPort"] for p in service["spec"]["ports"] if p["port"] == int(port))
    assert target in [p["name"] for p in container["ports"]] + [p["containerPort"] for p in container["ports"]]
    # the password KubeRay hands to the head is the one Redis requires
    assert _env(container)["REDIS_PASSWORD"]["valueFrom"] == ft["redisPassword"]["valueFrom"]
    assert "$REDIS_PASSWORD" in " ".join(container["command"] + container["args"])
    for group in _groups(manifest):
        assert "redis-password" not in group["rayStartParams"], "KubeRay sets it from gcsFaultToleranceOptions"


def test_redis_is_pinned_persistent_and_selected_by_its_own_labels():
    redis = doc("Deployment", "switchyard-redis")
    spec = redis["spec"]
    assert _selects(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"])
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    claim = next(v["persistentVolumeClaim"]["claimName"] for v in spec["template"]["spec"]["volumes"])
    assert doc("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+(-alpine)?", spec["template"]["spec"]["containers"][0]["image"])


# -- API keys from a Secret --

def test_the_gpu_service_reads_its_api_keys_from_a_secret_in_every_container():
    """serve_config.gpu.yaml turns auth on with keys and a JWT secret from the environment; the router
    may run on any node, so every container gets them from the Secret."""
    manifest = yaml.safe_load((K8S / "rayservice-gpu.yaml").read_text())
    auth = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"]["auth"]
    assert auth["enabled"] and auth["keys_env"] == "SWITCHYARD_API_KEYS"
    for group in _groups(manifest):
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in container.get("env", [])}
            assert env[auth["keys_env"]] == {"name": "switchyard-api-keys", "key": "keys.json"}
            assert env[auth["jwt"]["secret_env"]] == {"name": "switchyard-api-keys", "key": "jwt-secret"}


def test_the_cpu_service_mounts_the_keys_but_its_config_leaves_auth_off():
    """serve_config.yaml has auth off, so the Secret is optional there and the router does not read it;
    turning auth on with the GPU config's variable names needs no manifest change."""
    manifest = yaml.safe_load((K8S / "rayservice-cpu.yaml").read_text())
    auth = _apps(manifest)[0]["args"]["auth"]
    assert not auth["enabled"] and not auth.get("keys_env")
    gpu_auth = _apps(yaml.safe_load((K8S / "rayservice-gpu.yaml").read_text()))[0]["args"]["auth"]
    names = {gpu_auth["keys_env"]: "keys.json", gpu_auth["jwt"]["secret_env"]: "jwt-secret"}
    for group in _groups(manifest):
        env = _env(group["template"]["spec"]["containers"][0])
        for name, key in names.items():
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "switchyard-api-keys", "key": key, "optional": True}
    assert "auth off" in (ROOT / "docs" / "deploy-kuberay.md").read_text()


def test_hub_checkpoints_get_a_token_from_a_secret(manifest):
    """A config that loads from the model hub (Llama 3.1 is gated) gets HF_TOKEN in every container,
    which huggingface_hub and vLLM read; the CPU default loads nothing from the hub (its models are
    embedded or inside installed packages)."""
    args = _apps(manifest)[0]["args"]
    refs = [args["router"]["tokenizer"]] + [b["model"] for b in args["backends"]]
    hub = [r for r in refs if not r.startswith(("embedded:", "package:", "/", "."))]
    for group in _groups(manifest):
        env = _env(group["template"]["spec"]["containers"][0])
        if hub:
            assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "switchyard-hf-token", "key": "token"}
        else:
            assert "HF_TOKEN" not in env


# -- pods as KubeRay makes them: labels, ports --

APP_NS = {"kubernetes.io/metadata.name": "switchyard"}  # any namespace the services are applied in


def _ray_pods() -> list[dict]:
    """Every pod KubeRay would make from the manifests: the template's labels plus KubeRay's own
    (ray-operator/controllers/ray/common/pod.go: labelPod; the Redis cleanup Job is built from the head
    pod with ray.io/node-type redis-cleanup). ray.io/cluster is a generated name under a RayService."""
    pods = []
    for where, d in DOCS:
        if d["kind"] != "RayService":
            continue
        cluster = d["spec"]["rayClusterConfig"]
        groups = [("head", "headgroup", cluster["headGroupSpec"])]
        groups += [("worker", g["groupName"], g) for g in cluster["workerGroupSpecs"]]
        if "gcsFaultToleranceOptions" in cluster:
            groups.append(("redis-cleanup", "headgroup", cluster["headGroupSpec"]))
        for node_type, group_name, group in groups:
            labels = {**group["template"].get("metadata", {}).get("labels", {}),
                      "ray.io/is-ray-node": "yes", "ray.io/cluster": d["metadata"]["name"] + "-x7k2p",
                      "ray.io/node-type": node_type, "ray.io/group": group_name,
                      "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
            pods.append({"where": where, "group": group, "labels": labels,
                         "ports": {p.get("name"): p["containerPort"] for c in group["template"]["spec"]["containers"]
                                   for p in c.get("ports", [])}})
    return pods


def _redis_pod() -> dict:
    t = doc("Deployment", "switchyard-redis")["spec"]["template"]
    return {"labels": t["metadata"]["labels"], "ports": {p["name"]: p["containerPort"] for p in t["spec"]["containers"][0]["ports"]}}


def _selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector: matchLabels and matchExpressions, or a plain map (Service)."""
    if not ({"matchLabels", "matchExpressions"} & selector.keys()):
        selector = {"matchLabels": selector}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        ok = {"In": lambda: labels.get(e["key"]) in e["values"],
              "NotIn": lambda: labels.get(e["key"]) not in e["values"],
              "Exists": lambda: e["key"] in labels, "DoesNotExist": lambda: e["key"] not in labels}[e["operator"]]()
        if not ok:
            return False
    return True


def test_metrics_port_is_declared_where_ray_exports_it(manifest):
    for group in _groups(manifest):
        port = int(group["rayStartParams"]["metrics-export-port"])
        ports = {p.get("name"): p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == port == 8080, group.get("groupName", "head")


def test_the_podmonitor_scrapes_every_ray_node_and_nothing_else():
    monitors = [d for _, d in DOCS if d["kind"] == "PodMonitor"]
    assert monitors
    for pm in monitors:
        assert pm["apiVersion"] == "monitoring.coreos.com/v1"
        selected = [p for p in _ray_pods() if _selects(pm["spec"]["selector"], p["labels"])]
        assert {p["labels"]["ray.io/node-type"] for p in selected} == {"head", "worker"}
        assert len(selected) == sum(1 for p in _ray_pods() if p["labels"]["ray.io/node-type"] != "redis-cleanup")
        assert not _selects(pm["spec"]["selector"], _redis_pod()["labels"])
        for endpoint in pm["spec"]["podMetricsEndpoints"]:
            assert all(endpoint["port"] in p["ports"] for p in selected), endpoint["port"]


# -- NetworkPolicy, evaluated as Kubernetes would --

POLICIES = [d for _, d in DOCS if d["kind"] == "NetworkPolicy"]


def _admits(source: dict, target: dict, port: int) -> bool:
    """Whether the policies let `source` ({"ns": labels, "pod": labels or None for outside the
    cluster}) reach `target` on TCP `port`. A pod no Ingress policy selects admits everything; one
    that some policy selects admits what any rule of those policies allows (the union)."""
    chosen = [p for p in POLICIES if "Ingress" in p["spec"]["policyTypes"]
              and _selects(p["spec"]["podSelector"], target["labels"])]
    if not chosen:
        return True
    for policy in chosen:
        for rule in policy["spec"].get("ingress", []):
            ports = [target["ports"].get(p["port"], p["port"]) for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            peers = rule.get("from", [])
            if not peers or any(_peer(peer, source) for peer in peers):
                return True
    return False


def _peer(peer: dict, source: dict) -> bool:
    if source["pod"] is None or "ipBlock" in peer:
        return False  # outside the cluster: only a rule without `from` admits it (no ipBlocks here)
    if "namespaceSelector" in peer:
        in_ns = _selects(peer["namespaceSelector"], source["ns"])
    else:
        in_ns = source["ns"] == APP_NS
    return in_ns and _selects(peer.get("podSelector", {}), source["pod"])


def _pods(node_type: str) -> list[dict]:
    return [p for p in _ray_pods() if p["labels"]["ray.io/node-type"] == node_type]


OUTSIDE = {"ns": {}, "pod": None}
STRANGER = {"ns": APP_NS, "pod": {"app": "something-else"}}
MONITORING = {"ns": {"kubernetes.io/metadata.name": "monitoring"}, "pod": {"app.kubernetes.io/name": "prometheus"}}
OPERATOR = {"ns": {"kubernetes.io/metadata.name": "kuberay-system"}, "pod": {"app.kubernetes.io/name": "kuberay-operator"}}


def _as_source(pod: dict) -> dict:
    return {"ns": APP_NS, "pod": pod["labels"]}


def test_networkpolicy_selects_every_pod_it_guards():
    assert POLICIES
    for p in POLICIES:
        assert p["apiVersion"] == "networking.k8s.io/v1" and p["spec"]["policyTypes"] == ["Ingress"]
    for pod in _ray_pods() + [_redis_pod()]:
        assert any(_selects(p["spec"]["podSelector"], pod["labels"]) for p in POLICIES), pod["labels"]


def test_serve_is_open_and_the_rest_of_ray_is_not():
    for pod in _pods("head") + _pods("worker"):
        assert _admits(OUTSIDE, pod, 8000), pod["where"]
        for port in (6379, 10001, 8265, 8080, 52365):
            assert not _admits(OUTSIDE, pod, port) and not _admits(STRANGER, pod, port), (pod["where"], port)
        assert _admits(MONITORING, pod, 8080) and not _admits(MONITORING, pod, 6379)
    for head in _pods("head"):
        assert _admits(OPERATOR, head, 8265) and not _admits(OPERATOR, head, 6379)
        # workers reach the head's GCS, and the heads their workers on any port Ray picks
        for worker in _pods("worker"):
            assert _admits(_as_source(worker), head, 6379) and _admits(_as_source(head), worker, 23456)
    for worker in _pods("worker"):
        assert not _admits(OPERATOR, worker, 8265)


def test_redis_admits_only_the_gcs_and_kuberays_cleanup_job():
    redis = _redis_pod()
    for pod in _ray_pods():
        expected = pod["labels"]["ray.io/node-type"] in ("head", "redis-cleanup")
        assert _admits(_as_source(pod), redis, 6379) == expected, pod["labels"]["ray.io/node-type"]
    for other in (OUTSIDE, STRANGER, MONITORING, OPERATOR):
        assert not _admits(other, redis, 6379)


# -- images and the Dockerfile --

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _images() -> list[tuple[str, str]]:
    found = []

    def walk(x, where):
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "image" and isinstance(v, str):
                    found.append((where, v))
                else:
                    walk(v, where)
        elif isinstance(x, list):
            for v in x:
                walk(v, where)

    for where, d in DOCS:
        walk(d, where)
    return found


def test_the_base_image_is_the_pinned_ray_release():
    ray_spec = next(r for r in PYPROJECT["project"]["dependencies"] if r.startswith("ray["))
    bases = re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(\w+)", DOCKERFILE)
    assert {b[3] for b in bases} == {"cpu", "gpu"}, bases
    default = re.search(r"^ARG BASE_IMAGE=rayproject/ray:(\S+)$", DOCKERFILE, re.M).group(1)
    assert default.endswith("-cpu")
    python = SpecifierSet(PYPROJECT["project"]["requires-python"])
    for version, major, minor, _ in bases:
        assert version in SpecifierSet(ray_spec.split("]", 1)[1]), (version, ray_spec)
        assert f"{major}.{minor}" in python
    manifests = {d["spec"]["rayClusterConfig"]["rayVersion"] for _, d in DOCS if d["kind"] == "RayService"}
    assert manifests == {b[0] for b in bases}


def test_every_image_is_the_dockerfiles_or_a_pinned_release():
    """The Ray containers run the app image at the project's version (the -gpu tag on GPU), the tags
    the Dockerfile's build commands make; anything else is a third-party image at an x.y.z tag."""
    built = set(re.findall(r"-t (\S+)", DOCKERFILE))
    assert built == {f"switchyard:{VERSION}", f"switchyard:{VERSION}-gpu"}, built
    for where, image in _images():
        name = image.rsplit("/", 1)[-1]
        if name.startswith("switchyard:"):
            assert name == f"switchyard:{VERSION}" + ("-gpu" if where.startswith("rayservice-gpu") else ""), (where, image)
        else:
            assert re.search(r":\d+\.\d+\.\d+[\w.-]*$", image) and "latest" not in image, (where, image)
    assert any(i.startswith("switchyard:") for _, i in _images())


def test_the_dockerfile_copies_what_exists_and_installs_as_the_makefile_does():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copies = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", DOCKERFILE, re.M)
    sources = [s for line in copies for s in line.split()]
    assert {"models", "routing", "deployments", "training", "pyproject.toml"} <= set(sources), sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert src.split("/")[0] not in ignored, f"{src} is in .dockerignore"
    assert (ROOT / "models" / "embedded").is_dir() and {".venv", ".git"} <= ignored
    # the CPU image installs the lock the Makefile installs, and runs as the base image's ray user
    lock = "--require-hashes --no-deps"
    assert lock in DOCKERFILE and "lock/requirements.txt" in DOCKERFILE and "lock" in sources
    assert f"{lock} -r lock/requirements.txt" in (ROOT / "Makefile").read_text()
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert users and users[-1] == "ray"


# -- the walkthrough --

def test_the_walkthrough_applies_every_manifest_and_pins_the_operator():
    text = (ROOT / "docs" / "deploy-kuberay.md").read_text()
    applied = set(re.findall(r"kubectl apply -f (k8s/\S+\.yaml)", text))
    assert applied == {f"k8s/{p.name}" for p in K8S.glob("*.yaml")}, applied
    assert re.search(r"helm install kuberay-operator kuberay/kuberay-operator --version \d+\.\d+\.\d+", text)
    assert "k8s/grafana-dashboard.json" in text


def test_grafana_dashboard_shows_only_metrics_the_code_records():
    """Every series a panel queries is one that deployments/ defines (Ray adds the ray_ prefix and
    Prometheus the _total, _bucket, _sum and _count suffixes), and every metric has a panel."""
    dashboard = json.loads((K8S / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queried = {re.sub(r"_(total|bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"ray_(switchyard_\w+)", e)}
    code = "".join(p.read_text() for p in (ROOT / "deployments").glob("*.py"))
    defined = set(re.findall(r'metrics\.\w+\(\s*"(switchyard_\w+)"', code))
    assert defined and queried == defined, (queried - defined, defined - queried)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    # training's own metrics (prometheus-client, scraped from the run itself: no ray_ prefix)
    training = set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(switchyard_training_\w+)"',
                              (ROOT / "training" / "metrics.py").read_text()))
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", m) for e in exprs
             for m in re.findall(r"(?<![\w])(switchyard_training_\w+)", e)}
    assert training and shown == training, (shown - training, training - shown)
