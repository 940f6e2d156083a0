"""Bad input and damaged files on the training side: nothing of the user's lost, no silently wrong result, one line
and a non-zero exit where the user can act."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import read_only, smoke_argv

from utils import REPO_ROOT, ConfigError, sft
from utils.runs import checkpoint_problem, checkpoint_steps, newest_loadable_checkpoint

RAW = REPO_ROOT / "data" / "sample" / "ultrachat_raw" / "ultrachat_raw.jsonl"


def _err(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "run"
    assert sft.cli(smoke_argv(out, "--save_total_limit", "2")) == 0
    return out


def _copy_interrupted(finished, tmp_path):
    """The finished run, as if killed after its last checkpoint, with checkpoints that do not hold the last step."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "status": "running"}))
    (run / "trainer_state.json").unlink()
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        state = json.loads((run / ckpt / "trainer_state.json").read_text())
        (run / ckpt / "trainer_state.json").write_text(json.dumps({**state, "max_steps": 8}))
    return run


# --- lost files -----------------------------------------------------------------------------------------------------
def test_another_tools_run_folder_is_never_resumed_or_cleared(tmp_path, capsys):
    theirs = tmp_path / "theirs"
    (theirs / "checkpoint-500").mkdir(parents=True)
    (theirs / "checkpoint-500" / "trainer_state.json").write_text('{"global_step": 500}')
    (theirs / "README.md").write_text("my model card")
    for extra in ((), ("--fresh", "true")):
        assert sft.cli(smoke_argv(theirs, *extra)) == 2
        assert _err(capsys) == [
            f"error: output folder {theirs} holds files this tool did not write; choose another folder"
        ]
    assert sorted(p.name for p in theirs.iterdir()) == ["README.md", "checkpoint-500"]
    assert (theirs / "README.md").read_text() == "my model card"


# --- silently wrong -----------------------------------------------------------------------------------------------
def test_the_data_cache_is_keyed_by_the_source_itself(tmp_path, capsys, private_data_cache):
    """Two sources with the same file name used to share runs/data/train.jsonl: the second trained on the first."""
    from utils.assets import load_tokenizer
    from utils.data.prepared import prepared_dataset

    lines = RAW.read_text().splitlines()
    a, b = tmp_path / "a" / "train.jsonl", tmp_path / "b" / "train.jsonl"
    for path, rows in ((a, lines[:12]), (b, lines[12:])):
        path.parent.mkdir()
        path.write_text("\n".join(rows) + "\n")
    tokenizer = load_tokenizer(None)
    first, second = prepared_dataset(str(a), tokenizer), prepared_dataset(str(b), tokenizer)
    assert first != second and first.name.startswith("train.jsonl-") and second.name.startswith("train.jsonl-")
    assert first.parent == second.parent == private_data_cache
    assert json.loads((first / "report.json").read_text())["input_rows"] == 12
    assert json.loads((second / "report.json").read_text())["input_rows"] == len(lines) - 12
    capsys.readouterr()
    assert prepared_dataset(str(a), tokenizer) == first and "Preparing" not in capsys.readouterr().out  # cached
    a.write_text("\n".join(lines[:13]) + "\n")  # the source changed
    third = prepared_dataset(str(a), tokenizer)
    assert third != first and json.loads((third / "report.json").read_text())["input_rows"] == 13
    assert "(it changed since it was last prepared)" in capsys.readouterr().out


