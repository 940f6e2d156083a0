"""Reading sources: a folder in the Hub's layout goes through datasets.load_dataset and is streamed from its Arrow
files; Parquet is read a batch at a time; the fingerprint follows the content."""

import json
import tracemalloc

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from utils import SAMPLE_DIR
from utils.data.pipeline import prepare
from utils.data.sources import (
    BATCH_ROWS,
    MAX_CHARS,
    open_source,
    read_jsonl,
    read_parquet,
    sft_data_files,
    source_fingerprint,
)

SAMPLE_200K = SAMPLE_DIR / "ultrachat_200k"


def good_rows(name):
    """The well-formed rows of a sample file (Parquet needs one schema)."""
    rows = []
    for line in (SAMPLE_200K / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        messages = row.get("messages") if isinstance(row, dict) else None
        if isinstance(messages, list) and all(
            isinstance(m, dict) and set(m) == {"role", "content"} and isinstance(m["content"], str) for m in messages
        ):
            rows.append({"prompt": row["prompt"], "prompt_id": row["prompt_id"], "messages": messages})
    return rows


@pytest.fixture
def hub_folder(tmp_path):
    """The 200k sample's well-formed rows as the Hub stores ultrachat_200k: 3 train_sft shards, 1 test_sft shard."""
    folder = tmp_path / "ultrachat_200k"
    (folder / "data").mkdir(parents=True)
    train = good_rows("train_sft")
    for k in range(3):
        shard = train[k * len(train) // 3 : (k + 1) * len(train) // 3]
        pq.write_table(pa.Table.from_pylist(shard), folder / "data" / f"train_sft-0000{k}-of-00003.parquet")
    pq.write_table(pa.Table.from_pylist(good_rows("test_sft")), folder / "data" / "test_sft-00000-of-00001.parquet")
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "x", "other": 1}]), folder / "data" / "train_gen-00000-of-00001.parquet"
    )
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# a dataset card\n")
    return folder


