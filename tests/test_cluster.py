"""Offline checks of the cluster configs in cluster/ (cluster/local.yaml runs for real in tests/test_ray_up.py).

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
auth, the MLflow server (its flags parsed by mlflow's own `mlflow server`
command) and how every node reaches it. The KubeRay RayJob has no schema in
Ray, so its required fields and conventions are checked by hand.

Across all files (launchers and KubeRay): the cluster each file starts can
place every bundle the preset it runs asks for, the preset's model and data are
what the file downloads onto the shared mount, everything the preset writes is
on that mount, and every value left to the user is marked `# FILL IN:`.
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
SHARED_K8S = CLUSTER_DIR / "kuberay-shared.yaml"
README = CLUSTER_DIR / "README.md"

PRESET = "llama3-8b-8gpu"
ENTRYPOINT_MODULE = "jobs.train"
RAY_MAJOR_MINOR = tuple(ray.__version__.split(".")[:2])
SHARED = "/mnt/aerie"  # the filesystem every node mounts, in every cluster file
MLFLOW_SERVICE = "http://aerie-mlflow:5000"  # KubeRay: the Service in cluster/kuberay-shared.yaml

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


def _shell_parts(cmd: str) -> list[list[str]]:
    """The simple commands of a shell line as words (quotes respected, redirections dropped), split on the control
    operators ; && || & | ( ). Nothing is run or expanded."""
    lex = shlex.shlex(cmd, posix=True, punctuation_chars=";&|()<>")
    lex.whitespace_split = True
    parts, words, skip = [], [], False
    for tok in lex:
        if skip:
            skip = False
        elif set(tok) <= set("<>&") and set(tok) & set("<>"):  # a redirection: drop it, its target, its fd
            skip = True
            if words and words[-1].isdigit():
                words.pop()
        elif set(tok) <= set(";&|()"):  # control operators, also run together: `&)`
            parts.append(words)
            words = []
        else:
            words.append(tok)
    return [w for w in parts + [words] if w]


@pytest.fixture(scope="module", params=sorted(LAUNCHERS))
def launcher(request):
    """(provider name, config as written, config after Ray's prepare_config)."""
    raw = _load(LAUNCHERS[request.param])
    prepared = prepare_config(copy.deepcopy(raw))
    return request.param, raw, prepared


@pytest.fixture(scope="module")
def rayjob():
    return _load(RAYJOB)


@pytest.fixture(scope="module")
def shared_k8s():
    """cluster/kuberay-shared.yaml: {(kind, name): object}."""
    with open(SHARED_K8S) as f:
        return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(f)}


@pytest.fixture(scope="module")
def preset():
    from jobs.config import load_config

    return load_config(PRESET)


def effective_setup_commands(cfg: dict, node_type: str) -> list[str]:
    """Setup commands Ray runs on a node of `node_type` (cfg: prepared)."""
    if node_type == cfg["head_node_type"]:
        return cfg["head_setup_commands"]
    node = cfg["available_node_types"][node_type]
    return node.get("worker_setup_commands", cfg["worker_setup_commands"])


def ray_start_args(commands: list[str]) -> list[str]:
    """Arguments of the single `ray start` in a list of shell commands."""
    found = [words[2:] for cmd in commands for words in _shell_parts(cmd) if words[:2] == ["ray", "start"]]
    assert len(found) == 1, f"expected one `ray start`, found {found}"
    return found[0]


def exported(commands: list[str]) -> dict[str, str]:
    """Variables the commands `export` (values as written, unexpanded)."""
    env = {}
    for cmd in commands:
        for words in _shell_parts(cmd):
            if words[0] == "export":
                env.update(w.split("=", 1) for w in words[1:] if "=" in w)
    return env


def mlflow_server_params(words: list[str]) -> dict:
    """`mlflow server` arguments parsed by mlflow's own click command (an unknown flag is an error)."""
    from mlflow.cli import server

    i = words.index("server")
    assert words[i - 1].endswith("mlflow"), words
    return server.make_context("server", words[i + 1:]).params


