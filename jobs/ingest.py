"""Distributed preprocessing with Ray Data: read conversations, tokenize + mask on the cluster's CPUs, write the
token store once (eagle3/token_store.py).

    parts (eagle3/sources.py) ─ read tasks ─> records (JSON text) ─ tokenizer actors ─> shards on disk
                                                                                     └> one metadata row per record
    driver: metadata only (status, length, shard, row; a few ints per record) → file order, DataStats, max_samples
    cut, vocab counts → samples/*.npy + manifest.json → one rename makes the store visible.

The record rules are eagle3.data.encode_record, so the store holds exactly the samples load_samples makes, and
packing (pack_rows over the lengths) gives exactly pack()'s rows. The first bad record (on_bad_record=error) stops
the build with its file and record; a failed or killed build leaves only a hidden temporary folder, which no run
trusts and the next build removes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ray.data import Datasource

from eagle3.data import _SKIP_HINT, DataConfig, DataError, DataStats
from eagle3.sources import Part, SourceError, fingerprint, part_location, read_part, resolve_parts, sample_id
from eagle3.token_store import (FORMAT, TokenStore, commit, open_store, read_shard_row, save_array, temp_folder,
                                write_shard)

KEPT, SKIPPED, DROPPED, TAIL, BAD, FATAL = range(6)
_READ_BLOCK = 256  # records per block out of a read task
_TOKENIZE_BATCH = 256  # records per tokenizer call (= samples per shard, at most)
_WINDOW_MIN = 512  # records read per round when data.max_samples stops early


def store_key(parts: Sequence[Part], tokenizer_id: str, cfg: DataConfig, data_fingerprint: str | None = None) -> str:
    """What the samples depend on: the files' content (`fingerprint(parts)` unless given), the tokenizer, and the
    sample settings."""
    settings = [FORMAT, data_fingerprint or fingerprint(parts), tokenizer_id, cfg.max_length, cfg.overlong,
                cfg.on_bad_record, cfg.max_samples]
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()


def _many_files(parts: Sequence[Part]) -> tuple[list[int], bool]:
    files = list(dict.fromkeys(p.path for p in parts))
    return [files.index(p.path) for p in parts], len(files) > 1


class ConversationSource(Datasource):
    """A Ray Data datasource over parts: one read task per part, or with a window one task that streams records
    [start, stop) of all parts in order (data.max_samples: stop early without reading the whole dataset)."""

    def __init__(self, parts: Sequence[Part], window: tuple[int, int] | None = None):
        super().__init__()
        self.parts, self.window = list(parts), window

    def get_name(self) -> str:
        return "Conversations"

    def estimate_inmemory_data_size(self):
        return sum(p.size for p in self.parts) or None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        def meta(parts):
            return BlockMetadata(num_rows=None, size_bytes=sum(p.size for p in parts) or None,
                                 input_files=[p.path for p in parts], exec_stats=None)

        parts, window = self.parts, self.window
        if window is not None:
            return [ReadTask(lambda: _read_blocks(parts, range(len(parts)), window), meta(parts))]
        return [ReadTask(lambda k=k: _read_blocks(parts, [k], None), meta([parts[k]])) for k in range(len(parts))]


def _read_blocks(parts: Sequence[Part], which, window):
    """Blocks of (part, index, record JSON | error, reason): a bad record travels as its error, a file that cannot
    be read at all as one FATAL row."""
    import pyarrow as pa

    cols = {"part": [], "index": [], "record": [], "error": [], "reason": []}

    def flush():
        block = pa.table({"part": pa.array(cols["part"], pa.int32()), "index": pa.array(cols["index"], pa.int64()),
                          "record": pa.array(cols["record"], pa.string()),
                          "error": pa.array(cols["error"], pa.string()),
                          "reason": pa.array(cols["reason"], pa.string())})
        for v in cols.values():
            v.clear()
        return block

    seen = 0
    for k in which:
        try:
            for index, record in read_part(parts[k]):
                if window is not None:
                    seen += 1
                    if seen <= window[0]:
                        continue
                    if seen > window[1]:
                        break
                cols["part"].append(k)
                cols["index"].append(index)
                if isinstance(record, DataError):
                    cols["record"].append(None), cols["error"].append(str(record)), cols["reason"].append(record.reason)
                else:
                    cols["record"].append(json.dumps(record, default=str)), cols["error"].append(None)
                    cols["reason"].append(None)
                if len(cols["part"]) >= _READ_BLOCK:
                    yield flush()
        except (DataError, SourceError, OSError) as e:  # the whole file is unreadable (not UTF-8, not JSON, ...)
            cols["part"].append(k), cols["index"].append(-1), cols["record"].append(None)
            cols["error"].append(str(e)), cols["reason"].append("fatal")
        if window is not None and seen > window[1]:
            break
    if cols["part"]:
        yield flush()


class Tokenizer:
    """A Ray Data actor: loads the target's tokenizer once, then turns record batches into a shard file of samples
    and one metadata row per record."""

    def __init__(self, tokenizer_dir: str, data: dict, parts: list[Part], folder: str, vocab_size: int) -> None:
        import os

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer

        from eagle3.data import _check_tokenizer, _special_ids

        self.tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        _check_tokenizer(self.tok)
        self.special = _special_ids(self.tok)
        self.cfg = DataConfig(**data)
        self.parts, self.folder, self.vocab = parts, folder, vocab_size
        self.file_no, self.many = _many_files(parts)

    def __call__(self, batch):
        import pyarrow as pa

        from eagle3.data import encode_record

        n = batch.num_rows
        part, index = batch.column("part").to_pylist(), batch.column("index").to_pylist()
        records, errors, reasons = (batch.column(c).to_pylist() for c in ("record", "error", "reason"))
        status = np.zeros(n, np.int8)
        length, loss, pos = np.zeros(n, np.int32), np.zeros(n, np.int32), np.full(n, -1, np.int32)
        truncated = np.zeros(n, bool)
        reason, message = [None] * n, [None] * n
        sids, ids_list, masks = [], [], []
        for j in range(n):
            p = self.parts[part[j]]
            if reasons[j] == "fatal":
                status[j], reason[j], message[j] = FATAL, "fatal", errors[j]
                continue
            if reasons[j] == "incomplete_tail":
                status[j] = TAIL
                continue
            record = DataError(errors[j], reasons[j]) if records[j] is None else json.loads(records[j])
            try:
                fitted = encode_record(record, self.tok, self.special, self.cfg)
            except DataError as e:
                status[j], reason[j] = (SKIPPED if self.cfg.on_bad_record == "skip" else BAD), e.reason
                message[j] = f"{part_location(p, index[j], record)}: {e}; {_SKIP_HINT}"
                continue
            if fitted is None:
                status[j] = DROPPED
                continue
            ids, mask, cut = fitted
            truncated[j], length[j], loss[j], pos[j] = cut, len(ids), int(mask.sum()), len(sids)
            sids.append(sample_id(record, index[j], self.file_no[part[j]], self.many))
            ids_list.append(np.asarray(ids, np.int32))
            masks.append(mask.numpy().astype(np.uint8))
        shard, count_ids, count_vals = None, np.zeros(0, np.int32), np.zeros(0, np.int64)
        if sids:
            shard, _ = write_shard(self.folder, sids, ids_list, masks)
            flat = np.concatenate([i[m.astype(bool)] for i, m in zip(ids_list, masks)])
            counts = np.bincount(flat, minlength=self.vocab)
            count_ids = np.flatnonzero(counts).astype(np.int32)
            count_vals = counts[count_ids].astype(np.int64)
        # The batch's vocab counts ride on its first row (the driver sums the column whatever row carries them).
        cids = [count_ids.tolist()] + [[]] * (n - 1)
        cvals = [count_vals.tolist()] + [[]] * (n - 1)
        return pa.table({
            "part": pa.array(part, pa.int32()), "index": pa.array(index, pa.int64()), "status": status,
            "reason": pa.array(reason, pa.string()), "message": pa.array(message, pa.string()),
            "truncated": truncated, "length": length, "loss": loss, "pos": pos,
            "shard": pa.array([shard] * n, pa.string()),
            "count_ids": pa.array(cids, pa.list_(pa.int32())), "count_vals": pa.array(cvals, pa.list_(pa.int64())),
        })


def build_store(cfg: DataConfig, tokenizer_dir: str, tokenizer_id: str, vocab_size: int, root: Path,
                *, parts: Sequence[Part] | None = None) -> TokenStore:
    """The committed token store of `cfg` (built with Ray Data unless one with the same key exists). Ray must be
    initialized. Raises DataError naming file and record for a bad record (on_bad_record=error)."""
    parts = resolve_parts(cfg.path, cfg.split) if parts is None else parts
    data_fingerprint = fingerprint(parts)  # reads every file once; the manifest records the same value
    key = store_key(parts, tokenizer_id, cfg, data_fingerprint)
    final = Path(root) / key[:24]
    store = open_store(final, key)
    if store is not None:
        return store
    if final.exists():  # a folder under this name that is not a complete store for this key: never trusted
        shutil.rmtree(final)
    tmp = temp_folder(Path(root), key[:24])
    try:
        t0 = time.perf_counter()
        meta = _tokenize(cfg, tokenizer_dir, vocab_size, parts, tmp)
        manifest = _finish(cfg, parts, key, tokenizer_id, data_fingerprint, meta, tmp)
        manifest["build_seconds"] = round(time.perf_counter() - t0, 2)
        s = manifest["stats"]
        print(f"[aerie] token store {final}: {manifest['num_samples']} samples, {s['total_tokens']} tokens, "
              f"{manifest['bytes'] / 1e6:.1f} MB ({manifest['bytes_per_token']:.2f} B/token), built in "
              f"{manifest['build_seconds']:.1f} s ({s['records_seen'] / max(manifest['build_seconds'], 1e-9):.0f} "
              "records/s)", file=sys.stderr, flush=True)
        return TokenStore(commit(tmp, final, manifest))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _run(cfg: DataConfig, tokenizer_dir: str, vocab_size: int, parts, folder: Path, window) -> dict[str, list]:
    """One Ray Data pass; the metadata columns as numpy arrays (counts summed). Stops at the first bad record."""
    import ray
    import ray.data

    workers = cfg.tokenizer_workers or max(1, min(64, int(ray.cluster_resources().get("CPU", 1))))
    ds = ray.data.read_datasource(ConversationSource(parts, window), num_cpus=0)
    ds = ds.map_batches(Tokenizer, batch_size=_TOKENIZE_BATCH, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1, fn_constructor_kwargs={
                            "tokenizer_dir": tokenizer_dir, "data": dataclasses.asdict(cfg), "parts": list(parts),
                            "folder": str(folder), "vocab_size": vocab_size})
    cols: dict[str, list] = {c: [] for c in ("part", "index", "status", "reason", "message", "truncated", "length",
                                             "loss", "pos", "shard")}
    counts = np.zeros(vocab_size, np.int64)
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for c in cols:
            cols[c].append(block.column(c).to_numpy(zero_copy_only=False))
        for ids, vals in zip(block.column("count_ids").to_pylist(), block.column("count_vals").to_pylist()):
            if ids:
                np.add.at(counts, np.asarray(ids), np.asarray(vals))
        status = cols["status"][-1]
        if ((status == BAD) | (status == FATAL)).any():
            break  # the earliest bad record seen so far is reported; no reason to tokenize the rest
    empty = {"reason": object, "message": object, "shard": object, "truncated": bool}  # no record at all
    out = {c: (np.concatenate(v) if v else np.zeros(0, empty.get(c, np.int64))) for c, v in cols.items()}
    out["counts"] = counts
    return out


def _tokenize(cfg: DataConfig, tokenizer_dir: str, vocab_size: int, parts, folder: Path) -> dict:
    if cfg.max_samples is None:
        return _run(cfg, tokenizer_dir, vocab_size, parts, folder, None)
    # Read in growing windows until enough samples are kept (or the data ends): data.max_samples of a big
    # dataset tokenizes a little more than it keeps, not everything.
    start, size, merged = 0, max(_WINDOW_MIN, 2 * cfg.max_samples), None
    while True:
        meta = _run(cfg, tokenizer_dir, vocab_size, parts, folder, (start, start + size))
        got = len(meta["status"])  # fewer records than asked for: the data has ended
        if merged is None:
            merged = meta
        else:
            counts = merged.pop("counts") + meta.pop("counts")
            merged = {c: np.concatenate([merged[c], meta[c]]) for c in merged}
            merged["counts"] = counts
        status = merged["status"]
        if (((status == BAD) | (status == FATAL)).any() or int((status == KEPT).sum()) >= cfg.max_samples
                or got < size):
            return merged
        start, size = start + size, size * 2


def _finish(cfg: DataConfig, parts, key: str, tokenizer_id: str, data_fingerprint: str, meta: dict, folder: Path
            ) -> dict:
    """File order, the first error, the max_samples cut, DataStats, samples/*.npy and counts; the manifest."""
    order = np.lexsort((meta["index"], meta["part"]))
    m = {c: meta[c][order] for c in meta if c != "counts"}
    status = m["status"]
    bad = np.flatnonzero((status == BAD) | (status == FATAL))
    if len(bad):
        j = bad[0]
        raise DataError(m["message"][j], m["reason"][j])  # a FATAL row's reason is "fatal"
    real = status != TAIL
    kept_at = np.flatnonzero(status == KEPT)
    cut = len(status)
    if cfg.max_samples is not None and len(kept_at) >= cfg.max_samples:
        cut = int(kept_at[cfg.max_samples - 1]) + 1  # records after the max_samples-th kept one were not read
    inside = np.arange(len(status)) < cut
    stats = DataStats()
    stats.records_seen = int((real & inside).sum())
    stats.incomplete_tail = int((~real).sum()) if cut == len(status) else 0
    keep = inside & (status == KEPT)
    stats.kept = int(keep.sum())
    stats.truncated = int((keep & m["truncated"]).sum())
    stats.dropped_overlong = int((inside & (status == DROPPED)).sum())
    for r in m["reason"][inside & (status == SKIPPED)]:
        stats.skipped[r] = stats.skipped.get(r, 0) + 1
    stats.total_tokens = int(m["length"][keep].sum())
    stats.loss_tokens = int(m["loss"][keep].sum())
    counts = meta["counts"].copy()
    shard_names = sorted({s for s in m["shard"][status == KEPT] if s})
    shard_no = {s: k for k, s in enumerate(shard_names)}
    extra = np.flatnonzero(~inside & (status == KEPT))
    if len(extra):  # kept samples past the cut were counted by their tokenizer: take them out again
        for name, pos in zip(m["shard"][extra], m["pos"][extra]):
            ids, mask = read_shard_row(folder / name, int(pos))
            np.subtract.at(counts, ids[mask.astype(bool)], 1)
    samples_dir = folder / "samples"
    samples_dir.mkdir()
    save_array(samples_dir / "shard.npy", np.array([shard_no[s] for s in m["shard"][keep]], np.int32))
    save_array(samples_dir / "pos.npy", m["pos"][keep].astype(np.int32))
    save_array(samples_dir / "length.npy", m["length"][keep].astype(np.int32))
    save_array(folder / "counts.npy", counts)
    shards = [{"name": s, "bytes": (folder / s).stat().st_size} for s in shard_names]
    for f in folder.glob("shard-*.arrow"):  # shards with no kept sample (every record past the cut)
        if f.name not in shard_no:
            f.unlink()
    size = sum(s["bytes"] for s in shards)
    return {
        "format": FORMAT, "key": key, "tokenizer_id": tokenizer_id, "fingerprint": data_fingerprint,
        "parts": list(dict.fromkeys(p.path for p in parts)), "settings": dataclasses.asdict(cfg), "stats": vars(stats),
        "num_samples": stats.kept, "shards": shards, "bytes": size,
        "bytes_per_token": size / max(int(m["length"][status == KEPT].sum()), 1), "created": time.time(),
    }
