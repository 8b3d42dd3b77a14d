"""The per-worker train loop run by Ray Train: stream target features, TTT step, AdamW, checkpoints, metrics.

`Learner` is the Ray-free part (draft + TargetHead + optimizer + one step), shared with the golden-curve test;
`train_loop_per_worker` adds data sharding, the feature stream, DDP, checkpoints and tracking.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from actors.cpu_pin import pin_cores
from actors.protocol import FrozenWeights, RelabelRequest, RelabelResult, TargetBatch, TargetInfo
from eagle3.data import Batch
from eagle3.feedback import (Branches, DraftSamples, branch_feed, branch_targets, sample_draft_path, select_branches,
                             survival_weights)
from eagle3.loss import simulated_accept_length, step_weights
from eagle3.model import DraftConfig, Eagle3Draft
from eagle3 import numerics
from eagle3.token_store import ShardView
from eagle3.target_head import TargetHead
from eagle3.ttt import (StepLabels, TokenFeed, TTTConfig, TTTOutput, data_feed, data_label_mask, data_targets,
                        ttt_unroll)
from eagle3.vocab import VocabMap
from jobs.config import JobConfig, OptimConfig


def draft_config_for(info: TargetInfo, draft_vocab_size: int) -> DraftConfig:
    """The draft config a target implies; raises if the target's own report disagrees with its HF config."""
    from transformers import AutoConfig

    hf = dict(info.hf_config)
    hf_cfg = AutoConfig.for_model(hf.pop("model_type"), **hf)
    cfg = DraftConfig.from_target_config(hf_cfg, draft_vocab_size=draft_vocab_size, aux_layer_ids=info.aux_layer_ids)
    checks = {"hidden_size": (cfg.hidden_size, info.hidden_size), "vocab_size": (cfg.vocab_size, info.vocab_size),
              "num_layers": (cfg.target_num_layers, info.num_layers),
              "max_position_embeddings": (cfg.max_position_embeddings, info.max_position_embeddings)}
    bad = {k: v for k, v in checks.items() if v[0] != v[1]}
    if bad:
        raise ValueError(f"target info disagrees with its config: {bad}")
    return cfg


class TTTModule(nn.Module):
    """Wraps the draft so DDP sees one forward per step (DDP syncs gradients of what forward() ran)."""

    def __init__(self, draft: Eagle3Draft, cfg: TTTConfig) -> None:
        super().__init__()
        self.draft, self.cfg = draft, cfg

    def forward(self, aux_hidden: Tensor, batch: Batch, feed: TokenFeed, targets: StepLabels,
                denominators: Tensor | None) -> TTTOutput:
        return ttt_unroll(self.draft, aux_hidden, batch.position_ids, batch.doc_ids, feed, targets, self.cfg,
                          denominators)


@dataclass
class BranchPlan:
    """The fed path chosen for one batch before its relabel is requested (draft/target token feedback)."""

    branches: Branches  # on the trainer device
    samples: DraftSamples | None  # what the draft sampled ('draft' mode), else None
    request: RelabelRequest  # what goes to the target actor (CPU tensors)


def adamw(params: list[nn.Parameter], o: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where it has one (CPU, CUDA): one pass over every parameter instead of the
    foreach loop, ~6x less optimizer time on CPU at the demo's draft (BENCHMARKS.md); the same update rule."""
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay,
                             fused=device.type in ("cpu", "cuda"))


