"""Offline checks of the cluster configs in cluster/.

Nothing here talks to a cloud, starts Ray or needs credentials.

Launcher YAMLs (cluster/aws.yaml, cluster/gcp.yaml) go through the same two
offline steps `ray up` runs before it touches the cloud
(ray.autoscaler._private.commands._bootstrap_config):

  1. prepare_config: shallow-merges the file over the provider's defaults.yaml
     shipped with Ray (top-level keys in our file win whole), prepends
     setup_commands to head_/worker_setup_commands, validates the docker
     block, fills per-node-type min/max_workers.
  2. validate_config: Ray's ray-schema.json (jsonschema; unknown keys rejected
     at the top level and inside each node type, resources must be
     non-negative integers), `cluster_synced_files` present, head_node_type is
     one of available_node_types, sum of min_workers <= max_workers.

What `ray up` does between and after those steps needs the cloud and is NOT
checked: fillout_available_node_types_resources (AWS describe-instance-types)
and provider bootstrap_config (IAM, subnets, security groups, key pairs, GCP
project). Because of the first, the YAMLs state CPU/GPU counts explicitly, and
the GPU counts are cross-checked here against the instance/machine type.

On top of Ray's validation: node-type roles and custom resources, the setup
commands each node type really runs (a node type's own worker_setup_commands
replace the global list, as in autoscaler._get_node_type_specific_fields), the
`ray start` flags (parsed by Ray 2.60's own `ray start` click command), token
auth and the MLflow server. The KubeRay RayJob has no schema in Ray, so its
required fields and conventions are checked by hand.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_DIR = Path(__file__).resolve().parents[1] / "cluster"
LAUNCHERS = {"aws": CLUSTER_DIR / "aws.yaml", "gcp": CLUSTER_DIR / "gcp.yaml"}
RAYJOB = CLUSTER_DIR / "kuberay-rayjob.yaml"

PRESET = "llama3-8b-8gpu"
ENTRYPOINT_MODULE = "jobs.train"
RAY_MAJOR_MINOR = tuple(ray.__version__.split(".")[:2])

# worker node type / worker group -> the custom resource it advertises
ROLES = {"target_gpu": "target", "trainer_gpu": "trainer"}
GROUP_ROLES = {"targets": "target", "trainers": "trainer"}

# GPUs per AWS instance type (only the types worth using here; add a row when
# you switch types, so the GPU count in `resources` stays checked).
AWS_GPUS = {
    "g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.8xlarge": 1,
    "g5.12xlarge": 4, "g5.24xlarge": 4, "g5.48xlarge": 8,
    "g6e.xlarge": 1, "g6e.2xlarge": 1, "g6e.4xlarge": 1, "g6e.8xlarge": 1,
    "g6e.12xlarge": 4, "g6e.24xlarge": 4, "g6e.48xlarge": 8,
    "p4d.24xlarge": 8, "p4de.24xlarge": 8,
    "p5.48xlarge": 8, "p5e.48xlarge": 8, "p5en.48xlarge": 8,
}
# Provider SDK the head's autoscaler imports to launch workers.
HEAD_SDK = {"aws": "boto3", "gcp": "google-api-python-client"}


def _load(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def _norm(cmd: str) -> str:
    return " ".join(cmd.split())


@pytest.fixture(scope="module", params=sorted(LAUNCHERS))
def launcher(request):
    """(provider name, config as written, config after Ray's prepare_config)."""
    raw = _load(LAUNCHERS[request.param])
    prepared = prepare_config(copy.deepcopy(raw))
    return request.param, raw, prepared


@pytest.fixture(scope="module")
def rayjob():
    return _load(RAYJOB)


def effective_setup_commands(cfg: dict, node_type: str) -> list[str]:
    """Setup commands Ray runs on a node of `node_type` (cfg: prepared)."""
    if node_type == cfg["head_node_type"]:
        return cfg["head_setup_commands"]
    node = cfg["available_node_types"][node_type]
    return node.get("worker_setup_commands", cfg["worker_setup_commands"])


def ray_start_args(commands: list[str]) -> list[str]:
    """Arguments of the single `ray start` in a list of shell commands."""
    found = []
    for cmd in commands:
        for part in re.split(r";|&&|\|\|", _norm(cmd)):
            words = shlex.split(part)
            if words[:2] == ["ray", "start"]:
                found.append(words[2:])
    assert len(found) == 1, f"expected one `ray start`, found {found}"
    return found[0]


# --------------------------------------------------------------- launchers


def test_launcher_passes_ray_validation(launcher):
    name, raw, prepared = launcher
    assert raw["provider"]["type"] == name
    validate_config(prepared)  # raises on any schema or consistency error
    # Our node types replace the defaults' ones wholesale (shallow merge).
    assert set(prepared["available_node_types"]) == set(raw["available_node_types"])


def test_launcher_node_types(launcher):
    _, raw, cfg = launcher
    types = raw["available_node_types"]
    head = raw["head_node_type"]
    assert head in types
    assert set(types) == {head, *ROLES}, "expected a head plus target_gpu and trainer_gpu"

    head_res = types[head]["resources"]
    assert head_res.get("CPU") == 0, "the head must not schedule tasks"
    assert not head_res.get("GPU")
    assert not set(head_res) & set(ROLES.values())
    assert cfg["available_node_types"][head]["max_workers"] == 0

    for node_type, role in ROLES.items():
        node = types[node_type]
        res = node["resources"]
        assert res.get("GPU", 0) >= 1, f"{node_type} needs GPUs"
        assert res.get("CPU", 0) >= 1, f"{node_type} needs CPUs"
        # One unit of the custom resource per GPU.
        assert res.get(role) == res["GPU"], f"{node_type} must advertise {role}: GPU count"
        other = set(ROLES.values()) - {role}
        assert not other & set(res), f"{node_type} advertises the other role"
        lo, hi = node.get("min_workers", 0), node["max_workers"]
        assert 0 <= lo <= hi <= raw["max_workers"], node_type


def test_launcher_gpu_counts_match_hardware(launcher):
    name, raw, _ = launcher
    for node_type, node in raw["available_node_types"].items():
        nc, gpus = node["node_config"], node["resources"].get("GPU", 0)
        if name == "aws":
            itype = nc["InstanceType"]
            if gpus:
                assert itype in AWS_GPUS, f"add {itype} to AWS_GPUS"
                assert AWS_GPUS[itype] == gpus, f"{node_type}: {itype} has {AWS_GPUS[itype]} GPUs"
            else:
                assert itype not in AWS_GPUS, f"{node_type} pays for unused GPUs"
        else:
            accels = nc.get("guestAccelerators", [])
            assert sum(a["acceleratorCount"] for a in accels) == gpus, node_type
            if gpus:
                # GPU VMs cannot live-migrate; GCE rejects MIGRATE for them.
                assert nc["scheduling"]["onHostMaintenance"] == "TERMINATE", node_type
            assert "deeplearning-platform-release" in (
                nc["disks"][0]["initializeParams"]["sourceImage"]
            )


def test_launcher_setup_commands(launcher):
    name, _, cfg = launcher
    ray_pin = f"ray[default,train]=={ray.__version__}"
    for node_type in cfg["available_node_types"]:
        cmds = " ".join(effective_setup_commands(cfg, node_type))
        assert re.search(r"pip install .*\baerie\b", cmds), f"{node_type} does not install aerie"
        assert ray_pin in cmds, f"{node_type} does not pin {ray_pin}"
        assert re.search(r"pip install .*\btorch\b", cmds), f"{node_type} does not install torch"
        if node_type == "target_gpu":
            assert '"vllm==0.33.*"' in cmds, "target nodes need the vLLM backend"
        else:
            assert "vllm" not in cmds, f"{node_type} does not need vllm"
    head_cmds = " ".join(effective_setup_commands(cfg, cfg["head_node_type"]))
    assert HEAD_SDK[name] in head_cmds, f"head autoscaler needs {HEAD_SDK[name]}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic, via ray.serve
def test_launcher_start_commands(launcher):
    from ray.scripts.scripts import start  # Ray 2.60's own `ray start` CLI

    _, _, cfg = launcher
    head_cmds, worker_cmds = cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]

    head_args = ray_start_args(head_cmds)
    assert _norm(" ".join(head_args)) == (
        "--head --port=6379 --object-manager-port=8076 "
        "--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=0.0.0.0"
    )
    params = start.make_context("start", head_args).params  # unknown flag -> error
    assert params["head"] and params["port"] == 6379 and params["object_manager_port"] == 8076

    worker_args = ray_start_args(worker_cmds)
    assert worker_args == ["--address=$RAY_HEAD_IP:6379", "--object-manager-port=8076"]
    # The updater substitutes RAY_HEAD_IP; parse as Ray would see it.
    params = start.make_context(
        "start", [a.replace("$RAY_HEAD_IP", "10.0.0.1") for a in worker_args]
    ).params
    assert params["address"] == "10.0.0.1:6379" and not params["head"]