def hf_downloads(commands: list[str]) -> set[str]:
    """Paths that the `hf download` commands among `commands` fill: --local-dir, or local-dir/<file> per file."""
    out = set()
    for cmd in commands:
        for words in _shell_parts(cmd):
            if Path(words[0]).name == "hf" and words[1] == "download":
                local_dir = words[words.index("--local-dir") + 1]
                files, rest = [], words[3:]
                while rest and not rest[0].startswith("-"):
                    files.append(rest.pop(0))
                out |= {f"{local_dir}/{f}" for f in files} if files else {local_dir}
    return out


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
        cmds = effective_setup_commands(cfg, node_type)
        joined = " ".join(cmds)
        assert re.search(r"pip install .*\baerie\b", joined), f"{node_type} does not install aerie"
        assert ray_pin in joined, f"{node_type} does not pin {ray_pin}"
        assert re.search(r"pip install .*\btorch\b", joined), f"{node_type} does not install torch"
        if node_type == "target_gpu":
            assert '"vllm==0.33.*"' in joined, "target nodes need the vLLM backend"
        else:
            assert "vllm" not in joined, f"{node_type} does not need vllm"
        mounts = [w for c in cmds for w in _shell_parts(c) if w[:2] == ["sudo", "mount"]]
        assert len(mounts) == 1 and mounts[0][-1] == SHARED, f"{node_type} must mount the shared storage at {SHARED}"
    head_cmds = " ".join(effective_setup_commands(cfg, cfg["head_node_type"]))
    assert HEAD_SDK[name] in head_cmds, f"head autoscaler needs {HEAD_SDK[name]}"
    assert '"mlflow[auth]==3.17.*"' in head_cmds, "the head's MLflow server runs basic auth (Flask-WTF)"


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


def test_launcher_mlflow_behind_auth(launcher):
    """The head's MLflow server runs basic auth with the cluster token as admin's password, stores runs on the
    shared mount, and every node's Ray processes log to it with that password at an address other nodes reach."""
    _, raw, _ = launcher
    head_cmds, worker_cmds = raw["head_start_ray_commands"], raw["worker_start_ray_commands"]
    servers = [(c, w) for c in head_cmds for w in _shell_parts(c) if "nohup" in w and "server" in w]
    assert len(servers) == 1, "expected one `nohup mlflow server` on the head"
    (cmd, words), token = servers[0], '$(cat ~/.ray/auth_token)'
    params = mlflow_server_params(words)
    assert params["app_name"] == "basic-auth", "MLflow without auth: anyone who reaches port 5000 can delete runs"
    assert params["port"] == 5000 and params["workers"] == "1"
    assert params["backend_store_uri"] == f"sqlite:///{SHARED}/mlflow/mlflow.db"
    assert params["artifacts_destination"] == f"{SHARED}/mlflow/artifacts"
    assert f'MLFLOW_AUTH_ADMIN_PASSWORD="{token}"' in _norm(cmd)
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY=" in cmd and "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in cmd
    assert not any("mlflow server" in c for c in worker_cmds)

    for key, where in (("head_start_ray_commands", "$(hostname -I"), ("worker_start_ray_commands", "$RAY_HEAD_IP")):
        env = exported(raw[key])
        # The driver (head) hands its URI to the workers: a loopback address would not reach the head from them.
        uri = env["MLFLOW_TRACKING_URI"]
        assert uri.startswith(f"http://{where}") and uri.endswith(":5000"), f"{key}: MLFLOW_TRACKING_URI={uri}"
        assert env["MLFLOW_TRACKING_USERNAME"] == "admin" and env["MLFLOW_TRACKING_PASSWORD"] == token, key
        assert env["AERIE_CACHE"] == f"{SHARED}/cache", key


# ----------------------------------------------------------------- KubeRay


def _pod_specs(rayjob):
    """(group name, group, pod spec) for the head and each worker group."""
    spec = rayjob["spec"]["rayClusterSpec"]
    yield "head", spec["headGroupSpec"], spec["headGroupSpec"]["template"]["spec"]
    for g in spec["workerGroupSpecs"]:
        yield g["groupName"], g, g["template"]["spec"]


