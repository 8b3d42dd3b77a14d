"""The token store: tokenized samples on disk, written once, read lazily by every train worker.

Layout of one store (a folder named by its key: data fingerprint + tokenizer + sample settings):

    manifest.json          key, settings, DataStats, sizes; written last, so a folder without it is not a store
    shard-<uuid>.arrow     Arrow IPC files of samples: sample_id (string), input_ids (list<int32>), loss_mask
                           (list<uint8>); the order inside a shard is whatever its tokenizer task saw
    samples/{shard,pos,length}.npy   the samples in file order: which shard, which row, how many tokens
    counts.npy             loss-token count per target id (the draft vocab map is built from it)
    index-<h>/             a batch layout (packed or padded rows of rows_per_batch) as three int arrays

Only token ids and masks are stored (5 bytes per token plus 8 per sample), never hidden states. Positions and
doc ids are derived when a batch is built, by the same code as the in-memory path (eagle3.data._rows_to_batch),
so a batch read from the store is the batch the in-memory path makes. Pure numpy/pyarrow: no ray.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from eagle3.data import Batch, DataStats, Sample, _rows_to_batch, pack_rows

MANIFEST = "manifest.json"
FORMAT = 1
_OPEN_SHARDS = 8  # memory-mapped shards a reader keeps open; older ones are unmapped so RSS stays bounded


def shard_schema():
    import pyarrow as pa

    return pa.schema([("sample_id", pa.string()), ("input_ids", pa.list_(pa.int32())),
                      ("loss_mask", pa.list_(pa.uint8()))])


def write_shard(folder: str | Path, sample_ids: list[str], ids: list[np.ndarray], masks: list[np.ndarray]) -> tuple[str, int]:
    """Write one shard of samples into `folder` under a fresh name; (file name, bytes)."""
    import pyarrow as pa

    lengths = np.fromiter((len(a) for a in ids), dtype=np.int32, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat_ids = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)
    flat_mask = np.concatenate(masks).astype(np.uint8) if masks else np.zeros(0, np.uint8)
    table = pa.table([pa.array(sample_ids, pa.string()), pa.ListArray.from_arrays(pa.array(offsets), flat_ids),
                      pa.ListArray.from_arrays(pa.array(offsets), flat_mask)], schema=shard_schema())
    name = f"shard-{uuid.uuid4().hex}.arrow"
    path = Path(folder) / name
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return name, path.stat().st_size


def read_shard_row(path: str | Path, row: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, loss_mask) of one row of a shard file."""
    import pyarrow as pa

    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    return (table.column("input_ids")[row].values.to_numpy().copy(),
            table.column("loss_mask")[row].values.to_numpy().copy())


def temp_folder(root: Path, key: str) -> Path:
    """A fresh build folder next to the store; stale ones of dead builders on this host are removed first."""
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for old in root.glob(f".{key}.tmp-{host}-*"):
        pid = int(old.name.split("-")[-2])
        if not _alive(pid):
            shutil.rmtree(old, ignore_errors=True)
    d = root / f".{key}.tmp-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    return d


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_array(path: Path, array: np.ndarray) -> None:
    """np.save through a temporary name: the file is whole or absent."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit(tmp: Path, final: Path, manifest: dict) -> Path:
    """Write the manifest last and move the build folder into place in one rename. If another builder got there
    first (same key, same content), its store is kept and this one dropped."""
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.rename(tmp, final)
    except OSError:
        if open_store(final, manifest["key"]) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def open_store(folder: str | Path, key: str) -> TokenStore | None:
    """The store in `folder` if it is complete and was built for `key`, else None (never trust a partial one)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("key") != key or manifest.get("format") != FORMAT:
        return None
    for shard in manifest["shards"]:
        p = folder / shard["name"]
        if not p.is_file() or p.stat().st_size != shard["bytes"]:
            return None
    if not all((folder / "samples" / f"{n}.npy").is_file() for n in ("shard", "pos", "length")):
        return None
    return TokenStore(folder)


