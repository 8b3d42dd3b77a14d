"""The cluster path's inputs: where a run keeps its checkpoints (trainer.storage: a shared path or a pyarrow URI),
where it logs (tracking.uri, else $MLFLOW_TRACKING_URI, probed from the trainer nodes) and whether the cluster can
ever hold what it asks for; each with a clear error at once for what cannot work."""

from __future__ import annotations

import time

import pytest

from jobs import train
from jobs.config import load_config


def cfg_with(tmp_path, *sets):
    return load_config("tiny", None, [f"output_dir={tmp_path}", "name=st", *sets])


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cfg_with(tmp_path).tracking_uri() == f"sqlite:///{tmp_path / 'st' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.2:5000")  # what the cluster files export
    assert cfg_with(tmp_path).tracking_uri() == "http://10.0.0.2:5000"
    assert cfg_with(tmp_path, "tracking.uri=http://other:5000").tracking_uri() == "http://other:5000"


def test_storage_path_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cfg_with(tmp_path).storage_path() == str(tmp_path / "st" / "ray")
    assert cfg_with(tmp_path, "trainer.storage=shared/ckpt").storage_path() == str(tmp_path / "shared" / "ckpt")
    assert cfg_with(tmp_path, "trainer.storage=s3://bucket/runs").storage_path() == "s3://bucket/runs"


@pytest.mark.parametrize("uri, why", [("hdfs://namenode:8020/runs", "libjvm"),
                                      ("nosuchfs://bucket/runs", "Unrecognized filesystem type")])
def test_storage_whose_filesystem_is_missing_fails_at_once(tmp_path, uri, why):
    t0 = time.time()
    with pytest.raises(ValueError, match=f"(?s)trainer.storage='{uri}': its filesystem is not available here.*{why}"):
        train.main(["--preset", "tiny", "--set", f"output_dir={tmp_path}", "--set", f"trainer.storage={uri}"])
    assert time.time() - t0 < 30
    assert not (tmp_path / "aerie" / "mlflow.db").exists()  # nothing opened


def test_checkpoints_are_found_and_cleared_through_the_storage_filesystem(tmp_path):
    storage = tmp_path / "elsewhere"
    cfg = cfg_with(tmp_path, f"trainer.storage=file://{storage}")
    assert not train.has_checkpoints(cfg)
    (storage / "st" / "checkpoint_2026-12-02_00-00-00.000000").mkdir(parents=True)
    (storage / "st" / "checkpoint_manager_snapshot.json").write_text("{}")
    assert train.has_checkpoints(cfg)
    train.check_rerun(cfg, fresh=True)
    assert not (storage / "st").exists() and storage.exists()


def test_probe_names_the_node_that_cannot_reach_the_store(ray_local, tmp_path):
    """The probe runs on the trainer nodes themselves; here the driver's node stands in for one, with a sqlite file
    that does not exist there."""
    cfg = cfg_with(tmp_path, f"tracking.uri=sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}")
    with pytest.raises(ConnectionError, match=r"(?s)answers on the driver but not on 1 of 1 trainer node\(s\): node "
                                              r".*does not exist on this node.*MLFLOW_TRACKING_URI=http://"):
        train.check_tracking_from_trainer_nodes(cfg, skip_driver_node=False)
    ok = cfg_with(tmp_path, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    from jobs.tracking import ensure_sqlite_store

    ensure_sqlite_store(ok.tracking_uri())
    train.check_tracking_from_trainer_nodes(ok, skip_driver_node=False)  # reachable: no error


def test_gpu_trainers_on_a_cluster_without_gpus_fail_at_once(ray_local, tmp_path):
    t0 = time.time()
    with pytest.raises(ValueError, match=r"(?s)cannot place train workers .*no node offers GPU: 1"):
        train.main(["--preset", "tiny", "--set", f"output_dir={tmp_path}", "--set", "trainer.use_gpu=true"])
    assert time.time() - t0 < 60


@pytest.mark.parametrize("native_bf16", [True, False])
def test_frozen_weights_travel_in_the_target_dtype_and_train_the_same(native_bf16, monkeypatch):
    """bf16 target: the embeddings/lm_head leave the actor in bf16 (half the bytes of fp32, one tensor when tied),
    and the Learner built from them holds the same numbers as one built from fp32 copies; the teacher's head stays
    in bf16 (its matmuls run in the target's dtype) where the trainer multiplies bf16 natively, else it is fp32
    (an AVX2 CPU emulates bf16 matmuls ~180x slower than fp32)."""
    import torch

    from eagle3 import numerics

    monkeypatch.setattr(numerics, "native_matmul", lambda dtype, device: native_bf16 or dtype == torch.float32)

    from actors.hf_backend import HFTarget, TargetConfig
    from actors.models import TINY
    from actors.protocol import FrozenWeights
    from eagle3.vocab import VocabMap
    from jobs.train_loop import Learner, draft_config_for

    target = HFTarget(TargetConfig(model=TINY, dtype="bfloat16"))
    w = target.frozen_weights()
    assert w.embed_tokens.dtype == w.lm_head.dtype == torch.bfloat16 and w.embed_tokens.device.type == "cpu"
    cfg = load_config("tiny", None, ["draft.vocab_size=100"])
    info = target.info()
    d2t, t2d = torch.zeros(100, dtype=torch.long), torch.zeros(info.vocab_size, dtype=torch.bool)
    t2d[:100] = True
    vocab = VocabMap(d2t=d2t, t2d=t2d)
    dc = draft_config_for(info, 100)
    a = Learner(cfg, dc, w, vocab, 10, torch.device("cpu"))
    b = Learner(cfg, dc, FrozenWeights(w.embed_tokens.float(), w.lm_head.float()), vocab, 10, torch.device("cpu"))
    assert a.draft.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(a.draft.embed_tokens.weight.float(), b.draft.embed_tokens.weight)
    assert torch.equal(a.head.weight.float(), b.head.weight)
    assert a.head.weight.dtype == (torch.bfloat16 if native_bf16 else torch.float32)
