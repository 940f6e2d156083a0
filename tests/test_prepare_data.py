"""The data pipeline of notebook 01: accounting, outputs and the command line."""

import json
import os
import shutil
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils import REPO_ROOT, SAMPLE_DIR
from utils.data.output import MARKER, OutputError, is_current
from utils.data.pipeline import OptionError, prepare, prepare_source
from utils.data.sources import SourceError, Split, open_source, source_fingerprint
from utils.data.template import prompt_id, render, tokenize_dialogues, with_system_turn
from utils.prepare_data import main

# The hand-written sample with its planted bad rows (train_sft.jsonl, test_sft.jsonl), without the pirate dialogues
# that joined the folder later (tests/test_tiny_base.py covers those): the counts below are of these two files.
SAMPLE_200K = Path(tempfile.mkdtemp(prefix="sample-")) / "ultrachat_200k"
SAMPLE_200K.mkdir()
for _name in ("train_sft.jsonl", "test_sft.jsonl"):
    shutil.copy(SAMPLE_DIR / "ultrachat_200k" / _name, SAMPLE_200K / _name)
SAMPLE_RAW = SAMPLE_DIR / "ultrachat_raw" / "ultrachat_raw.jsonl"
STRUCTURE_DROPS = {
    "invalid_json": 1,
    "missing_messages": 1,
    "not_an_object": 1,
    "structure:bad_role": 1,
    "structure:content_not_string": 1,
    "structure:empty_content": 1,
    "structure:ends_with_user": 1,
    "structure:misplaced_system": 1,
    "structure:not_a_list": 1,
    "structure:not_alternating": 1,
    "structure:starts_with_assistant": 1,
}
SAMPLE_DROPS = {**STRUCTURE_DROPS, "disclaimer": 3, "duplicate_prompt": 2}
# <s> <|system|>\n </s> ▁\n <|user|>\n: the card's empty system turn, in the card's ids ("▁" after every </s>)
SYSTEM_TURN_IDS = [1, 523, 28766, 6574, 28766, 28767, 13, 2, 28705, 13, 28789, 28766, 1838, 28766, 28767, 13]
GOOD = {"messages": [{"role": "user", "content": "Is tea hot?"}, {"role": "assistant", "content": "Usually, yes."}]}


def rows_of(*objs):
    """A split of the given rows, numbered from 1."""
    return Split(lambda: ((i, obj, None) for i, obj in enumerate(objs, start=1)), len(objs))


def prepared_to(folder, splits, tokenizer, **options):
    """Prepare into ``folder``; the result and the reloaded output."""
    result = prepare(splits, tokenizer, folder, **options)
    return result, datasets.load_from_disk(str(folder))


@pytest.fixture(scope="module")
def sample(tokenizer, tmp_path_factory):
    return prepared_to(tmp_path_factory.mktemp("sample") / "out", open_source(str(SAMPLE_200K)), tokenizer)


