"""The cluster path for real, on one machine: a head with no task CPUs, two target nodes and two trainer nodes
joined with `ray start --address` (own ports, custom resources `target` / `trainer`), a real `mlflow server` on
loopback reached through MLFLOW_TRACKING_URI, Ray Train storage outside the driver's folder, and the job submitted
with `ray job submit`. Mid-run the raylet of a node holding a target actor is killed: the run must still finish,
with every sample trained exactly once. A sixth node cannot reach the tracking server: a job whose trainers would
land there fails at once, naming it.
"""

from __future__ import annotations

import time
import zlib

import pytest
from mlflow.tracking import MlflowClient

from tests.local_cluster import LocalCluster, MlflowServer, ray_env

EPOCHS = 2
FAST_NODE_DEATH = {  # the GCS declares a silent node dead after ~3 s instead of ~30 s
    "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


BLIND = {"http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": "",
         "no_grpc_proxy": "127.0.0.1,localhost"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    mlflow = MlflowServer(root / "mlflow").start()
    # The head exports the tracking URI, as the cluster files do; the job's driver inherits it.
    c = LocalCluster(env=ray_env(MLFLOW_TRACKING_URI=mlflow.uri, **FAST_NODE_DEATH))
    try:
        c.start()
        for i in range(2):
            c.add_node(f"target{i}", 1, {"target": 1})
        for i in range(2):
            c.add_node(f"trainer{i}", 1, {"trainer": 1})
        # A trainer node that cannot reach the tracking server (its HTTP goes to a dead proxy; Ray's own gRPC is
        # exempted), like a node behind a firewall.
        c.add_node("blind", 1, {"trainer_blind": 1}, env=BLIND)
        c.wait_for_nodes(6)
        yield c, mlflow, root
    finally:
        c.stop()
        mlflow.stop()


def submit(c: LocalCluster, job_id: str, *sets: str) -> None:
    c.submit(job_id, ["python", "-m", "jobs.train", "--preset", "tiny", *[a for s in sets for a in ("--set", s)]])


def expected_checksum(n_epochs: int) -> tuple[int, int]:
    """(samples, CRC-32 sum of their ids) the tiny preset trains, from the in-memory reference reader."""
    from eagle3.data import load_samples
    from jobs.config import load_config
    from jobs.data_prep import load_tokenizer

    cfg = load_config("tiny")
    samples, _ = load_samples(cfg.data, load_tokenizer(cfg.target.model))
    return n_epochs * len(samples), n_epochs * sum(zlib.crc32(s.sample_id.encode()) for s in samples)


def test_multinode_job_survives_losing_a_target_node(cluster):
    c, mlflow, root = cluster
    storage = root / "shared" / "checkpoints"
    submit(c, "aerie-multinode", f"output_dir={root / 'runs'}", "name=multinode",
                 "target.num_actors=2", "target.resources={target: 1}",
                 "trainer.num_workers=2", "trainer.resources={trainer: 1}", f"trainer.storage={storage}",
                 f"optim.epochs={EPOCHS}", "tracking.register_model=aerie-multinode-draft",
                 f"data.store_dir={root / 'shared' / 'tokens'}", "data.tokenizer_workers=1")
    client = MlflowClient(mlflow.uri)
    killed, killed_at, deadline = None, None, time.time() + 900
    status, polled = "RUNNING", 0.0
    while status == "RUNNING" and time.time() < deadline:
        time.sleep(0.5)
        if time.time() - polled > 3:  # `ray job status` is a CLI call (~1 s); MLflow is asked every 0.5 s
            status, polled = c.job_status("aerie-multinode"), time.time()
        if killed:
            continue
        exp = client.get_experiment_by_name("aerie")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        step = runs[0].data.metrics.get("train_step", 0) if runs else 0
        if step >= 2:  # training under way: kill the node of a live target actor
            (actor, *_) = c.list("actors", "class_name=HFTarget", "state=ALIVE")
            killed, killed_at = c.node_of(actor["node_id"]), step
            c.kill_node(next(n for n in c.nodes if n.name == killed))
    log = c.job_logs("aerie-multinode")
    assert status == "SUCCEEDED" and "[aerie] done" in log, f"{status}: {log[-6000:]}"
    assert killed and killed_at < EPOCHS * 6, f"the kill came too late to test anything (step {killed_at})"

    # Placement: 2 targets on the target nodes, 2 trainers on the trainer nodes (dead actors are listed too).
    targets = [c.node_of(a["node_id"]) for a in c.list("actors", "class_name=HFTarget")]
    trainers = [c.node_of(a["node_id"]) for a in c.list("actors", "class_name=RayTrainWorker")]
    assert sorted(targets) == ["target0", "target1"], targets
    assert sorted(trainers) == ["trainer0", "trainer1"], trainers

    # The run in the tracking server: finished, its metrics, artifacts and registered model.
    (run,) = client.search_runs([client.get_experiment_by_name("aerie").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "multinode"
    m = run.data.metrics
    samples, checksum = expected_checksum(EPOCHS)
    # Exactly once per epoch despite the lost node: the count and the checksum of the sample ids both match.
    assert m["samples_trained"] == samples and m["sample_id_checksum"] == checksum
    assert m["stream_resent"] >= 1  # the dead node's requests went to the other target
    assert {a.path for a in client.list_artifacts(run.info.run_id, "draft")} >= {"draft/config.json",
                                                                                "draft/model.safetensors"}
    (mv,) = client.search_model_versions("name='aerie-multinode-draft'")
    assert mv.run_id == run.info.run_id

    # Checkpoints went to trainer.storage, and the export reads back on the driver's machine.
    assert any(storage.joinpath("multinode").glob("checkpoint_*"))
    assert not (root / "runs" / "multinode" / "ray").exists()
    from eagle3.export import load_draft

    draft = load_draft(root / "runs" / "multinode" / "export")
    assert draft.config.draft_vocab_size == 2000


def test_tracking_server_unreachable_from_a_trainer_node_fails_before_work(cluster):
    c, mlflow, root = cluster
    t0 = time.time()
    submit(c, "aerie-blind", f"output_dir={root / 'runs'}", "name=blind", "trainer.resources={trainer_blind: 1}")
    while (status := c.job_status("aerie-blind")) == "RUNNING" and time.time() - t0 < 300:
        time.sleep(1)
    log = c.job_logs("aerie-blind")
    assert status == "FAILED", f"{status}: {log[-3000:]}"
    assert (f"MLflow tracking URI '{mlflow.uri}' answers on the driver but not on 1 of 1 trainer node(s)" in log
            and "Connection refused" in log and "MLFLOW_TRACKING_URI=http://" in log), log[-3000:]
    assert time.time() - t0 < 300
    client = MlflowClient(mlflow.uri)
    exp = client.get_experiment_by_name("aerie")
    assert exp is None or not client.search_runs([exp.experiment_id], "attributes.run_name = 'blind'")  # none opened