def _containers(rayjob, init=False):
    for name, group, pod in _pod_specs(rayjob):
        for c in pod["containers"] + (pod.get("initContainers", []) if init else []):
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


def test_rayjob_runtime_env(rayjob):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert isinstance(env, dict)
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    RuntimeEnv(**env)  # Ray's own type checks (env_vars must be str -> str, ...)
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == MLFLOW_SERVICE
    assert env["env_vars"]["MLFLOW_TRACKING_USERNAME"] == "admin"
    assert env["env_vars"]["AERIE_CACHE"] == f"{SHARED}/cache"


def test_rayjob_ray_version_and_image(rayjob, shared_k8s):
    version = rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    assert isinstance(version, str), "quote rayVersion, or YAML may read it as a number"
    assert tuple(version.split(".")[:2]) == RAY_MAJOR_MINOR, (
        f"rayVersion {version} vs installed ray {ray.__version__}"
    )
    mlflow_pod = shared_k8s["Deployment", "aerie-mlflow"]["spec"]["template"]["spec"]
    images = {c["image"] for _, _, c in _containers(rayjob, init=True)} | {c["image"] for c in mlflow_pod["containers"]}
    assert len(images) == 1, f"head, workers, init container and MLflow must share one image: {images}"
    (image,) = images
    assert version in image.rsplit(":", 1)[-1], f"image tag should name Ray {version}"


def kuberay_node_resources(group: dict) -> dict[str, float]:
    """The Ray resources KubeRay starts a pod of `group` with: rayStartParams num-cpus/num-gpus, else the Ray
    container's CPU limit (else request) and nvidia.com/gpu limit (ray-operator common/pod.go
    generateRayStartCommand), plus the custom resources in rayStartParams."""
    params = group["rayStartParams"]
    res = group["template"]["spec"]["containers"][0]["resources"]
    cpu = params.get("num-cpus") or res.get("limits", {}).get("cpu") or res.get("requests", {}).get("cpu") or 0
    gpu = params.get("num-gpus") or res.get("limits", {}).get("nvidia.com/gpu") or 0
    custom = json.loads(shlex.split(params["resources"])[0]) if "resources" in params else {}
    return {"CPU": float(cpu), "GPU": float(gpu), **custom}


