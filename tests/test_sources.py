"""Every input layout users have reads to the same records, in the same order (eagle3/sources.py), with clear
errors for what cannot be read. Hugging Face folders are written by the real `datasets` library."""
from __future__ import annotations

import json

import pytest

from eagle3.data import DataError
from eagle3.sources import SourceError, iter_source_records, part_location, resolve_parts
from tests.test_data import sharegpt, write_jsonl

RECORDS = [sharegpt(f"r{i}", ("human", f"question {i}"), ("gpt", f"answer {i}")) for i in range(25)]
OPENAI = [{"id": f"o{i}", "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
          for i in range(5)]


def read_all(spec, **kw):
    return [r for _, _, r in iter_source_records(resolve_parts(spec, **kw))]


def test_jsonl_json_and_a_cut_off_json_list(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", RECORDS)
    (tmp_path / "b.json").write_text(json.dumps(RECORDS))
    cut = json.dumps(RECORDS)
    (tmp_path / "c.json").write_text(cut[: len(cut) - 30])  # a cut-off download, like the packaged ShareGPT
    assert read_all(str(tmp_path / "a.jsonl")) == RECORDS
    assert read_all(str(tmp_path / "b.json")) == RECORDS
    got = read_all(str(tmp_path / "c.json"))
    assert got[:-1] == RECORDS[:-1] and isinstance(got[-1], DataError) and got[-1].reason == "incomplete_tail"


def test_parquet_row_groups_in_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "d.parquet", row_group_size=7)
    parts = resolve_parts(str(tmp_path / "d.parquet"))
    assert [(p.group, p.first, p.rows) for p in parts] == [(0, 0, 7), (1, 7, 7), (2, 14, 7), (3, 21, 4)]
    assert read_all(str(tmp_path / "d.parquet")) == RECORDS
    where = [part_location(p, i, r) for p, i, r in iter_source_records(parts)]
    assert where[8] == f"{tmp_path / 'd.parquet'}: row 8 id='r8'"


def test_parquet_without_a_turns_column_or_not_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["x"], "text": ["hello"]}), tmp_path / "t.parquet")
    with pytest.raises(SourceError, match=r"t.parquet: no 'conversations' \(ShareGPT\) or 'messages' \(OpenAI\) "
                                          r"column \(its columns: id, text\); rename the column"):
        resolve_parts(str(tmp_path / "t.parquet"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SourceError, match=r"bad.parquet: not a readable Parquet file .*re-write it"):
        resolve_parts(str(tmp_path / "bad.parquet"))


def test_datasets_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")  # a test dependency ([test] extra); the reader needs only pyarrow
    ds = datasets.Dataset.from_list(RECORDS)
    ds.save_to_disk(str(tmp_path / "one"), num_shards=3)
    assert read_all(str(tmp_path / "one")) == RECORDS
    datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(OPENAI)}).save_to_disk(str(tmp_path / "dd"))
    assert read_all(str(tmp_path / "dd")) == RECORDS
    assert read_all(str(tmp_path / "dd"), split="test") == OPENAI
    with pytest.raises(SourceError, match=r"is a DatasetDict with splits \['train', 'test'\], not 'dev'; set data.split"):
        resolve_parts(str(tmp_path / "dd"), split="dev")


def test_hub_layout_folder_glob_and_list(tmp_path):
    datasets = pytest.importorskip("datasets")
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    datasets.Dataset.from_list(RECORDS[:10]).to_parquet(str(hub / "train-00000-of-00002.parquet"))
    datasets.Dataset.from_list(RECORDS[10:]).to_parquet(str(hub / "train-00001-of-00002.parquet"))
    datasets.Dataset.from_list(OPENAI).to_parquet(str(hub / "test-00000-of-00001.parquet"))
    (tmp_path / "hub" / "README.md").write_text("# card")
    assert read_all(str(tmp_path / "hub")) == RECORDS
    assert read_all(str(tmp_path / "hub"), split="test") == OPENAI
    # What datasets itself reads from that folder is what we read.
    assert datasets.load_dataset("parquet", data_files=str(hub / "train-*.parquet"), split="train").to_list() == RECORDS
    write_jsonl(tmp_path / "x1.jsonl", RECORDS[:3])
    write_jsonl(tmp_path / "x2.jsonl", OPENAI)
    assert read_all(str(tmp_path / "x*.jsonl")) == RECORDS[:3] + OPENAI
    assert read_all([str(tmp_path / "x2.jsonl"), str(tmp_path / "x1.jsonl")]) == OPENAI + RECORDS[:3]
    assert read_all([str(tmp_path / "x*.jsonl"), str(tmp_path / "x1.jsonl")]) == RECORDS[:3] + OPENAI  # read once


@pytest.mark.parametrize("spec, match", [
    ("missing.jsonl", r"data.path='.*missing.jsonl' does not exist; give data.path a .jsonl/.json/.parquet file"),
    ("nothing*.jsonl", r"matches no dataset file"),
    ("notes.txt", r".txt is not a dataset file type"),
    ("empty_dir", r"is a folder with no .json/.jsonl/.parquet/.arrow files"),
])
def test_paths_that_name_nothing_readable(tmp_path, spec, match):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(SourceError, match=match):
        resolve_parts(str(tmp_path / spec))
    with pytest.raises(SourceError, match="data.path is an empty list"):
        resolve_parts([])
