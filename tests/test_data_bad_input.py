"""Bad input and damaged files: every mistake a user can make is one line on stderr and exit 2 before any work, a
bad row is a dropped row with a reason, and nothing of the user's is ever lost. Through the command line only."""

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc

import datasets
import pytest

from utils import REPO_ROOT, SAMPLE_DIR
from utils.prepare_data import main

SAMPLE_RAW = SAMPLE_DIR / "ultrachat_raw" / "ultrachat_raw.jsonl"
MARKER = ".prepared-by-utils.prepare_data"
GOOD = {"messages": [{"role": "user", "content": "Is tea hot?"}, {"role": "assistant", "content": "Usually, yes."}]}


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the command gets as far as loading the tokenizer."""
    monkeypatch.setattr("utils.assets.load_tokenizer", lambda *a, **k: pytest.fail("work began before the check"))


def run(*argv):
    return main([*map(str, argv), "--no-progress"])


def report_of(folder):
    return json.loads((folder / "report.json").read_text())


def test_a_folder_that_only_looks_prepared_is_refused(tmp_path, capsys, no_work):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (mine / "report.json").write_text("{}")
    (mine / "thesis.txt").write_text("four years of work")
    assert run("--source", SAMPLE_RAW, "--out", mine) == 2
    assert capsys.readouterr().err == (
        f"error: --out {mine} already holds files this tool did not write; choose a new or empty folder\n"
    )
    assert sorted(p.name for p in mine.iterdir()) == ["dataset_dict.json", "report.json", "thesis.txt"]


def test_a_message_with_an_extra_key_is_a_dropped_row(tmp_path, capsys):
    src = tmp_path / "rows.jsonl"
    named = {"messages": [{"role": "user", "content": "Hi", "name": "Ann"}, {"role": "assistant", "content": "Yo"}]}
    null = {"messages": [{"role": "user", "content": "Hey", "name": None}, {"role": "assistant", "content": "Yo"}]}
    src.write_text("\n".join(json.dumps(r) for r in (GOOD, named, null)) + "\n")
    out = tmp_path / "out"
    assert run("--source", src, "--out", out, "--test-fraction", "0") == 0
    report = report_of(out)
    assert report["dropped"] == {"structure:unexpected_key": 1} and report["kept"] == 2
    train = datasets.load_from_disk(str(out))["train"]
    assert train["prompt"][:] == ["Is tea hot?", "Hey"]
    assert train[1]["messages"] == [{"content": "Hey", "role": "user"}, {"content": "Yo", "role": "assistant"}]


def test_a_line_nested_too_deep_is_a_dropped_row(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text(json.dumps(GOOD) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    out = tmp_path / "out"
    assert run("--source", src, "--out", out, "--test-fraction", "0", "--max-chars", 300_000) == 0
    assert report_of(out)["dropped"] == {"invalid_json": 1}
    assert report_of(out)["kept"] == 1


def test_a_binary_disclaimers_file_is_one_line_before_any_work(tmp_path, capsys, no_work):
    binary = tmp_path / "phrases.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert run("--source", SAMPLE_RAW, "--out", tmp_path / "out", "--disclaimers", binary) == 2
    assert capsys.readouterr().err == f"error: --disclaimers {binary} is not a UTF-8 text file\n"
    missing = tmp_path / "missing.txt"
    assert run("--source", SAMPLE_RAW, "--out", tmp_path / "out", "--disclaimers", missing) == 2
    assert capsys.readouterr().err == f"error: --disclaimers {missing}: No such file or directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phrases.bin"]


def test_out_under_a_file_is_one_line_before_any_work(tmp_path, capsys, no_work):
    a_file = tmp_path / "somefile.txt"
    a_file.write_text("keep me")
    out = a_file / "out"
    assert run("--source", SAMPLE_RAW, "--out", out) == 2
    assert capsys.readouterr().err == f"error: --out {out} cannot be created: {a_file} is a file, not a folder\n"
    assert a_file.read_text() == "keep me"


def test_a_symlink_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    prepared = tmp_path / "prepared"
    assert run("--source", SAMPLE_RAW, "--out", prepared) == 0
    before = {p.relative_to(prepared): p.read_bytes() for p in prepared.rglob("*") if p.is_file()}
    link = tmp_path / "link"
    link.symlink_to(prepared)
    capsys.readouterr()
    monkeypatch.setattr("utils.assets.load_tokenizer", lambda *a, **k: pytest.fail("work began before the check"))
    assert run("--source", SAMPLE_RAW, "--out", link) == 2
    assert (
        capsys.readouterr().err == f"error: --out {link} is a symbolic link (to {prepared}); name the folder itself\n"
    )
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link", "prepared"]
    assert {p.relative_to(prepared): p.read_bytes() for p in prepared.rglob("*") if p.is_file()} == before


def test_stale_copies_of_a_swapped_output_are_cleaned(tmp_path):
    out = tmp_path / "out"
    assert run("--source", SAMPLE_RAW, "--out", out) == 0
    # killed in the swap window, after the new output went into place: the old copy was whole, or half deleted
    # (the marker goes last); a folder of the user's under a similar name has no marker and stays
    whole = tmp_path / ".out.old-ab12cd34"
    subprocess.run(["cp", "-a", str(out), str(whole)], check=True)
    half = tmp_path / ".out.old-ef56gh78"
    (half / "train").mkdir(parents=True)
    (half / "train" / "state.json").write_text("{}")
    (half / MARKER).write_text("")
    users = tmp_path / ".out.old-mine"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    assert run("--source", SAMPLE_RAW, "--out", out, "--filters", "all") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old-mine", "out"]
    assert (users / "notes.txt").read_text() == "mine"
    assert datasets.load_from_disk(str(out))["train"].num_rows == 15


def test_a_huge_max_length_costs_no_memory(tmp_path):
    tracemalloc.start()
    try:
        assert run("--source", SAMPLE_RAW, "--out", tmp_path / "out", "--max-length", 100_000_000) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    stats = report_of(tmp_path / "out")["outputs"]["train"]
    assert stats["packed_sequences_bfd"] == stats["packed_sequences_bfd_split"] == 1
    assert peak < 200_000_000  # bytes; a list of max_length entries alone would be 800 MB


def big_source(path):
    """A source that takes a run some seconds: 40,000 lines, half of them good dialogues."""
    with path.open("w") as handle:
        for i in range(20_000):
            answer = f"Answer {i}: " + "the river runs to the sea and the sea is salt. " * 12
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"}, GOOD["messages"][1]]}) + "\n")
            handle.write(json.dumps({"id": i, "data": [f"Question {i}?", answer]}) + "\n")
    return path


def writing(out, source):
    """A ``python -m utils.prepare_data`` run on ``out``, returned once it is writing rows."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "utils.prepare_data", "--source", str(source), "--out", str(out), "--no-progress"],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not list(out.parent.glob(f".{out.name}.tmp-{proc.pid}-*/.train.arrow")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run ended before it wrote rows")
        time.sleep(0.05)
    return proc


def test_a_second_run_on_the_same_out_is_refused_and_a_killed_ones_lock_is_not(tmp_path, capsys):
    out = tmp_path / "out"
    first = writing(out, big_source(tmp_path / "big.jsonl"))
    try:
        assert run("--source", SAMPLE_RAW, "--out", out) == 2
        assert capsys.readouterr().err == (
            f"error: --out {out} is being written by another run (process {first.pid}); wait for it to end, or "
            "choose another folder\n"
        )
        assert first.poll() is None  # the first run goes on
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    assert run("--source", SAMPLE_RAW, "--out", out) == 0  # a killed run does not block the next
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl", "out"]
    assert datasets.load_from_disk(str(out))["train"].num_rows == 15


def test_a_run_killed_mid_way_leaves_the_previous_output_whole(tmp_path):
    out = tmp_path / "out"
    assert run("--source", SAMPLE_RAW, "--out", out) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = writing(out, big_source(tmp_path / "big.jsonl"))
    try:
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert datasets.load_from_disk(str(out))["train"].num_rows == 15
    assert len(list(tmp_path.glob(".out.tmp-*"))) == 1  # what the killed run left, until the next run
    assert run("--source", SAMPLE_RAW, "--out", out, "--filters", "all") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl", "out"]