def test_launcher_token_auth(launcher):
    _, raw, _ = launcher
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start_cmd = next(c for c in raw[key] if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start_cmd, f"{key}: ray start without token auth"
    # The token file travels to every node (ray start won't create one).
    assert raw["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_launcher_starts_mlflow_on_head(launcher):
    _, raw, _ = launcher
    cmds = " ".join(_norm(c) for c in raw["head_start_ray_commands"])
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in cmds
    assert (
        "mlflow server --workers 1 --host 0.0.0.0 --port 5000 "
        "--backend-store-uri sqlite:////home/ubuntu/mlflow.db"
    ) in cmds
    assert not any("mlflow server" in c for c in raw["worker_start_ray_commands"])


# ----------------------------------------------------------------- KubeRay


def _containers(rayjob):
    spec = rayjob["spec"]["rayClusterSpec"]
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec["workerGroupSpecs"]
    ]
    for name, group in groups:
        for c in group["template"]["spec"]["containers"]:
            yield name, group, c


def test_rayjob_required_fields(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert cluster["workerGroupSpecs"]
    for g in cluster["workerGroupSpecs"]:
        assert g["groupName"] and isinstance(g["replicas"], int)
        assert g["template"]["spec"]["containers"][0]["image"]
        assert g.get("minReplicas", 0) <= g["replicas"] <= g.get("maxReplicas", g["replicas"])


def test_rayjob_entrypoint(rayjob):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", ENTRYPOINT_MODULE]
    assert argv[argv.index("--preset") + 1] == PRESET
    assert argv[argv.index("--set") + 1] == "tracking.uri=http://mlflow.mlflow.svc:5000"


def test_rayjob_runtime_env(rayjob):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert isinstance(env, dict)
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    RuntimeEnv(**env)  # Ray's own type checks (env_vars must be str -> str, ...)
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow.svc:5000"


def test_rayjob_ray_version_and_image(rayjob):
    version = rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    assert isinstance(version, str), "quote rayVersion, or YAML may read it as a number"
    assert tuple(version.split(".")[:2]) == RAY_MAJOR_MINOR, (
        f"rayVersion {version} vs installed ray {ray.__version__}"
    )
    images = {c["image"] for _, _, c in _containers(rayjob)}
    assert len(images) == 1, f"head and workers must share one image: {images}"
    (image,) = images
    assert version in image.rsplit(":", 1)[-1], f"image tag should name Ray {version}"


def test_rayjob_worker_groups_gpus_and_resources(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == set(GROUP_ROLES)

    head_params = cluster["headGroupSpec"]["rayStartParams"]
    assert head_params.get("num-cpus") == "0", "the head must not schedule tasks"

    for name, role in GROUP_ROLES.items():
        g = groups[name]
        params = g["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), "rayStartParams values must be strings"
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus = int(limits["nvidia.com/gpu"])
        assert gpus >= 1, f"{name} needs nvidia.com/gpu"
        # KubeRay passes the value through a shell: '"{\"target\": 1}"'.
        words = shlex.split(params["resources"])
        assert len(words) == 1, params["resources"]
        custom = json.loads(words[0])
        assert not {"CPU", "GPU", "memory"} & set(custom), "use num-cpus/num-gpus instead"
        assert custom == {role: gpus}, f"{name} must advertise {role}: GPU count"


def test_rayjob_token_auth(rayjob):
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"


# ------------------------------------------------------------- cross-check


def test_cluster_presets_exist():
    """The preset the cluster files name exists, validates, and asks for the custom resources the node types
    offer: one `target` unit + 1 GPU per target actor, one `trainer` unit + 1 GPU per train worker."""
    from jobs.config import PRESETS, load_config

    assert PRESET in PRESETS
    cfg = load_config(PRESET)
    assert cfg.target.resources == {"target": 1} and cfg.target.gpus_per_actor == 1
    assert cfg.trainer.resources == {"trainer": 1} and cfg.trainer.use_gpu
    assert cfg.target.num_actors + cfg.trainer.num_workers == 8