def lr_lambda(optim: OptimConfig, total_steps: int):
    """Linear warmup to 1, then cosine to min_lr_ratio at total_steps."""

    def f(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@dataclass
class StepResult:
    loss: float
    loss_k: list[float]
    correct_k: list[int]
    count_k: list[int]
    grad_norm: float
    lr: float
    survival_k: list[float] | None = None  # 'draft' mode: mean greedy survival of the fed chain at each step


def autocast_bf16(setting: bool | str, device: torch.device) -> bool:
    """optim.bf16 on `device`: 'auto' = where bf16 matmuls are native; true = on CPU, and on CUDA that supports it."""
    if setting == "auto":
        return numerics.native_matmul(torch.bfloat16, device)
    return bool(setting) and (device.type == "cpu" or device.type == "cuda" and torch.cuda.is_bf16_supported())


class Learner:
    """Draft + frozen TargetHead + AdamW/warmup-cosine; `step(target_batch)` does one optimizer step."""

    def __init__(self, cfg: JobConfig, draft_cfg: DraftConfig, weights: FrozenWeights, vocab: VocabMap,
                 total_steps: int, device: torch.device) -> None:
        torch.manual_seed(cfg.optim.seed)
        self.cfg, self.device = cfg, device
        # Frozen weights arrive in the target's dtype and stay in it: the draft casts what it looks up, and the
        # teacher's matmuls run in it (bf16 targets: AMX / tensor cores), softmax in fp32 (see TargetHead).
        self.draft = Eagle3Draft(draft_cfg, embed_weight=weights.embed_tokens)
        self.draft.set_vocab_map(vocab.d2t, vocab.t2d)
        if cfg.draft.init_lm_head == "target":
            # After the random init, so every other weight (and the RNG stream) is the same as with 'random'.
            self.draft.init_lm_head_from(weights.lm_head)
        self.draft.to(device)
        # Except where this device has no native matmul in that dtype (a bf16 target's lm_head on an AVX2 trainer):
        # then fp32, which is also more precise.
        head_dtype = numerics.compute_dtype(weights.lm_head.dtype, device)
        self.head = TargetHead(weights.lm_head.to(device, head_dtype), vocab.t2d.to(device))
        self.module: nn.Module = TTTModule(self.draft, cfg.ttt)
        o = cfg.optim
        self.optimizer = adamw(self.draft.trainable_parameters(), o, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(o, total_steps))
        self.autocast = autocast_bf16(o.bf16, device)

    def global_denominators(self, batch: Batch, weight: float) -> Tensor | None:
        """Labelled positions per TTT step summed over data-parallel workers, ÷ world size (None on one worker):
        DDP averages gradients, so each worker divides its sum by the mean count and the result is the global mean.
        `batch` is on the training device, so the collective's tensor is too (NCCL takes no CPU tensors)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return None
        counts = torch.stack([data_label_mask(batch.loss_mask, batch.doc_ids, k).sum()
                              for k in range(self.cfg.ttt.length)]).to(torch.float64) * weight  # [K] on device
        dist.all_reduce(counts)
        return counts / dist.get_world_size()

    def plan_branches(self, tb: TargetBatch, step: int) -> BranchPlan | None:
        """Choose the branch queries of `tb` and, in 'draft' mode, sample their tokens with the current weights.

        Seeded by (optim.seed, step), so a run is reproducible. None in 'data' mode (nothing to relabel)."""
        t = self.cfg.ttt
        if not t.uses_branches:
            return None
        g = torch.Generator().manual_seed(self.cfg.optim.seed * 1_000_003 + step)
        batch = tb.batch
        br = select_branches(batch.loss_mask, batch.doc_ids, t.branch_fraction, g)
        dbr = Branches(rows=br.rows.to(self.device), cols=br.cols.to(self.device))
        samples, tokens = None, None
        if t.token_feedback == "draft":
            dev = batch.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                samples = sample_draft_path(self.draft, tb.aux_hidden.to(self.device), dev.input_ids,
                                            dev.position_ids, dev.doc_ids, dbr, t.length - 1, t.draft_temperature, g,
                                            t.attention_kernel)
            tokens = samples.tokens.cpu()
        request = RelabelRequest(batch=batch, key=tb.key, rows=br.rows, points=br.points, tokens=tokens,
                                 length=t.length - 1)
        return BranchPlan(branches=dbr, samples=samples, request=request)

    def step(self, tb: TargetBatch, weight: float = 1.0, plan: BranchPlan | None = None,
             relabel: RelabelResult | None = None) -> StepResult:
        """One optimizer step on a target batch; `weight`=0 contributes no gradient (uneven DDP shards).
        With a `plan`, steps >= 1 feed the planned branch tokens and are labelled by the target's `relabel`."""
        batch = tb.batch.to(self.device)
        aux = tb.aux_hidden.to(self.device)  # target dtype: fc casts it (to bf16 under autocast, else fp32)
        teacher = self.head(tb.last_hidden.to(self.device))
        survival = None
        if plan is None:
            feed, targets = data_feed(batch.input_ids), data_targets(teacher, batch.loss_mask, batch.doc_ids)
        else:
            t = self.cfg.ttt
            br, tokens = plan.branches, relabel.tokens.to(self.device)
            bteacher = self.head(relabel.last_hidden.to(self.device))
            weights = None
            if plan.samples is not None:
                greedy = survival_weights(teacher, bteacher, br, plan.samples, greedy=True)
                survival = greedy.mean(0).tolist() if len(br) else None
                if t.survival_weights:
                    weights = greedy if t.draft_temperature == 0 else \
                        survival_weights(teacher, bteacher, br, plan.samples, greedy=False)
            feed = branch_feed(batch.input_ids, br, tokens)
            targets = branch_targets(teacher, bteacher, br, batch.loss_mask, batch.doc_ids, weights)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out: TTTOutput = self.module(aux, batch, feed, targets, self.global_denominators(batch, weight))
        (out.loss * weight).backward()
        clip = self.cfg.optim.grad_clip
        params = self.draft.trainable_parameters()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(
            loss=float(out.loss.detach()), loss_k=out.loss_k.tolist(), correct_k=out.correct_k.tolist(),
            count_k=out.count_k.tolist(), grad_norm=float(grad_norm), lr=lr, survival_k=survival,
        )


# ---------------------------------------------------------------------------------------------------------------
# Data order and sharding


def checkpoint_step(ckpt_dir: Path) -> int:
    """The optimizer step a training checkpoint folder was saved at (eagle3.checkpoint's state.json)."""
    return json.loads((Path(ckpt_dir) / "state.json").read_text())["meta"]["step"]


def epoch_order(num_batches: int, seed: int, epoch: int) -> list[int]:
    """Deterministic shuffled batch order of an epoch."""
    order = list(range(num_batches))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def worker_shard(order: list[int], rank: int, world: int) -> list[tuple[int, bool]]:
    """This worker's (batch index, real) list; short shards are padded with a zero-weight repeat so that every
    worker takes the same number of DDP steps while each batch is trained exactly once."""
    mine = order[rank::world]
    steps = math.ceil(len(order) / world)
    return [(b, True) for b in mine] + [(mine[0] if mine else order[0], False)] * (steps - len(mine))


def steps_per_epoch(num_batches: int, world: int) -> int:
    return math.ceil(num_batches / world)


# ---------------------------------------------------------------------------------------------------------------
# Ray Train entry


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Run by every Ray Train worker. `config`: job config dict, target actor handles, TargetInfo, vocab map,
    batches and frozen target weights (object refs), MLflow uri/run id."""
    import ray
    import ray.train
    import ray.train.torch

    from eagle3.checkpoint import load_train_state
    from jobs.config import load_config_dict
    from jobs.tracking import MlflowTracker, NullTracker

    cfg: JobConfig = load_config_dict(config["job"])
    # Per-checkpoint INFO lines of Ray Train and MLflow's monitor would bury the progress bar; warnings still show.
    quiet = ["ray.train", "mlflow.system_metrics"]
    try:  # Ray Train's report logger is named after its file, outside the ray.train logger tree
        from ray.train.v2._internal.execution import context as train_context

        quiet.append(train_context.__file__)
    except ImportError:
        pass
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    cores = pin_cores(cfg.trainer.num_threads, f"trainer-{rank}", from_top=True) \
        if cfg.trainer.pin_cpus and not cfg.trainer.use_gpu else None
    targets, info = config["targets"], config["info"]
    # A StoreBatches (an index over the token store, read lazily), or a RegenRequest list with data.regenerate.
    batches = ray.get(config["batches"])
    vocab: VocabMap = config["vocab"]
    device = ray.train.torch.get_device()
    # Put in the object store once by the driver, in the target's dtype: one copy per node, not one fetch per worker.
    weights: FrozenWeights = ray.get(config["frozen_weights"])
    draft_cfg = draft_config_for(info, cfg.draft.vocab_size)
    per_epoch = steps_per_epoch(len(batches), world)
    total = per_epoch * cfg.optim.epochs
    if cfg.optim.max_steps:
        total = min(total, cfg.optim.max_steps)
    learner = Learner(cfg, draft_cfg, weights, vocab, total, device)
    del weights
    learner.module = ray.train.torch.prepare_model(learner.module, move_to_device=True)

    step, counters = 0, {"samples": 0, "tokens": 0, "resent": 0, "requests": 0, "wire_bytes": 0}
    # Resume from the newest of: Ray Train's latest registered checkpoint, and a complete checkpoint whose
    # registration an interrupt cut short (found by the driver, see jobs.train.scan_checkpoints).
    with contextlib.ExitStack() as stack:
        ckpt = ray.train.get_checkpoint()
        dirs = [Path(stack.enter_context(ckpt.as_directory()))] if ckpt else []
        dirs += [Path(config["adopt_checkpoint"])] if config.get("adopt_checkpoint") else []
        if dirs:
            newest = max(dirs, key=checkpoint_step)
            meta = load_train_state(newest, learner.draft, learner.optimizer, learner.scheduler)
            step, counters = meta["step"], meta["counters"]
    tracker = MlflowTracker(config["mlflow_uri"], config["mlflow_run_id"]) if rank == 0 else NullTracker()
    tracker.start_system_metrics("trainer0", cfg.tracking.system_metrics_interval_s)
    tracker.set_tags({"aerie.trainer0_cores": str(cores) if cores else "unpinned"})  # a tag: a resume may differ
    try:
        _train(cfg, learner, tracker, targets, batches, rank, world, step, counters, total, per_epoch)
    finally:
        tracker.stop_system_metrics()


def _train(cfg, learner, tracker, targets, batches, rank, world, step, counters, total, per_epoch) -> None:
    """The step loop of one worker (see train_loop_per_worker)."""
    import ray
    import ray.train
    from ray.train import Checkpoint

    from actors.client import FeatureStream, RelabelClient
    from eagle3.checkpoint import save_train_state

    faults = cfg.faults
    crash_marker = Path(cfg.run_dir) / ".crashed-once"

    def report(done: bool) -> None:
        meta = {"step": step, "counters": counters}
        metrics = {"step": step, "done": done}
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                save_train_state(Path(d) / "ckpt", learner.draft, learner.optimizer, learner.scheduler, meta)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(Path(d) / "ckpt")))
        else:
            ray.train.report(metrics)

    relabels = RelabelClient(targets)
    while step < total:
        epoch, pos = divmod(step, per_epoch)
        shard = worker_shard(epoch_order(len(batches), cfg.optim.seed, epoch), rank, world)[pos:]
        shard = shard[: total - step]
        # Lazy: a batch is read from the token store when the stream requests it, stream_depth ahead.
        stream = FeatureStream(targets, ShardView(batches, [b for b, _ in shard]), depth=cfg.trainer.stream_depth,
                               offset=rank)
        t_stream = t_last = time.perf_counter()
        seen_resent = seen_requests = 0
        relabel_wait0 = relabels.stats.wait_seconds  # the client lives across epochs; the fraction is this epoch's
        log_s = 0.0  # the previous step's tracker.log_metrics, reported with this step
        for (b, real), tb, plan, relabel in _with_relabels(learner, relabels, zip(shard, stream), step):
            if rank == 0 and faults.kill_target_at_step and step + 1 == faults.kill_target_at_step:
                ray.kill(targets[0], no_restart=False)  # drill: in-flight requests must be resent
            w = 1.0 if real else 0.0
            t0 = time.perf_counter()
            r = learner.step(tb, weight=w, plan=plan, relabel=relabel)
            t1 = time.perf_counter()
            release_freed_memory()
            trim_s = time.perf_counter() - t1
            step += 1
            # Sum over workers; dummy (zero-weight) steps contribute nothing.
            K = len(r.loss_k)
            vec = step_stats(r, tb, relabel, w, learner.device)
            if world > 1:
                torch.distributed.all_reduce(vec)
            vec = vec.cpu()  # one copy per step, for logging
            loss_k, correct_k, count_k = vec[:K] / vec[3 * K].clamp_min(1), vec[K : 2 * K], vec[2 * K : 3 * K]
            tokens, wire, samples, generated, generate_s, branch, crc = (float(x) for x in vec[3 * K + 1 :])
            counters["tokens"] += int(tokens)
            counters["wire_bytes"] += int(wire)
            counters["samples"] += int(samples)
            counters["sample_crc"] = counters.get("sample_crc", 0) + int(crc)  # resumes from older checkpoints too
            counters["resent"] += stream.stats.resent - seen_resent
            counters["requests"] += stream.stats.requests - seen_requests
            seen_resent, seen_requests = stream.stats.resent, stream.stats.requests
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            # Training seconds over every attempt of the run (resumes included, restarts' setup excluded): the
            # wall-clock axis of learning curves (snapshots).
            counters["train_seconds"] = counters.get("train_seconds", 0.0) + dt
            acc_k = correct_k / count_k.clamp_min(1)
            sim = float(simulated_accept_length(acc_k))
            metrics = {
                "loss": float((step_weights(K, cfg.ttt.step_decay).double() * loss_k).sum()),
                "sim_accept_len": sim, "lr": r.lr, "grad_norm": r.grad_norm, "train_step": step,
                "tokens_per_s": tokens / max(dt, 1e-9),
                "target_wait_frac": stream.stats.wait_seconds / max(now - t_stream, 1e-9),
                "wire_bytes_per_token": wire / max(tokens, 1.0),
                "trained_tokens": counters["tokens"], "samples_trained": counters["samples"],
                "sample_id_checksum": counters["sample_crc"],  # see step_stats
                "stream_resent": counters["resent"], "stream_requests": counters["requests"],
                # Where the step's wall time went (the rest: waiting for the target, bookkeeping): a slowdown over
                # a long run shows up in one of these.
                "time_step_s": dt, "time_learner_s": t1 - t0, "time_trim_s": trim_s, "time_log_s": log_s,
                "trainer_rss_mib": rss_mib(),
            }
            if cfg.data.regenerate:
                counters["generated_tokens"] = counters.get("generated_tokens", 0) + int(generated)
                counters["generate_seconds"] = counters.get("generate_seconds", 0.0) + generate_s
                metrics.update({
                    "generated_tokens": counters["generated_tokens"],  # target-written response tokens
                    # per target actor: tokens per second spent in generate (all requests so far)
                    "generate_tokens_per_s": counters["generated_tokens"] / max(counters["generate_seconds"], 1e-9),
                })
            if plan is not None:
                counters["branch_tokens"] = counters.get("branch_tokens", 0) + int(branch)
                rs = relabels.stats
                metrics.update({
                    "relabel_tokens_per_token": counters["branch_tokens"] / max(counters["tokens"], 1),
                    "relabel_wait_frac": (rs.wait_seconds - relabel_wait0) / max(now - t_stream, 1e-9),
                    "relabel_cache_hit_frac": rs.cache_hits / max(rs.answered, 1),
                    "relabel_resent": rs.resent,
                })
                if r.survival_k:
                    metrics.update({f"survival_{k}": v for k, v in enumerate(r.survival_k)})
            # Everything the targets computed: features, relabelled branch tokens, regenerated responses.
            target_tokens = counters["tokens"] + counters.get("branch_tokens", 0) + counters.get("generated_tokens", 0)
            metrics["target_tokens"] = target_tokens
            metrics.update({f"loss_{k}": float(loss_k[k]) for k in range(K)})
            metrics.update({f"acc_{k}": float(acc_k[k]) for k in range(K)})
            t_log = time.perf_counter()
            tracker.log_metrics(metrics, step)
            log_s = time.perf_counter() - t_log
            if rank == 0 and faults.crash_worker_at_step == step and not crash_marker.exists():
                crash_marker.touch()
                raise RuntimeError(f"fault injection: worker crash at step {step}")
            budget_spent = bool(cfg.optim.max_target_tokens and target_tokens >= cfg.optim.max_target_tokens)
            if rank == 0 and cfg.trainer.snapshot_every and (step % cfg.trainer.snapshot_every == 0
                                                             or step == total or budget_spent):
                write_snapshot(cfg, learner.draft, step, counters, target_tokens)
            if budget_spent:
                total = step  # budget spent (the same on every worker: the counts are all-reduced)
                break
            if step % cfg.trainer.checkpoint_every == 0 and step < total:
                report(done=False)
    report(done=True)


_LIBC = None


def rss_mib() -> float:
    """This process's resident set now, MiB (Linux /proc; 0 where it is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def release_freed_memory() -> None:
    """Give the pages of freed host allocations back to the OS (glibc malloc_trim; a no-op elsewhere).

    A step's tensors change size with every batch (packed documents, scored rows), and glibc keeps the freed blocks
    in its heap, fragmented: the trainer's RSS grew ~5 MB per step at the demo's shapes (2.2 → 4.7 GB over 250
    steps, BENCHMARKS.md) and the steps slowed. One trim per step holds it flat at no measurable cost."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = libc if hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def snapshot_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "snapshots" / f"step-{step:07d}"


def export_draft(cfg: JobConfig, draft: Eagle3Draft, out: Path, extra_files: dict[str, str] | None = None) -> Path:
    """Save `draft` to `out` (atomic, fp32) in the run's export_format; the speculators format also records the
    verifier (the target model). The final export and every snapshot go through here, so they load the same way."""
    from eagle3.export import save_draft

    verifier = None
    if cfg.export_format == "speculators":
        from actors.models import resolve_model

        verifier = resolve_model(cfg.target.model)
    return save_draft(draft, out, fmt=cfg.export_format, verifier=verifier, num_speculative_tokens=cfg.ttt.length,
                      extra_files=extra_files)


def write_snapshot(cfg: JobConfig, draft: Eagle3Draft, step: int, counters: dict, target_tokens: int) -> Path:
    """Export the draft as it is after `step` to <run_dir>/snapshots/step-NNNNNNN with progress.json; a learning
    curve evaluates these after (or while) the run trains."""
    progress = {"step": step, "trained_tokens": counters["tokens"], "target_tokens": target_tokens,
                "samples_trained": counters["samples"], "train_seconds": round(counters.get("train_seconds", 0.0), 2),
                "generated_tokens": counters.get("generated_tokens", 0)}
    return export_draft(cfg, draft, snapshot_dir(cfg.run_dir, step), {"progress.json": json.dumps(progress)})


def step_stats(r: StepResult, tb: TargetBatch, relabel: RelabelResult | None, w: float, device: torch.device) -> Tensor:
    """The per-step numbers summed over workers, weighted by `w` (0 for a padding step), as one float64 vector
    [loss_k (K), correct_k (K), count_k (K), steps, tokens, wire bytes, samples, generated, generate s, branch
    tokens, sample id checksum] on the training `device`: the all-reduce runs on NCCL for GPU workers, which takes
    no CPU tensors. The checksum (sum of the CRC-32 of each trained sample id, exact in float64 up to ~2M samples
    per step) lets a run show that every sample was trained exactly once, whatever failed on the way."""
    values = ([w * x for x in r.loss_k] + [w * x for x in r.correct_k] + [w * x for x in r.count_k]
              + [w, w * float(tb.batch.attention_mask.sum()), w * tb.wire_bytes,
                 w * sum(len(row) for row in tb.batch.sample_ids), w * tb.generated_tokens, w * tb.generate_seconds,
                 w * (relabel.tokens.numel() if relabel is not None else 0),
                 w * sum(zlib.crc32(sid.encode()) for row in tb.batch.sample_ids for sid in row)])
    return torch.tensor(values, dtype=torch.float64, device=device)


def _with_relabels(learner: Learner, client, items, first_step: int):
    """Yield (shard entry, TargetBatch, BranchPlan | None, RelabelResult | None) in order.

    Token feedback pipelines one batch ahead: batch j's branches are planned (draft tokens sampled) and sent to the
    target before batch j-1 trains, so the relabel runs while the trainer works. The price is that draft tokens are
    sampled with weights one optimizer step old. In 'data' mode items pass straight through.
    """
    pending = None
    for j, (entry, tb) in enumerate(items):
        plan = learner.plan_branches(tb, first_step + j)
        if plan is None:
            yield entry, tb, None, None
            continue
        ticket = client.submit(tb, plan.request)
        if pending is not None:
            e, t, p, tk = pending
            yield e, t, p, client.result(tk)
        pending = (entry, tb, plan, ticket)
    if pending is not None:
        e, t, p, tk = pending
        yield e, t, p, client.result(tk)