@pytest.fixture(scope="module")
def filtered(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("filtered") / "out"
    return prepared_to(folder, open_source(str(SAMPLE_200K)), tokenizer, filters="all")


def test_ultrachat_200k_rows_are_kept_and_the_chain_audited(sample):
    prepared, saved = sample
    report = prepared.report
    assert report["input_rows"] == 66
    assert report["kept"] == 55
    assert report["dropped"] == STRUCTURE_DROPS
    assert report["audited"] == {"disclaimer": 3, "duplicate_prompt": 2, "truecase": 3}
    assert report["filters_applied"] == ["structure"]
    assert report["filters_audited"] == ["truecase", "disclaimer", "duplicate_prompt"]
    assert report["truecased"] == 0 and report["system_turn"] is True
    assert report["splits"]["train_sft"]["input_rows"] == 60 and report["splits"]["train_sft"]["kept"] == 49
    rows = saved["train"]
    i = next(i for i, p in enumerate(rows["prompt"]) if p.lower() == "hello. how do i boil an egg?")
    assert rows[i]["messages"][1]["content"].startswith("Place the egg in boiling water for nine minutes. then")
    audit = prepared.splits["train_sft"].audit_examples
    assert audit["disclaimer"]["row"]["prompt"] == "What is your favourite colour?"


def test_filters_all_applies_the_chain(filtered):
    prepared, saved = filtered
    report = prepared.report
    assert report["input_rows"] == 66
    assert report["kept"] == 50
    assert report["dropped"] == SAMPLE_DROPS
    assert report["truecased"] == 3 and report["truecased_messages"] == 5
    assert report["filters_applied"] == ["structure", "truecase", "disclaimer", "duplicate_prompt"]
    assert report["filters_audited"] == [] and report["audited"] == {}
    assert report["splits"]["train_sft"]["input_rows"] == 60 and report["splits"]["train_sft"]["kept"] == 44
    assert report["splits"]["test_sft"] == {
        "input_rows": 6,
        "kept": 6,
        "dropped": {},
        "truecased": 0,
        "truecased_messages": 0,
        "audited": {},
    }
    assert saved["train"].num_rows == 44 and saved["test"].num_rows == 6


def test_drop_examples_name_split_and_line(filtered):
    examples = filtered[0].splits["train_sft"].examples
    assert examples["invalid_json"]["where"] == "train_sft:2"
    assert examples["not_an_object"]["where"] == "train_sft:4"
    assert examples["disclaimer"]["row"]["prompt"] == "What is your favourite colour?"


def test_every_dialogue_starts_with_the_empty_system_turn(sample, tokenizer, tmp_path):
    rows = sample[1]["train"]
    without = [i for i, m in enumerate(rows["messages"]) if m[0]["role"] != "system"]
    assert len(without) == 48  # all but the one dialogue with its own system prompt
    for i in without:
        assert rows[i]["input_ids"][:16] == SYSTEM_TURN_IDS
    ids = tokenizer(render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]))["input_ids"]
    # the embedded tokenizer is legacy (as Mistral's): called on text it gives the card's ids too
    hi_yo = [23809, 2, 28705, 13, 28789, 28766, 489, 11143, 28766, 28767, 13, 28802, 28709, 2, 28705, 13, 2]
    assert ids == SYSTEM_TURN_IDS + hi_yo
    hi = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    _, short = prepared_to(tmp_path / "o", {"train": rows_of(hi)}, tokenizer, test_fraction=0, system_turn=False)
    assert short["train"][0]["input_ids"] == [1, 523] + ids[11:]  # 9 tokens fewer without it


def test_special_token_text_in_messages_stays_text_on_request(tokenizer, tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "What do <s> and </s> mean?"},
            {"role": "assistant", "content": "They mark a start </s> and an end."},
        ]
    }
    for tokenization in ("card-text", "today"):
        options = dict(test_fraction=0, tokenization=tokenization)
        _, saved = prepared_to(tmp_path / tokenization, {"train": rows_of(row)}, tokenizer, **options)
        ids = saved["train"][0]["input_ids"]
        assert ids.count(tokenizer.bos_token_id) == 1 and ids.count(tokenizer.eos_token_id) == 4  # system, 2 turns, end
        assert "▁</" in tokenizer.convert_ids_to_tokens(ids)
    _, saved = prepared_to(tmp_path / "card", {"train": rows_of(row)}, tokenizer, test_fraction=0)
    ids = saved["train"][0]["input_ids"]  # the card's: that text became control tokens, as the 2023 tokenizer made it
    assert ids.count(tokenizer.bos_token_id) == 2 and ids.count(tokenizer.eos_token_id) == 6
    plain = [
        {"role": "user", "content": "What do they mean?"},
        {"role": "assistant", "content": "They mark a start and an end."},
    ]
    for tokenization in ("card-text", "today"):  # the usual ids on plain text
        (whole,) = tokenize_dialogues(tokenizer, [plain], tokenization=tokenization)
        (split,) = tokenize_dialogues(tokenizer, [row["messages"]], tokenization=tokenization)
        assert split[:3] == whole[:3] and split.count(tokenizer.eos_token_id) == whole.count(tokenizer.eos_token_id)
    assert tokenize_dialogues(tokenizer, [plain], tokenization="card-text") == tokenize_dialogues(tokenizer, [plain])
    assert tokenize_dialogues(tokenizer, [with_system_turn(plain)], system_turn=False) == tokenize_dialogues(
        tokenizer, [plain]
    )