class TokenStore:
    """A committed store: its manifest, and samples by position in file order."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        self.shard_names = [s["name"] for s in self.manifest["shards"]]
        self._arrays: dict[str, np.ndarray] = {}
        self._open: OrderedDict[int, tuple] = OrderedDict()

    def __getstate__(self):  # workers get the folder, never open maps
        return {"folder": self.folder}

    def __setstate__(self, state):
        self.__init__(state["folder"])

    def array(self, name: str) -> np.ndarray:
        """samples/<name>.npy, memory-mapped."""
        if name not in self._arrays:
            self._arrays[name] = np.load(self.folder / "samples" / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def stats(self) -> DataStats:
        return DataStats(**self.manifest["stats"])

    def counts(self) -> np.ndarray:
        return np.load(self.folder / "counts.npy")

    def _shard(self, k: int):
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        import pyarrow as pa

        table = pa.ipc.open_file(pa.memory_map(str(self.folder / self.shard_names[k]))).read_all()
        cols = (table.column("sample_id").combine_chunks(), table.column("input_ids").combine_chunks(),
                table.column("loss_mask").combine_chunks())
        self._open[k] = cols
        while len(self._open) > _OPEN_SHARDS:
            self._open.popitem(last=False)  # drops the last reference: the file is unmapped
        return cols

    def sample(self, i: int) -> Sample:
        """Sample i (file order)."""
        k, r = int(self.array("shard")[i]), int(self.array("pos")[i])
        sid, ids, mask = self._shard(k)
        return Sample(sample_id=sid[r].as_py(),
                      input_ids=torch.from_numpy(ids[r].values.to_numpy().astype(np.int64)),
                      loss_mask=torch.from_numpy(mask[r].values.to_numpy().astype(bool)))


def build_index(store: TokenStore, *, pack: bool, max_length: int, rows_per_batch: int) -> Path:
    """Write (once) the batch layout for these settings into the store: packed rows (pack_rows) or one sample per
    row in file order, rows_per_batch rows per batch. Returns its folder."""
    import hashlib

    name = "index-" + hashlib.sha256(json.dumps([pack, max_length, rows_per_batch]).encode()).hexdigest()[:12]
    folder = store.folder / name
    if (folder / "batch_offsets.npy").is_file():
        return folder
    lengths = np.asarray(store.array("length"))
    rows = pack_rows(lengths.tolist(), max_length) if pack else [[i] for i in range(len(lengths))]
    row_samples = np.fromiter((i for row in rows for i in row), dtype=np.int64, count=len(lengths))
    row_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=row_offsets[1:])
    batch_offsets = np.arange(0, len(rows) + rows_per_batch, rows_per_batch, dtype=np.int64)
    batch_offsets[-1] = len(rows)
    batch_offsets = np.unique(batch_offsets)
    tmp = store.folder / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    for n, a in (("row_samples", row_samples), ("row_offsets", row_offsets), ("batch_offsets", batch_offsets)):
        save_array(tmp / f"{n}.npy", a)
    try:
        os.rename(tmp, folder)
    except OSError:  # another builder wrote the same index first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


class StoreBatches(Sequence):
    """The batches of a store's index as a lazy, picklable sequence: `len` from the index, `[b]` reads batch b's
    samples from the memory-mapped shards. Pickling carries two paths and the pad id, never data."""

    def __init__(self, store: TokenStore, index: Path, pad_token_id: int) -> None:
        self.store, self.index, self.pad = store, Path(index), pad_token_id
        self._load()

    def _load(self) -> None:
        self._arrays = {n: np.load(self.index / f"{n}.npy", mmap_mode="r")
                        for n in ("batch_offsets", "row_offsets", "row_samples")}

    def __getstate__(self):
        return {"store": self.store, "index": self.index, "pad": self.pad}

    def __setstate__(self, state):
        self.store, self.index, self.pad = state["store"], state["index"], state["pad"]
        self._load()

    def __len__(self) -> int:
        return len(self._arrays["batch_offsets"]) - 1

    def __getitem__(self, b):
        if isinstance(b, slice):
            return [self[i] for i in range(*b.indices(len(self)))]
        if not -len(self) <= b < len(self):
            raise IndexError(f"batch {b} of {len(self)}")
        b %= len(self)
        bo, ro, rs = self._arrays["batch_offsets"], self._arrays["row_offsets"], self._arrays["row_samples"]
        rows = [[self.store.sample(int(i)) for i in rs[ro[r]:ro[r + 1]]] for r in range(bo[b], bo[b + 1])]
        return _rows_to_batch(rows, self.pad)

    def rows(self) -> int:
        return len(self._arrays["row_offsets"]) - 1


class ShardView(Sequence):
    """`batches[order[i]]` for i in range(len(order)), read when asked (a worker's shard of an epoch)."""

    def __init__(self, batches: Sequence, order: Sequence[int]) -> None:
        self.batches, self.order = batches, list(order)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i):
        return self.batches[self.order[i]]


__all__ = ["Batch", "StoreBatches", "ShardView", "TokenStore", "build_index", "commit", "open_store", "pack_rows",
           "temp_folder", "write_shard"]
