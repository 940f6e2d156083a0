"""The data pipeline of notebook 01: accounting, outputs, the command line and the packing counts."""

import json
import string
import subprocess
import sys

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils import REPO_ROOT, SAMPLE_DIR
from utils.prepare_data import (
    SourceError, count_bfd_bins, main, open_source, pack_wrapped, prepare, prompt_id, render, save,
)

SAMPLE_200K = SAMPLE_DIR / "ultrachat_200k"
SAMPLE_RAW = SAMPLE_DIR / "ultrachat_raw" / "ultrachat_raw.jsonl"
SAMPLE_DROPS = {
    "disclaimer": 3, "duplicate_prompt": 2, "invalid_json": 1, "missing_messages": 1, "not_an_object": 1,
    "structure:bad_role": 1, "structure:content_not_string": 1, "structure:empty_content": 1,
    "structure:ends_with_user": 1, "structure:misplaced_system": 1, "structure:not_a_list": 1,
    "structure:not_alternating": 1, "structure:starts_with_assistant": 1,
}


@pytest.fixture(scope="module")
def sample(tokenizer):
    return prepare(open_source(str(SAMPLE_200K)), tokenizer, progress=False)


def test_sample_accounting_is_exact(sample):
    report = sample.report()
    assert report["input_rows"] == 66
    assert report["kept"] == 50
    assert report["dropped"] == SAMPLE_DROPS
    assert report["truecased"] == 3 and report["truecased_messages"] == 5
    assert report["splits"]["train_sft"]["input_rows"] == 60 and report["splits"]["train_sft"]["kept"] == 44
    assert report["splits"]["test_sft"] == {"input_rows": 6, "kept": 6, "dropped": {}, "truecased": 0,
                                            "truecased_messages": 0}
    assert len(sample.rows["train"]["prompt"]) == 44 and len(sample.rows["test"]["prompt"]) == 6


def test_drop_examples_name_split_and_line(sample):
    examples = sample.reports["train_sft"].examples
    assert examples["invalid_json"]["where"] == "train_sft:2"
    assert examples["not_an_object"]["where"] == "train_sft:4"
    assert examples["disclaimer"]["row"]["prompt"] == "What is your favourite colour?"


def test_kept_rows_are_truecased_hashed_and_tokenized(sample, tokenizer):
    rows = sample.rows["train"]
    i = rows["prompt"].index("hello. How do I boil an egg?")
    assert rows["messages"][i][1]["content"] == (
        "Place the egg in boiling water for nine minutes. Then cool it in cold water! After that it peels easily.")
    assert rows["prompt_id"][i] == prompt_id("hello. How do I boil an egg?")
    assert rows["input_ids"][i] == tokenizer(render(rows["messages"][i]))["input_ids"]
    assert rows["num_tokens"][i] == len(rows["input_ids"][i])
    code = rows["prompt"].index("How do I print a list in Python?")
    assert "# ends with a dot. then a comment" in rows["messages"][code][1]["content"]  # code left alone
    system = rows["prompt"].index("What is the boiling point of water at sea level?")
    assert rows["messages"][system][0]["role"] == "system" and rows["num_turns"][system] == 1


def test_raw_schema_gets_a_hash_split(tokenizer):
    prepared = prepare(open_source(str(SAMPLE_RAW)), tokenizer, progress=False)
    report = prepared.report()
    assert report["input_rows"] == 23 and report["kept"] == 16
    assert report["dropped"] == {"disclaimer": 1, "duplicate_prompt": 1, "invalid_json": 1, "missing_messages": 1,
                                 "structure:empty_content": 1, "structure:ends_with_user": 1,
                                 "structure:not_a_list": 1}
    assert report["truecased"] == 1
    train, test = (len(prepared.rows[s]["prompt"]) for s in ("train", "test"))
    assert train + test == 16 and test == 1
    again = prepare(open_source(str(SAMPLE_RAW)), tokenizer, progress=False)
    assert again.rows["test"]["prompt"] == prepared.rows["test"]["prompt"]  # deterministic


def test_token_length_bounds(tokenizer):
    prepared = prepare(open_source(str(SAMPLE_200K)), tokenizer, min_tokens=55, max_tokens=200, progress=False)
    dropped = prepared.report()["dropped"]
    assert dropped["too_long"] == 1  # the history of paper
    assert dropped["too_short"] == 3  # 50, 50 and 54 tokens
    assert all(55 <= n <= 200 for split in prepared.rows.values() for n in split["num_tokens"])