def test_a_hub_layout_folder_is_loaded_by_datasets_and_streamed(hub_folder, tokenizer, tmp_path, monkeypatch):
    loaded = []
    load_dataset = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: loaded.append((a, k)) or load_dataset(*a, **k))

    def materialised(*args, **kwargs):
        raise AssertionError("the dataset was iterated through its memory map")

    monkeypatch.setattr(datasets.Dataset, "__iter__", materialised)
    monkeypatch.setattr(datasets.Dataset, "__getitem__", materialised)
    splits = open_source(str(hub_folder))
    shards = [f"data/train_sft-0000{k}-of-00003.parquet" for k in range(3)]
    data_files = {"test_sft": ["data/test_sft-00000-of-00001.parquet"], "train_sft": shards}  # not train_gen
    assert loaded == [((str(hub_folder),), {"data_files": data_files, "revision": None})]
    train = good_rows("train_sft")
    assert {name: split.num_rows for name, split in splits.items()} == {"train_sft": len(train), "test_sft": 6}
    assert [obj for _, obj, _ in splits["train_sft"]] == train  # every shard, in order
    assert [n for n, _, _ in splits["test_sft"]] == [1, 2, 3, 4, 5, 6]
    monkeypatch.undo()

    jsonl = tmp_path / "jsonl"  # the same rows as JSON Lines: the same output
    jsonl.mkdir()
    for name in ("train_sft", "test_sft"):
        lines = [json.dumps(row) for row in good_rows(name)]
        (jsonl / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    from_hub = prepare(open_source(str(hub_folder)), tokenizer, tmp_path / "a", source=str(hub_folder)).report
    from_jsonl = prepare(open_source(str(jsonl)), tokenizer, tmp_path / "b", source=str(jsonl)).report
    assert from_hub["splits"] == from_jsonl["splits"] and from_hub["outputs"] == from_jsonl["outputs"]
    assert from_hub["input_rows"] == len(train) + 6
    a, b = (datasets.load_from_disk(str(tmp_path / x)) for x in "ab")
    assert a["train"]["input_ids"][:] == b["train"]["input_ids"][:] and a["test"][:] == b["test"][:]


def test_only_the_sft_shards_of_a_hub_repository_are_loaded():
    files = [
        ".gitattributes",
        "README.md",
        "data/test_gen-00000-of-00001-3d4cd8309148a71f.parquet",
        "data/test_sft-00000-of-00001-f7dfac4afe5b93f4.parquet",
        "data/train_gen-00000-of-00003-a6c9fb894be3e50b.parquet",
        "data/train_sft-00001-of-00003-58100a2e1d6a5a72.parquet",
        "data/train_sft-00000-of-00003-a3ecf92756993583.parquet",
    ]
    assert sft_data_files(files) == {
        "test_sft": ["data/test_sft-00000-of-00001-f7dfac4afe5b93f4.parquet"],
        "train_sft": [
            "data/train_sft-00000-of-00003-a3ecf92756993583.parquet",
            "data/train_sft-00001-of-00003-58100a2e1d6a5a72.parquet",
        ],
    }
    assert sft_data_files(["README.md", "train_0.jsonl", "data/train.jsonl"]) is None  # loaded whole


def test_the_progress_bar_knows_the_total(hub_folder, tokenizer, capsys):
    prepare(open_source(str(hub_folder)), tokenizer, progress=True)
    err = capsys.readouterr().err
    assert "train_sft: 100%|" in err and f"| {len(good_rows('train_sft'))}/{len(good_rows('train_sft'))} [" in err
    assert "rows/s]" in err


def test_parquet_is_read_a_batch_at_a_time(tmp_path, monkeypatch):
    path = tmp_path / "train.parquet"
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(2500)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    batches = []
    iter_batches = pq.ParquetFile.iter_batches
    monkeypatch.setattr(
        pq.ParquetFile, "iter_batches", lambda self, **k: batches.append(k["batch_size"]) or iter_batches(self, **k)
    )
    read = list(read_parquet(path))
    assert batches == [BATCH_ROWS] and [n for n, _, _ in read] == list(range(1, 2501))
    assert [obj for _, obj, _ in read] == rows
    assert open_source(str(path))["train"].num_rows == 2500  # from the footer, before any row is read


def test_a_huge_line_is_never_held_whole(tmp_path):
    path = tmp_path / "rows.jsonl"
    with path.open("wb") as handle:
        handle.write(b'{"messages": []}\n' + b"x" * 20_000_000 + b"\n" + b'{"data": []}\n' + b"y" * 3_000_000)
    tracemalloc.start()
    try:
        rows = list(read_jsonl(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows == [
        (1, {"messages": []}, None),
        (2, None, "too_large"),
        (3, {"data": []}, None),
        (4, None, "too_large"),
    ]
    assert peak < 16 * MAX_CHARS  # bytes: a few pieces of 4 * MAX_CHARS at most, never the whole 20 MB line


def test_the_fingerprint_follows_the_content(hub_folder, tmp_path):
    first = source_fingerprint(str(hub_folder))
    assert len(first) == 64 and first == source_fingerprint(str(hub_folder))
    (hub_folder / "README.md").write_text("another card\n")  # not a data file
    assert source_fingerprint(str(hub_folder)) == first
    shard = hub_folder / "data" / "test_sft-00000-of-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    changed = source_fingerprint(str(hub_folder))
    assert changed != first
    shard.rename(hub_folder / "data" / "test_sft-00000-of-00002.parquet")  # same bytes, another name
    assert source_fingerprint(str(hub_folder)) not in (first, changed)
    one = tmp_path / "rows.jsonl"
    one.write_text('{"messages": []}\n')
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "rows.jsonl").write_text('{"messages": []}\n')
    assert source_fingerprint(str(one)) != source_fingerprint(str(copy / "rows.jsonl"))  # another place


def test_a_hub_fingerprint_is_the_id_and_revision_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from utils import hardware

    hardware.hub_reachable.cache_clear()
    main = source_fingerprint("HuggingFaceH4/ultrachat_200k")
    assert main == source_fingerprint("HuggingFaceH4/ultrachat_200k", "main")
    assert main != source_fingerprint("HuggingFaceH4/ultrachat_200k", "abc123")
    assert main != source_fingerprint("HuggingFaceH4/other")