def test_kept_rows_are_truecased_hashed_and_tokenized(filtered, tokenizer):
    rows = filtered[1]["train"]
    prompts = rows["prompt"][:]
    row = rows[prompts.index("hello. How do I boil an egg?")]
    assert row["messages"][1]["content"] == (
        "Place the egg in boiling water for nine minutes. Then cool it in cold water! After that it peels easily."
    )
    assert row["prompt_id"] == prompt_id("hello. How do I boil an egg?")
    assert row["input_ids"] == tokenizer(render(row["messages"]))["input_ids"]
    assert row["num_tokens"] == len(row["input_ids"])
    code = rows[prompts.index("How do I print a list in Python?")]
    assert "# ends with a dot. then a comment" in code["messages"][1]["content"]  # code left alone
    system = rows[prompts.index("What is the boiling point of water at sea level?")]
    assert system["messages"][0]["role"] == "system" and system["num_turns"] == 1


def test_raw_schema_gets_a_hash_split(tokenizer, tmp_path):
    prepared, saved = prepared_to(tmp_path / "a", open_source(str(SAMPLE_RAW)), tokenizer)
    report = prepared.report
    assert report["input_rows"] == 23 and report["kept"] == 16
    assert report["dropped"] == {
        "disclaimer": 1,
        "duplicate_prompt": 1,
        "invalid_json": 1,
        "missing_messages": 1,
        "structure:empty_content": 1,
        "structure:ends_with_user": 1,
        "structure:not_a_list": 1,
    }
    assert report["truecased"] == 1
    assert (saved["train"].num_rows, saved["test"].num_rows) == (15, 1)
    _, again = prepared_to(tmp_path / "b", open_source(str(SAMPLE_RAW)), tokenizer)
    assert again["test"]["prompt"][:] == saved["test"]["prompt"][:]  # deterministic


def test_token_length_bounds(tokenizer, tmp_path):
    splits = open_source(str(SAMPLE_200K))
    prepared, saved = prepared_to(tmp_path / "o", splits, tokenizer, min_tokens=66, max_tokens=213, filters="all")
    dropped = prepared.report["dropped"]
    assert dropped["too_long"] == 1  # the history of paper
    assert dropped["too_short"] == 3  # 61, 61 and 65 tokens (each with the 9-token system turn, in the card's ids)
    assert all(66 <= n <= 213 for split in saved.values() for n in split["num_tokens"])
    assert sorted(prepared.lengths["train"].tolist()) == sorted(saved["train"]["num_tokens"][:])


def test_without_an_output_folder_only_the_report(tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepared = prepare(open_source(str(SAMPLE_RAW)), tokenizer, source=str(SAMPLE_RAW))
    assert prepared.report["kept"] == 16 and prepared.report["source"] == str(SAMPLE_RAW)
    assert prepared.report["source_fingerprint"] == source_fingerprint(str(SAMPLE_RAW))
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere
    assert prepare(open_source(str(SAMPLE_RAW)), tokenizer).report["source_fingerprint"] is None


def test_prepare_source_does_the_whole_job(tokenizer, tmp_path):
    out = tmp_path / "out"
    report = prepare_source(str(SAMPLE_RAW), out, tokenizer, filters="all", system_turn=False)
    assert report == json.loads((out / "report.json").read_text())
    assert report["kept"] == 16 and report["system_turn"] is False and report["source"] == str(SAMPLE_RAW)
    assert report["source_fingerprint"] == source_fingerprint(str(SAMPLE_RAW))
    assert is_current(out) and datasets.load_from_disk(str(out))["train"].num_rows == 15
    with pytest.raises(SourceError, match="no such file or folder"):
        prepare_source(str(tmp_path / "missing.jsonl"), tmp_path / "o2", tokenizer)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="already holds files this tool did not write"):
        prepare_source(str(SAMPLE_RAW), tmp_path / "mine", tokenizer)
    with pytest.raises(OptionError, match=r"^max_length must be positive, got 0$"):
        prepare_source(str(SAMPLE_RAW), tmp_path / "o3", tokenizer, max_length=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]