def test_rayjob_worker_groups_gpus_and_resources(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == set(GROUP_ROLES)
    assert cluster["enableInTreeAutoscaling"] is False, "fixed size: replicas are what the job gets"

    head_params = cluster["headGroupSpec"]["rayStartParams"]
    assert head_params.get("num-cpus") == "0", "the head must not schedule tasks"

    for name, role in GROUP_ROLES.items():
        g = groups[name]
        params = g["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), "rayStartParams values must be strings"
        assert g["minReplicas"] == g["replicas"] == g["maxReplicas"], f"{name}: a fixed-size group"
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


def test_rayjob_shared_volume(rayjob, shared_k8s):
    """Every Ray pod mounts the ReadWriteMany claim at the shared path; the claim is in kuberay-shared.yaml."""
    for name, _, pod in _pod_specs(rayjob):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        for c in pod["containers"] + pod.get("initContainers", []):
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert claims.get(mounts.get(SHARED)) == "aerie-shared", f"{name}/{c['name']} must mount {SHARED}"
    pvc = shared_k8s["PersistentVolumeClaim", "aerie-shared"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every Ray pod mounts it at once"


def test_rayjob_mlflow_behind_auth(rayjob, shared_k8s):
    """MLflow (kuberay-shared.yaml) runs basic auth, with admin's password from the aerie-mlflow Secret that every
    Ray container reads too; its Service is the URI the job logs to; it accepts that Host header."""
    password = {"secretKeyRef": {"name": "aerie-mlflow", "key": "password"}}
    for name, _, c in _containers(rayjob):
        env = {e["name"]: e.get("valueFrom") for e in c.get("env", [])}
        assert env.get("MLFLOW_TRACKING_PASSWORD") == password, f"{name}: rank 0 and the driver need the password"

    mlflow = shared_k8s["Deployment", "aerie-mlflow"]["spec"]["template"]["spec"]["containers"][0]
    params = mlflow_server_params(mlflow["command"])
    assert params["app_name"] == "basic-auth", "MLflow without auth: any pod in the cluster can delete runs"
    env = {e["name"]: e.get("valueFrom", e.get("value")) for e in mlflow["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == password
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == {"secretKeyRef": {"name": "aerie-mlflow", "key": "flask-secret"}}
    host = MLFLOW_SERVICE.removeprefix("http://")
    assert host in params["allowed_hosts"].split(","), "MLflow would refuse the job's Host header"
    service = shared_k8s["Service", MLFLOW_SERVICE.split("//")[1].split(":")[0]]
    assert service["spec"]["ports"][0]["port"] == int(host.split(":")[1])
    assert service["spec"]["selector"] == shared_k8s["Deployment", "aerie-mlflow"]["spec"]["selector"]["matchLabels"]


# ------------------------------------------------------------- cross-check


def test_cluster_presets_exist(preset):
    """The preset the cluster files name exists, validates, and asks for the custom resources the node types
    offer: one `target` unit + 1 GPU per target actor, one `trainer` unit + 1 GPU per train worker."""
    assert preset.target.resources == {"target": 1} and preset.target.gpus_per_actor == 1
    assert preset.trainer.resources == {"trainer": 1} and preset.trainer.use_gpu
    assert preset.target.num_actors + preset.trainer.num_workers == 8


def preset_bundles(cfg) -> list[tuple[str, dict[str, float]]]:
    """The placement-group bundles a run asks for: the very functions jobs/targets.py (start_target_actors) and
    jobs/train.py (fit: ScalingConfig.resources_per_worker) use. Train V2's controller and the job driver take 0
    CPUs."""
    from jobs.targets import target_bundles
    from jobs.train import worker_bundle

    return [(f"target {i}", b) for i, b in enumerate(target_bundles(cfg.target))] + [
        (f"trainer {i}", worker_bundle(cfg)) for i in range(cfg.trainer.num_workers)]


def cluster_nodes(name: str) -> list[tuple[str, dict[str, float]]]:
    """The nodes each cluster file starts with: launchers min_workers x resources (plus the head), KubeRay the
    head and replicas x the resources KubeRay gives each pod."""
    if name in LAUNCHERS:
        raw = _load(LAUNCHERS[name])
        nodes = []
        for node_type, node in raw["available_node_types"].items():
            count = 1 if node_type == raw["head_node_type"] else node.get("min_workers", 0)
            nodes += [(f"{node_type} {i}", dict(node["resources"])) for i in range(count)]
        return nodes
    nodes = []
    for group_name, group, _ in _pod_specs(_load(RAYJOB)):
        count = 1 if group_name == "head" else group["replicas"]
        nodes += [(f"{group_name} {i}", kuberay_node_resources(group)) for i in range(count)]
    return nodes


def first_fit(bundles, nodes) -> dict[str, str]:
    """Place bundles, biggest first (GPUs, then CPUs), each on the first node with room for all of it. A placement
    found this way is one Ray can take; first-fit may miss a cleverer packing, which only makes this stricter."""
    free = {n: dict(r) for n, r in nodes}
    where = {}
    for label, want in sorted(bundles, key=lambda b: (-b[1].get("GPU", 0), -b[1].get("CPU", 0))):
        node = next((n for n, have in free.items() if all(have.get(k, 0) >= v for k, v in want.items())), None)
        assert node is not None, f"no node can place {label} {want}; free after the others: {free}"
        for k, v in want.items():
            free[node][k] -= v
        where[label] = node
    return where


@pytest.mark.parametrize("name", [*sorted(LAUNCHERS), "kuberay"])
def test_cluster_places_every_bundle_of_its_preset(name, preset):
    """The cluster a file starts (no autoscaler help) places the preset's target and trainer bundles, both groups
    at once; target bundles land on target nodes and trainer bundles on trainer nodes."""
    where = first_fit(preset_bundles(preset), cluster_nodes(name))
    for label, node in where.items():
        assert node.startswith(label[0]), f"{label} landed on {node}"  # target_gpu/targets, trainer_gpu/trainers


def test_first_fit_refuses_what_does_not_fit():
    with pytest.raises(AssertionError, match="no node can place target 1"):
        first_fit([("target 0", {"GPU": 1, "target": 1}), ("target 1", {"GPU": 1, "target": 1})],
                  [("head", {"CPU": 0}), ("targets 0", {"CPU": 8, "GPU": 1, "target": 1})])


def setup_steps(name: str) -> list[str]:
    """The commands that prepare the shared mount: the launchers' head setup, the KubeRay head's init container."""
    if name in LAUNCHERS:
        return prepare_config(_load(LAUNCHERS[name]))["head_setup_commands"]
    (init,) = _load(RAYJOB)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["initContainers"]
    assert init["command"] == ["sh", "-ec"], init["command"]  # -e: a failed download stops the pod
    return init["args"]


@pytest.mark.parametrize("name", [*sorted(LAUNCHERS), "kuberay"])
def test_cluster_fetches_preset_model_and_data_onto_shared_mount(name, preset):
    """What the preset reads is what the file downloads; what it writes is on the shared mount too."""
    fetched = hf_downloads(setup_steps(name))
    assert preset.target.model in fetched, f"{name} does not download {preset.target.model}: {fetched}"
    assert preset.data.path in fetched, f"{name} does not download {preset.data.path}: {fetched}"
    for what, path in [("output_dir", preset.output_dir), ("trainer.storage", preset.trainer.storage),
                       ("data.store_dir", preset.data.store_dir)]:
        assert path.startswith(f"{SHARED}/"), f"{what}={path!r} is not on the shared mount {SHARED}"


# ------------------------------------------------------------ FILL IN marks

FILL_IN = re.compile(r"\bFILL_IN_[A-Z0-9_]+")


def fill_in_marks(path: Path) -> dict[str, bool]:
    """{FILL_IN_... value: marked}: marked when `# FILL IN:` ends its line, or is in the comment block just above
    the YAML entry that holds it (a value inside a multi-line command cannot carry a comment of its own)."""
    lines = path.read_text().splitlines()

    def indent(line):
        return len(line) - len(line.lstrip())

    def entry(i):  # the line that starts the block scalar holding line i, else line i itself
        for k in range(i - 1, -1, -1):
            if lines[k].strip() and indent(lines[k]) < indent(lines[i]):
                return k if re.search(r"[>|][-+]?$", lines[k].split(" #")[0].rstrip()) else i
        return i

    marks = {}
    for i, line in enumerate(lines):
        code = "" if line.lstrip().startswith("#") else line.split(" #", 1)[0]
        for token in FILL_IN.findall(code):
            k, above = entry(i), []
            while k > 0 and lines[k - 1].lstrip().startswith("#"):
                k -= 1
                above.append(lines[k])
            marked = "# FILL IN:" in line or any("# FILL IN:" in a for a in above)
            marks[token] = marks.get(token, True) and marked
    return marks


@pytest.mark.parametrize("path", sorted(CLUSTER_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_user_values_are_marked_fill_in(path):
    marks = fill_in_marks(path)
    unmarked = [t for t, ok in marks.items() if not ok]
    assert not unmarked, f"{path.name}: {unmarked} lack a `# FILL IN: <what>` comment"
    text = path.read_text()
    assert "# FILL IN:" not in text or marks, f"{path.name}: a `# FILL IN:` comment with no FILL_IN_ value"
    for stale in ("PLACEHOLDER", "your-gcp-project", "ghcr.io/aerie-project"):
        assert stale not in text, f"{path.name}: unmarked placeholder {stale!r}: spell it FILL_IN_... with the mark"
    undocumented = [t for t in marks if t not in README.read_text()]
    assert not undocumented, f"cluster/README.md does not explain {undocumented}"


def test_fill_in_check_catches_an_unmarked_value(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("a: FILL_IN_A  # FILL IN: a\ncmds:\n  # FILL IN: b\n  - >-\n    mount\n    FILL_IN_B:/ /mnt\n"
                 "# about c\nc: FILL_IN_C\n")
    assert fill_in_marks(f) == {"FILL_IN_A": True, "FILL_IN_B": True, "FILL_IN_C": False}