def test_a_runs_folder_that_is_a_file_is_named_by_its_variable(tmp_path):
    a_file = tmp_path / "runs"
    a_file.write_text("keep me")
    result = subprocess.run(
        # the sample, which is prepared into the cache (data/processed/ultrachat, where notebook 01 ran, would not be)
        [
            sys.executable,
            "-m",
            "utils.sft",
            *smoke_argv(tmp_path / "o", "--dataset_name", "data/sample/ultrachat_200k"),
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "MISTRAL_SFT_RUNS": str(a_file)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"error: MISTRAL_SFT_RUNS={a_file} cannot hold the prepared data: {a_file} is a file, not a folder; "
        "set MISTRAL_SFT_RUNS to a folder\n"
    )
    assert a_file.read_text() == "keep me" and not (tmp_path / "o").exists()


def test_a_prepared_folder_copied_without_its_marker_says_what_is_missing(tmp_path, tokenizer, capsys):
    from utils.data.output import MARKER, is_current
    from utils.data.prepared import prepared_dataset
    from utils.hardware import SMOKE

    copy = tmp_path / "copy"
    shutil.copytree(prepared_dataset(SMOKE.dataset, tokenizer), copy, ignore=shutil.ignore_patterns(".*"))
    with pytest.raises(ConfigError) as error:
        prepared_dataset(str(copy), tokenizer)
    assert str(error.value) == (
        f"{copy} holds notebook 01's output in today's format, without {MARKER}; copy it again with its hidden files "
        "(cp -a), or prepare it again into a new folder with notebook 01"
    )
    report = json.loads((copy / "report.json").read_text())
    (copy / "report.json").write_text(json.dumps({**report, "format": 2}))  # an earlier release's is dated so
    with pytest.raises(ConfigError, match=r"copy was prepared by an earlier release of this collection; prepare it"):
        prepared_dataset(str(copy), tokenizer)
    (copy / "report.json").write_text(json.dumps(report))
    (copy / MARKER).write_text("")  # this tool's folder, a file of it lost: prepared again from its source
    (copy / "test" / "state.json").unlink()
    capsys.readouterr()
    assert prepared_dataset(str(copy), tokenizer) == copy and is_current(copy)
    assert capsys.readouterr().out.startswith(
        f"{copy} holds notebook 01's output in today's format, without test/state.json; preparing it again from "
    )


def test_a_checkpoint_with_garbage_tensors_is_skipped_by_name(finished, tmp_path, capsys):
    run = _copy_interrupted(finished, tmp_path)
    weights = run / "checkpoint-4" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = b"\xff" * (len(data) - header)  # header intact, every tensor NaN
    weights.write_bytes(bytes(data))
    assert checkpoint_problem(run / "checkpoint-4").startswith("adapter_model.safetensors holds NaN or infinite values")
    assert newest_loadable_checkpoint(run)[0] == str(run / "checkpoint-2")
    assert sft.cli(smoke_argv(run, "--save_total_limit", "2")) == 0
    out = capsys.readouterr().out
    assert "skipped checkpoint-4: adapter_model.safetensors holds NaN or infinite values" in out
    assert f"Resuming from {run / 'checkpoint-2'}" in out
    losses = [h["loss"] for h in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert all(loss == loss and loss > 1 for loss in losses)  # finite, not the 0.0 of NaN weights


def test_a_checkpoint_with_finite_garbage_is_skipped_by_name(finished, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run = _copy_interrupted(finished, tmp_path)
    weights = run / "checkpoint-4" / "adapter_model.safetensors"
    save_file({name: t * 1e18 for name, t in load_file(weights).items()}, weights)  # finite, and no trained weight
    assert "beyond any trained weight" in checkpoint_problem(run / "checkpoint-4")
    assert newest_loadable_checkpoint(run)[0] == str(run / "checkpoint-2")
    assert sft.cli(smoke_argv(run, "--save_total_limit", "2")) == 0
    out = capsys.readouterr().out
    assert "skipped checkpoint-4: adapter_model.safetensors holds a value of " in out
    assert f"Resuming from {run / 'checkpoint-2'}" in out


def test_a_checkpoint_whose_log_has_a_nan_loss_is_not_good(finished, tmp_path):
    run = _copy_interrupted(finished, tmp_path)
    state_file = run / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    logged = [h for h in state["log_history"] if "loss" in h][-1]
    logged["loss"] = float("nan")
    state_file.write_text(json.dumps(state))
    assert checkpoint_problem(run / "checkpoint-4") == f"its log has a non-finite loss at step {logged['step']}"
    assert newest_loadable_checkpoint(run)[0] == str(run / "checkpoint-2")


def test_a_run_that_diverges_stops_in_one_line(tmp_path, capsys):
    out = tmp_path / "nan"
    assert sft.cli(smoke_argv(out, "--learning_rate", "1e30", "--max_grad_norm", "0", steps=6, save=1)) == 2
    err = [line for line in _err(capsys) if "error" in line.lower() or "Traceback" in line]  # not the progress bars
    assert len(err) == 1 and err[0].startswith("error: training diverged at step ")
    # the steps before the NaN were taken at a learning rate of 1e30: their checkpoints hold finite garbage, so none
    # is named good (naming one sends the user round the same divergence again)
    assert err[0].endswith(
        "(gradient norm nan), so it stopped; the last good checkpoint is none (lower the learning "
        "rate or check the data, then run again to resume from it)"
    )
    assert checkpoint_steps(out)
    assert all("beyond any trained weight" in checkpoint_problem(c) for _, c in checkpoint_steps(out))
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and not (out / "adapter").exists()


def test_a_damaged_run_record_is_one_line_and_changes_nothing(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "run.json").write_text('{"tool": "utils.sft", "sett')  # truncated
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    for extra in (("--lora_r", "8"), (), ("--fresh", "true")):
        assert sft.cli(smoke_argv(run, "--save_total_limit", "2", *extra)) == 2
        assert _err(capsys) == [
            f"error: {run / 'run.json'} is damaged, so this run's settings cannot be checked; repair or remove it, or "
            "choose another output folder"
        ]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == {
        p: t for p, t in before.items() if p.name != ".lock"
    }


# --- tracebacks where one line is due -----------------------------------------------------------------------------
def test_a_raw_source_without_held_out_rows_trains_without_evaluation(tmp_path, capsys, private_data_cache):
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(RAW.read_text().splitlines()[:3]) + "\n")  # too few rows for a held-out share
    out = tmp_path / "out"
    argv = [a for a in smoke_argv(out, "--dataset_name", str(small)) if a not in ("--eval_strategy", "no")]
    assert sft.cli(argv) == 0
    assert f"Note: {small} has no held-out rows, so evaluation is off (eval_strategy no)." in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_a_damaged_optimizer_state_is_skipped(finished, tmp_path):
    run = _copy_interrupted(finished, tmp_path)
    optimizer = run / "checkpoint-4" / "optimizer.pt"
    import zipfile

    with zipfile.ZipFile(optimizer) as z:  # a valid zip whose pickle is garbage
        members = {n: z.read(n) for n in z.namelist()}
    pickle = next(n for n in members if n.endswith("data.pkl"))
    members[pickle] = b"\x80\x05garbage"
    with zipfile.ZipFile(optimizer, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    assert zipfile.is_zipfile(optimizer)
    assert checkpoint_problem(run / "checkpoint-4").startswith("optimizer.pt is damaged")
    assert newest_loadable_checkpoint(run)[0] == str(run / "checkpoint-2")


def test_an_incomplete_trainer_state_is_skipped(finished, tmp_path):
    run = _copy_interrupted(finished, tmp_path)
    (run / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 8}')
    assert checkpoint_problem(run / "checkpoint-4") == "trainer_state.json is incomplete (no valid max_steps)"
    assert newest_loadable_checkpoint(run)[0] == str(run / "checkpoint-2")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora_alpha", "nan"], "error: argument --lora_alpha/--lora-alpha: invalid int value: 'nan'"),
        (["--seed", "-1"], "error: seed must be 0 or more, got -1"),
        (["--no_such_option", "1"], "error: unrecognized arguments: --no_such_option 1"),
    ],
)
def test_bad_values_are_one_line_without_a_usage_block(extra, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "utils.sft", *smoke_argv(tmp_path / "o", *extra)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and result.stderr == message + "\n"
    assert not (tmp_path / "o").exists()


def test_a_max_length_beyond_the_models_positions_is_capped_in_one_line(tmp_path, capsys):
    settings = sft.resolve(smoke_argv(tmp_path / "o", "--max_length", "100000000"))
    assert settings.values["max_length"] == 4096
    assert "max_length 100000000 is more than the model's 4096 positions: capped at 4096." in capsys.readouterr().out


def test_a_hub_token_is_kept_out_of_every_saved_file(tmp_path):
    out = tmp_path / "run"
    assert sft.cli(smoke_argv(out, "--hub_token", "hf_SECRETsecretSECRET", steps=2, save=2)) == 0
    for path in out.rglob("*"):
        if path.is_file():
            assert b"hf_SECRETsecretSECRET" not in path.read_bytes(), path


# --- read-only places ------------------------------------------------------------------------------------------------
def test_a_read_only_prepared_folder_trains(tmp_path, capsys):
    from utils.prepare_data import main as prepare

    data = tmp_path / "kaggle-input"
    assert prepare(["--source", str(RAW), "--out", str(data), "--no-progress"]) == 0
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    with read_only(data):
        assert sft.cli(smoke_argv(tmp_path / "run", "--dataset_name", str(data), steps=2)) == 0
    assert f"Note: {data} is read-only, so TRL's preprocessing of it is kept in a temporary folder." in (
        capsys.readouterr().out
    )
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_a_read_only_output_folder_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with read_only(out) as reason:
        assert sft.cli(smoke_argv(out)) == 2
    assert _err(capsys) == [f"error: cannot write to output folder {out} ({reason}); choose another output folder"]


def test_answers_that_cannot_be_logged_are_said_once_and_sampling_goes_on(tmp_path, capsys):
    from utils.sampling import Answer, log_answer

    (tmp_path / "runs").mkdir()
    log = tmp_path / "runs" / "sampling" / "answers.jsonl"
    with read_only(tmp_path / "runs") as reason:
        for _ in range(2):
            log_answer(Answer("Who?", "Arr!", 3, True), "tiny", {"temperature": 0.7}, log)
    out = capsys.readouterr().out.splitlines()
    assert out == [f"Note: answers cannot be logged to {log} ({reason}); the check cell will not see them."]


# --- a full disk ----------------------------------------------------------------------------------------------------
def _limited_cli(argv: list[str], kib: int) -> subprocess.CompletedProcess:
    """``python -m utils.sft argv`` under a file size limit of ``kib`` KiB: a write fails as on a full disk."""
    import resource

    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (kib * 1024, kib * 1024))  # noqa: E731
    cmd = [sys.executable, "-m", "utils.sft", *argv]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, preexec_fn=limit, timeout=600)


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """One step first, without a limit: the tiny model's copy, the prepared sample and TRL's cached labels exist, so
    the limited runs below fail where they save their checkpoint or their merge."""
    assert sft.cli(smoke_argv(tmp_path_factory.mktemp("warm") / "run", steps=1)) == 0


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(warm, tmp_path):
    out = tmp_path / "run"
    result = _limited_cli(smoke_argv(out, steps=2, save=1), kib=300)  # the adapter fits, the optimizer state not
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert result.returncode == 2 and errors == [
        f"error: no room left to write in {out} (File too large (os error 27)): free space, then run again to resume "
        "from the newest whole checkpoint"
    ]
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_a_full_disk_during_the_merge_is_one_line_and_a_rerun_merges(warm, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*smoke_argv(out, steps=2, save=2), "--merge", "true"]
    result = _limited_cli(argv, kib=4000)  # the adapter and its tokenizer fit, the merged model (8.6 MB) not
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert result.returncode == 2 and errors == [
        f"error: could not write the merged model to {out / 'merged'} (File too large (os error 27)); the adapter "
        f"is saved in {out / 'adapter'}: free space, then run again to merge it"
    ]
    assert not (out / "merged").exists() and not list(out.glob(".merged.tmp-*"))
    assert sft.cli(argv) == 0
    assert f"{out / 'merged'} is missing or incomplete: merging the saved adapter into it" in capsys.readouterr().out
    merged = out / "merged" / "model.safetensors"
    assert merged.stat().st_mode & 0o777 == 0o666 & ~_current_umask()  # a course's other users may load it


def test_saved_weights_are_readable_by_others_as_the_umask_allows(finished):
    mode = 0o666 & ~_current_umask()
    weights = [*finished.glob("checkpoint-*/*.safetensors"), *finished.glob("adapter/*.safetensors")]
    assert weights and {oct(w.stat().st_mode & 0o777) for w in weights} == {oct(mode)}  # safetensors wrote 0600


def _current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_other_processes_of_a_fresh_run_keep_what_the_main_one_started(tmp_path):
    """torchrun's other processes open the folder after the main one (``training.start_run``): with --fresh true they
    find the record the main process has just written, and clear nothing."""
    from utils.runs import open_run, read_record, release

    out = tmp_path / "run"
    open_run(out, {"seed": 1}).finish(global_step=4, max_steps=4)  # an earlier run in the folder
    open_run(out, {"seed": 2}, fresh=True)  # the main process clears it and records the new run
    (out / "trainer_state.json").write_text("{}\n")  # and starts writing
    other = open_run(out, {"seed": 2}, fresh=True, main_process=False)
    assert read_record(out)["settings"] == {"seed": 2} and read_record(out)["status"] == "running"
    assert (out / "trainer_state.json").read_text() == "{}\n"
    assert not other.finished and other.resume_from is None
    release(out)