# --- the accounting invariant over generated malformed input ---------------------------------------------------------
text = st.text(alphabet=string.ascii_letters + " .!?é", max_size=12)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", "bot"]),
        "content": st.one_of(text, st.integers(), st.none()),
    },
    optional={"name": st.one_of(st.none(), text)},
)
row = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(message, max_size=5)}),
    st.fixed_dictionaries({"data": st.one_of(st.lists(text, max_size=5), text)}),
    st.dictionaries(st.sampled_from(["prompt", "id", "x"]), text, max_size=2),
)
line = st.one_of(
    row.map(json.dumps),
    text,
    st.lists(st.integers(), max_size=3).map(json.dumps),
    st.just('{"messages": ['),
    st.integers().map(str),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(train=st.lists(line, max_size=25), test=st.lists(line, max_size=10))
def test_every_row_is_kept_or_dropped_once(tokenizer, train, test, tmp_path_factory):
    folder = tmp_path_factory.mktemp("src")
    for name, lines in (("train_sft", train), ("test_sft", test)):
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepared = prepare(open_source(str(folder)), tokenizer)
    for name, lines in (("train_sft", train), ("test_sft", test)):
        report = prepared.splits[name]
        assert report.input_rows == sum(1 for x in lines if x.strip())
        assert report.kept + sum(report.dropped.values()) == report.input_rows
    assert sum(map(len, prepared.lengths.values())) == sum(r.kept for r in prepared.splits.values())


# --- saving and the command line -------------------------------------------------------------------------------------
def test_output_reloads_and_an_interrupted_run_leaves_it_intact(tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "processed"
    prepared, loaded = prepared_to(out, open_source(str(SAMPLE_200K)), tokenizer, source="sample")
    assert set(loaded) == {"train", "test"} and loaded["train"].num_rows == 49
    assert loaded["train"].column_names == ["prompt", "prompt_id", "messages", "input_ids", "num_tokens", "num_turns"]
    assert json.loads((out / "report.json").read_text()) == prepared.report
    assert prepared.report["kept"] == 55 and (out / MARKER).is_file()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("utils.data.output.OutputWriter.write", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(open_source(str(SAMPLE_200K)), tokenizer, out, source="interrupted")
    assert json.loads((out / "report.json").read_text())["source"] == "sample"  # the old output is intact
    assert [p.name for p in tmp_path.iterdir()] == ["processed"]  # no temporary folder left behind


def test_cli_writes_output(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--source", str(SAMPLE_200K), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("66 rows read, 55 kept, 11 dropped, 0 truecased")
    assert (
        "  filters applied: structure; audited only: truecase, disclaimer, duplicate_prompt; token ids: card\n"
        in printed
    )
    assert "audited      3  disclaimer (kept: ultrachat_200k's authors already filtered it" in printed
    assert datasets.load_from_disk(str(out))["test"].num_rows == 6
    assert main(["--source", str(SAMPLE_200K), "--out", str(out), "--no-progress", "--filters", "all"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("66 rows read, 50 kept, 16 dropped, 3 truecased")  # its own output: replaced
    assert "dropped      3  disclaimer" in printed


# --- what a careful user can do wrong: one line, exit 2, nothing of theirs touched ----------------------------------
def _cli(*argv):
    return subprocess.run(
        [sys.executable, "-m", "utils.prepare_data", "--no-progress", *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_out_folder_of_the_users_is_never_touched(tmp_path):
    mine = tmp_path / "my_notes"
    mine.mkdir()
    (mine / "thesis.txt").write_text("four years of work")
    result = _cli("--source", str(SAMPLE_200K), "--out", str(mine))
    assert result.returncode == 2 and result.stdout == ""
    assert (
        result.stderr
        == f"error: --out {mine} already holds files this tool did not write; choose a new or empty folder\n"
    )
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"]


def test_out_may_not_be_the_source_or_a_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train_sft.jsonl").write_bytes((SAMPLE_200K / "train_sft.jsonl").read_bytes())
    result = _cli("--source", str(src), "--out", str(src))
    assert result.returncode == 2
    assert result.stderr == f"error: --out {src} would replace the source {src}; write the output somewhere else\n"
    assert (src / "train_sft.jsonl").read_bytes() == (SAMPLE_200K / "train_sft.jsonl").read_bytes()
    a_file = tmp_path / "out.txt"
    a_file.write_text("keep me")
    result = _cli("--source", str(src), "--out", str(a_file))
    assert result.returncode == 2 and result.stderr.startswith(f"error: --out {a_file} is a file; name a folder")
    assert a_file.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "src"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_out_is_refused_before_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    result = _cli("--source", str(SAMPLE_200K), "--out", str(ro / "out"))
    assert result.returncode == 2 and result.stderr.startswith(f"error: cannot write to {ro / 'out'}")


def test_read_only_out_is_refused_before_work_as_root(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("utils.data.output.os.access", lambda path, mode: False)
    monkeypatch.setattr("utils.assets.load_tokenizer", lambda *a, **k: pytest.fail("no work before the check"))
    assert main(["--source", str(SAMPLE_200K), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot write to {tmp_path / 'out'}: ")


def test_killed_swap_is_recovered_and_stale_temporaries_cleaned(tokenizer, tmp_path, capsys):
    out = tmp_path / "processed"
    prepare(open_source(str(SAMPLE_RAW)), tokenizer, out, source="first")
    old = out.rename(tmp_path / ".processed.old-abcd1234")  # killed between the two renames
    dead = tmp_path / ".processed.tmp-999999999-xyz"  # a killed run's temporary folder (no such pid)
    dead.mkdir()
    prepare(open_source(str(SAMPLE_RAW)), tokenizer, out, source="second")
    assert "restored" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["source"] == "second"
    assert not old.exists() and not dead.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["processed"]


def test_empty_splits_are_not_written_and_the_output_loads(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["--source", str(SAMPLE_RAW), "--out", str(out), "--test-fraction", "0", "--no-progress"]) == 0
    assert "  test: no rows, so no test split was written" in capsys.readouterr().out
    assert set(datasets.load_from_disk(str(out))) == {"train"}
    assert json.loads((out / "report.json").read_text())["empty_splits_not_written"] == ["test"]
    out2 = tmp_path / "o2"
    assert main(["--source", str(SAMPLE_RAW.parent), "--out", str(out2), "--no-progress"]) == 0  # a folder, any name
    assert set(datasets.load_from_disk(str(out2))) == {"train", "test"}


def test_nothing_kept_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text("not json\n{}\n")
    assert main(["--source", str(src), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert (
        capsys.readouterr().err
        == f"error: no training rows were kept from {src}; nothing written to {tmp_path / 'o'}\n"
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["--source", str(empty), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.jsonl"]


def test_bad_rows_are_dropped_with_reasons(tmp_path, tokenizer):
    src = tmp_path / "train.jsonl"
    lines = [
        b"\xef\xbb\xbf" + json.dumps(GOOD).encode(),  # a byte-order mark before the first row
        b'{"messages": [{"role": "user", "content": "bad \xff\xfe bytes"}]}',
        json.dumps(
            {"messages": [{"role": "user", "content": "lone \ud800"}, {"role": "assistant", "content": "x"}]}
        ).encode(),  # JSON-escaped lone surrogate
        json.dumps(
            {"messages": [{"role": "user", "content": "big"}, {"role": "assistant", "content": "x" * 300}]}
        ).encode(),
        bytes(range(11, 256)) + bytes(range(10)),  # a binary blob
    ]
    src.write_bytes(b"\n".join(lines) + b"\n")
    prepared = prepare(open_source(str(src), max_chars=200), tokenizer, test_fraction=0, max_chars=200)
    report = prepared.splits["train"]
    assert report.kept == 1 and report.input_rows == 5
    assert dict(report.dropped) == {"invalid_utf8": 2, "invalid_unicode": 1, "too_large": 1}
    assert report.examples["invalid_unicode"]["where"] == "train:3"


def test_json_arrays_are_read_as_arrays(tmp_path, tokenizer):
    src = tmp_path / "rows.json"
    src.write_text(json.dumps([GOOD, {"messages": "no"}, 5], indent=2))
    report = prepare(open_source(str(src)), tokenizer, test_fraction=0).splits["train"]
    assert (report.input_rows, report.kept) == (3, 1)
    assert dict(report.dropped) == {"structure:not_a_list": 1, "not_an_object": 1}


def test_a_corrupt_parquet_file_is_one_error_line(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist([GOOD]), src / "train_sft-00000-of-00002.parquet")
    (src / "train_sft-00001-of-00002.parquet").write_bytes(b"PAR1 this is not parquet")
    assert main(["--source", str(src), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read {src / 'train_sft-00001-of-00002.parquet'}: not a valid Parquet file")
    assert len(err.splitlines()) == 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=40),
    cut=st.integers(0, 10**6),
)
def test_random_byte_corruption_never_crashes(tokenizer, flips, cut, tmp_path_factory):
    data = bytearray((SAMPLE_200K / "train_sft.jsonl").read_bytes())
    for where, value in flips:
        data[where % len(data)] = value
    data = data[: max(1, cut % (len(data) + 1))]
    folder = tmp_path_factory.mktemp("corrupt")
    (folder / "train_sft.jsonl").write_bytes(bytes(data))
    report = prepare(open_source(str(folder)), tokenizer).splits["train_sft"]
    assert report.input_rows == sum(1 for line in bytes(data).split(b"\n") if line.strip())
    assert report.kept + sum(report.dropped.values()) == report.input_rows


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--source", "no/such/file.jsonl"], "error: no such file or folder: no/such/file.jsonl"),
        (["--max-tokens", "0"], "error: --max-tokens must be positive, got 0"),
        (["--test-fraction", "1.5"], "error: --test-fraction must be in [0, 1), got 1.5"),
        (
            ["--min-tokens", "100", "--max-tokens", "10"],
            "error: --max-tokens must be at least the minimum token count (100), got 10",
        ),
    ],
)
def test_cli_bad_input_is_one_line(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == message + "\n"
    assert not (tmp_path / "o").exists()


def test_cli_unreadable_file_exits_nonzero(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "train_sft.jsonl").mkdir()  # a folder where a file should be: unreadable
    result = _cli("--source", str(folder), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot read {folder / 'train_sft.jsonl'}")


def test_hub_source_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from utils import hardware

    hardware.hub_reachable.cache_clear()
    with pytest.raises(SourceError, match="Hub is unreachable"):
        open_source("HuggingFaceH4/ultrachat_200k")


def _as_an_earlier_release(folder: Path, keep_options: bool) -> None:
    report = json.loads((folder / "report.json").read_text())
    report["format"] -= 1
    if not keep_options:
        report.pop("options", None)  # as the releases before this one wrote it
    (folder / "report.json").write_text(json.dumps(report))


def test_an_earlier_format_is_prepared_again_with_the_options_it_recorded(tokenizer, tmp_path, capsys):
    from utils.data.prepared import prepared_dataset

    out = tmp_path / "chosen"
    options = dict(filters="all", max_rows=30, system_turn=False, tokenization="today")
    first = prepare_source(str(SAMPLE_200K), out, tokenizer, **options)
    ids = datasets.load_from_disk(str(out))["train"]["input_ids"]
    _as_an_earlier_release(out, keep_options=True)
    assert prepared_dataset(str(out), tokenizer) == out
    again = json.loads((out / "report.json").read_text())
    assert datasets.load_from_disk(str(out))["train"]["input_ids"] == ids  # the same rows, the same token ids
    assert again["kept"] == first["kept"] and again["options"] == first["options"]
    assert "preparing it again from" in capsys.readouterr().out


def test_an_earlier_format_without_its_options_is_refused_and_left_alone(tokenizer, tmp_path):
    from utils import ConfigError
    from utils.data.prepared import prepared_dataset

    out = tmp_path / "chosen"
    prepare_source(str(SAMPLE_200K), out, tokenizer, filters="all", max_rows=30, system_turn=False)
    _as_an_earlier_release(out, keep_options=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="did not record all its options; prepare it again with notebook 01"):
        prepared_dataset(str(out), tokenizer)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_prepared_folder_is_readable_by_others_as_the_umask_allows(tokenizer, tmp_path):
    old = os.umask(0o022)
    try:
        prepare_source(str(SAMPLE_RAW), tmp_path / "shared", tokenizer)
    finally:
        os.umask(old)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0o700


def test_the_report_names_the_tokenizer_and_a_missing_tokenizer_folder_is_one_line(tmp_path, capsys):
    assert main(["--source", str(SAMPLE_RAW), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["tokenizer"] == "embedded"
    capsys.readouterr()
    assert main(["--source", str(SAMPLE_RAW), "--out", str(tmp_path / "other"), "--tokenizer", "/nonexistent"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: tokenizer /nonexistent does not exist; give a tokenizer folder or a Hub id"
    ]
    assert not (tmp_path / "other").exists()


def test_an_earlier_format_made_with_the_defaults_is_prepared_again_without_recorded_options(tokenizer, tmp_path):
    from utils.data.prepared import prepared_dataset

    out = tmp_path / "defaults"
    first = prepare_source(str(SAMPLE_200K), out, tokenizer, system_turn=False)
    _as_an_earlier_release(out, keep_options=False)  # its counts match a dry run of the defaults it names
    assert prepared_dataset(str(out), tokenizer) == out
    again = json.loads((out / "report.json").read_text())
    assert again["options"] == first["options"] and again["kept"] == first["kept"]
