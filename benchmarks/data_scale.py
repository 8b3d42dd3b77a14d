"""Data at scale: token-store build throughput and driver / worker memory against dataset size.

    python benchmarks/data_scale.py                       # 20K / 100K / 300K conversations (tens of minutes)
    python benchmarks/data_scale.py --sizes 2000 --throughput-records 1000   # a quick look

Records are the packaged ShareGPT conversations cycled (new ids), so lengths follow ShareGPT's distribution; the
tokenizer is SmolLM2's (the demo target's). Each measurement runs in a fresh child process with its own local Ray:
- throughput: token-store build (Ray Data read + tokenize + mask + shards) in records/s with 1 and 2 tokenizer
  workers on the same records;
- driver: peak RSS (ru_maxrss of the driver process: Ray's own processes and the tokenizer actors are separate) of
  prepare-data = build the store + lay out packed batches;
- worker: peak RSS of a process that does what a Ray Train worker does with the data: unpickle the batches handle,
  take its shard of epoch 0 (2 workers), read the first --worker-batches batches of it;
- reference: the in-memory path (load_samples + pack, today's path before the store) at the smallest size.
Prints a table and writes benchmarks/results/data_scale.json. Timings on shared cores are noisy (one run each).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_records(n: int, path: Path) -> Path:
    """n ShareGPT records, cycled with fresh ids, as .jsonl (written once per size, reused)."""
    from eagle3.data import DataError, iter_records, packaged_sharegpt_path

    if path.is_file():
        return path
    base = [r for _, r in iter_records(packaged_sharegpt_path()) if not isinstance(r, DataError)]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(n):
            f.write(json.dumps({**base[i % len(base)], "id": f"c{i}"}) + "\n")
    os.replace(tmp, path)
    return path


def config(path: Path, store: Path, workers: int, max_length: int):
    from jobs.config import load_config

    return load_config("smollm2-sharegpt-cpu", None, [
        f"data.path={path}", f"data.store_dir={store}", f"data.tokenizer_workers={workers}", "data.max_samples=null",
        f"data.max_length={max_length}"])


def child_build(args) -> dict:
    import ray

    ray.init(address="local", num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False)
    from jobs.data_prep import prepare_data

    cfg = config(Path(args.path), Path(args.store), args.workers, args.max_length)
    t0 = time.perf_counter()
    data = prepare_data(cfg)
    dt = time.perf_counter() - t0
    m = data.store.manifest
    Path(args.handle).write_bytes(pickle.dumps(data.batches))
    return {"seconds": dt, "records": data.stats.records_seen, "samples": data.stats.kept,
            "tokens": data.stats.total_tokens, "batches": len(data.batches), "store_mb": m["bytes"] / 1e6,
            "bytes_per_token": m["bytes_per_token"], "driver_peak_rss_mb": peak_rss_mb(),
            "handle_bytes": Path(args.handle).stat().st_size}


def child_worker(args) -> dict:
    from jobs.train_loop import epoch_order, worker_shard

    before = peak_rss_mb()
    batches = pickle.loads(Path(args.handle).read_bytes())
    shard = worker_shard(epoch_order(len(batches), 0, 0), rank=1, world=2)[: args.worker_batches]
    t0 = time.perf_counter()
    tokens = sum(int(batches[b].attention_mask.sum()) for b, _ in shard)
    return {"batches_read": len(shard), "tokens_read": tokens, "seconds": time.perf_counter() - t0,
            "worker_peak_rss_mb": peak_rss_mb(), "rss_before_mb": before}


def child_reference(args) -> dict:
    from eagle3.data import DataConfig, load_samples, pack
    from jobs.data_prep import load_tokenizer

    cfg = config(Path(args.path), Path(args.store), 1, args.max_length)
    tok = load_tokenizer(cfg.target.model)
    t0 = time.perf_counter()
    samples, stats = load_samples(DataConfig(path=args.path, max_length=args.max_length, on_bad_record="skip"), tok)
    batches = pack(samples, args.max_length, rows_per_batch=2, pad_token_id=tok.pad_token_id)
    return {"seconds": time.perf_counter() - t0, "records": stats.records_seen, "batches": len(batches),
            "driver_peak_rss_mb": peak_rss_mb(),
            "pickled_batches_mb": len(pickle.dumps(batches, protocol=5)) / 1e6}  # what ray.put(batches) shipped


def run_child(kind: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", kind] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "RAY_ADDRESS": "local", "TQDM_DISABLE": "1"})
    if out.returncode:
        sys.exit(f"{kind} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="20000,100000,300000")
    p.add_argument("--throughput-records", type=int, default=4000)
    p.add_argument("--worker-batches", type=int, default=200)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "aerie-data-scale"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_scale.json"))
    p.add_argument("--parts", default="throughput,scale,reference",
                   help="which measurements (throughput, scale, reference, regenerate); results merge into an "
                        "existing --out JSON")
    # child-process options
    p.add_argument("--child", choices=["build", "worker", "reference"])
    for a in ("path", "store", "handle"):
        p.add_argument(f"--{a}")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    if args.child:
        print(json.dumps({"build": child_build, "worker": child_worker, "reference": child_reference}[args.child](args)))
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update({"cpus": os.cpu_count(), "max_length": args.max_length})
    result.setdefault("commands", []).append(" ".join(sys.argv))
    if "throughput" in parts:
        result["throughput"] = []
    if "scale" in parts:
        result["scale"] = []
    tp = make_records(args.throughput_records, work / f"records-{args.throughput_records}.jsonl")
    for w in ((1, 2) if "throughput" in parts else ()):
        store = Path(tempfile.mkdtemp(dir=work))  # fresh: a build, not a cache hit
        r = run_child("build", path=tp, store=store, handle=store / "h.pkl", workers=w, max_length=args.max_length)
        r["tokenizer_workers"] = w
        r["records_per_s"] = r["records"] / r["seconds"]
        result["throughput"].append(r)
        print(f"throughput  workers={w}: {r['records']} records in {r['seconds']:.1f} s = "
              f"{r['records_per_s']:.0f} records/s ({r['tokens'] / r['seconds']:.0f} tokens/s)", flush=True)
    for n in ([int(x) for x in args.sizes.split(",")] if "scale" in parts else []):
        data = make_records(n, work / f"records-{n}.jsonl")
        store = Path(tempfile.mkdtemp(dir=work))
        b = run_child("build", path=data, store=store, handle=store / "h.pkl", workers=2, max_length=args.max_length)
        w = run_child("worker", handle=store / "h.pkl", worker_batches=args.worker_batches)
        row = {"conversations": n, **b, **{f"worker_{k}": v for k, v in w.items() if not k.startswith("worker_")},
               "worker_peak_rss_mb": w["worker_peak_rss_mb"]}
        result["scale"].append(row)
        print(f"scale {n:>7}: build {b['seconds']:.0f} s, store {b['store_mb']:.0f} MB "
              f"({b['bytes_per_token']:.2f} B/token), driver peak RSS {b['driver_peak_rss_mb']:.0f} MB, worker peak "
              f"RSS {w['worker_peak_rss_mb']:.0f} MB", flush=True)
        out.write_text(json.dumps(result, indent=1))
    if "reference" in parts:
        n = int(args.sizes.split(",")[0])
        r = run_child("reference", path=work / f"records-{n}.jsonl", store=work, max_length=args.max_length)
        result["reference"] = {"conversations": n, **r}
        print(f"reference (in memory, 1 core) {n}: {r['seconds']:.0f} s, driver peak RSS "
              f"{r['driver_peak_rss_mb']:.0f} MB, pickled batches {r['pickled_batches_mb']:.0f} MB", flush=True)

    if "regenerate" in parts:  # batch vs online regeneration on the same 32 prompts: benchmarks/regenerate.py
        cmd = [sys.executable, str(ROOT / "benchmarks" / "regenerate.py"), "--dtype", "bfloat16",
               "--max-new-tokens", "64", "--threads", "1"]
        subprocess.run(cmd, check=True, cwd=ROOT)
        result["regenerate"] = json.loads((ROOT / "benchmarks" / "results" / "regenerate.json").read_text())

    lines = ["", "| conversations | build s | records/s | tokens | store MB | B/token | driver peak RSS MB | "
             "worker peak RSS MB | batches handle bytes |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result.get("scale", []):
        lines.append(f"| {r['conversations']:,} | {r['seconds']:.0f} | {r['records'] / r['seconds']:.0f} | "
                     f"{r['tokens']:,} | {r['store_mb']:.0f} | {r['bytes_per_token']:.2f} | "
                     f"{r['driver_peak_rss_mb']:.0f} | {r['worker_peak_rss_mb']:.0f} | {r['handle_bytes']} |")
    print("\n".join(lines))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