# --- the accounting invariant over generated malformed input ---------------------------------------------------------
text = st.text(alphabet=string.ascii_letters + " .!?é", max_size=12)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot"]),
                                 "content": st.one_of(text, st.integers(), st.none())})
row = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(message, max_size=5)}),
    st.fixed_dictionaries({"data": st.one_of(st.lists(text, max_size=5), text)}),
    st.dictionaries(st.sampled_from(["prompt", "id", "x"]), text, max_size=2),
)
line = st.one_of(row.map(json.dumps), text, st.lists(st.integers(), max_size=3).map(json.dumps),
                 st.just("{\"messages\": ["), st.integers().map(str))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(train=st.lists(line, max_size=25), test=st.lists(line, max_size=10))
def test_every_row_is_kept_or_dropped_once(tokenizer, train, test, tmp_path_factory):
    folder = tmp_path_factory.mktemp("src")
    for name, lines in (("train_sft", train), ("test_sft", test)):
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepared = prepare(open_source(str(folder)), tokenizer, progress=False)
    for name, lines in (("train_sft", train), ("test_sft", test)):
        report = prepared.reports[name]
        assert report.input_rows == sum(1 for x in lines if x.strip())
        assert report.kept + sum(report.dropped.values()) == report.input_rows
    total_kept = sum(len(cols["prompt"]) for cols in prepared.rows.values())
    assert total_kept == sum(r.kept for r in prepared.reports.values())


# --- saving and the command line -------------------------------------------------------------------------------------
def test_save_reloads_and_replaces_atomically(sample, tmp_path, monkeypatch):
    out = tmp_path / "processed"
    report = save(sample, out, "sample")
    loaded = datasets.load_from_disk(str(out))
    assert set(loaded) == {"train", "test"} and loaded["train"].num_rows == 44
    assert {"prompt", "prompt_id", "messages", "input_ids"} <= set(loaded["train"].column_names)
    assert json.loads((out / "report.json").read_text())["kept"] == report["kept"] == 50

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", crash)
    with pytest.raises(KeyboardInterrupt):
        save(sample, out, "interrupted")
    assert json.loads((out / "report.json").read_text())["source"] == "sample"  # the old output is intact
    assert [p.name for p in tmp_path.iterdir()] == ["processed"]  # no temporary folder left behind


def test_cli_writes_output(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--source", str(SAMPLE_200K), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("66 rows read, 50 kept, 16 dropped, 3 truecased")
    assert "dropped      3  disclaimer" in printed
    assert datasets.load_from_disk(str(out))["test"].num_rows == 6


@pytest.mark.parametrize("argv, message", [
    (["--source", "no/such/file.jsonl"], "error: no such file or folder: no/such/file.jsonl"),
    (["--max-tokens", "0"], "error: --max-tokens must be positive, got 0"),
    (["--test-fraction", "1.5"], "error: --test-fraction must be in [0, 1), got 1.5"),
])
def test_cli_bad_input_is_one_line(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == message + "\n"
    assert not (tmp_path / "o").exists()


def test_cli_unreadable_file_exits_nonzero(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "train_sft.jsonl").mkdir()  # a folder where a file should be: unreadable
    result = subprocess.run([sys.executable, "-m", "utils.prepare_data", "--source", str(folder), "--out",
                             str(tmp_path / "o"), "--no-progress"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot read {folder / 'train_sft.jsonl'}")


def test_hub_source_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from utils import hardware

    hardware.hub_reachable.cache_clear()
    with pytest.raises(SourceError, match="Hub is unreachable"):
        open_source("HuggingFaceH4/ultrachat_200k")


# --- packing -------------------------------------------------------------------------------------------------------
def test_count_bfd_bins():
    assert count_bfd_bins([], 10) == 0
    assert count_bfd_bins([10, 10], 10) == 2
    assert count_bfd_bins([6, 4, 5, 5], 10) == 2
    assert count_bfd_bins([7, 6, 3, 2, 2], 10) == 2  # 7+3, 6+2+2
    assert count_bfd_bins([25], 10) == 1  # truncated to one full sequence
    assert count_bfd_bins([1] * 100, 10) == 10


def test_pack_wrapped():
    packed = pack_wrapped([[1, 2, 3], [4, 5], [6, 7, 8, 9]], max_length=4)
    assert packed.shape == (2, 4)
    assert packed.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
