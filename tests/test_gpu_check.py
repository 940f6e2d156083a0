"""bench/gpu_check.py: its CPU dry run executes notebooks 02, 03 and 05 on a local model and passes every check."""

import json
import re
import subprocess
import sys

from utils import REPO_ROOT


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "checks.json"
    result = subprocess.run(
        [
            sys.executable,
            "bench/gpu_check.py",
            "--dry-run",
            "--steps",
            "4",
            "--work",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    checks = {name: (ok, detail) for name, ok, detail in json.loads(out.read_text())["checks"]}
    assert list(checks) == [
        "model folder",
        "time of stage build",
        "profile",
        "4-bit layers",
        "loss falls",
        "peak memory",
        "adapter merged and checked",
        "time of stage 02",
        "notebook 03 ready for notebook_launcher",
        "time of stage 03",
        "notebook 05 sampled",
        "generation stops at EOS",
        "time of stage 05",
    ]
    assert all(ok for ok, _ in checks.values())
    assert checks["generation stops at EOS"][1] == "stopped after 1 token(s)"
    assert checks["notebook 03 ready for notebook_launcher"][1] == "ready for notebook_launcher: yes"
    assert "GPU path check on CPU (dry run: tiny model)" in result.stdout


def test_a_failing_stage_is_a_failed_row_not_a_traceback(tmp_path):
    """Stage 05 without stage 02's run: the table is printed with the reason, exit 1."""
    result = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--dry-run", "--only", "05", "--work", str(tmp_path / "work")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert "stage 05                                   FAILED RuntimeError: needs stage 02's merged model" in (
        result.stdout
    )
    assert (tmp_path / "work" / ".written-by-gpu_check").is_file()


def test_gpu_check_refuses_a_users_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--dry-run", "--work", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert result.stderr.strip() == f"error: {tmp_path} holds files this check did not write; choose another --work"


def test_a_failing_notebook_names_its_cell_error_and_executed_copy(tmp_path):
    work = tmp_path / "work"
    (work / "qlora" / "merged").mkdir(parents=True)
    (work / ".written-by-gpu_check").write_text("")
    (work / "qlora" / "merged" / "config.json").write_text("{not json")  # a merged model that cannot load
    result = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--dry-run", "--only", "05", "--work", str(work)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    row = next(line for line in result.stdout.splitlines() if line.startswith("stage 05 "))
    executed = work / "executed" / "05_pirate_prompt_sampling.ipynb"
    assert re.search(r"FAILED cell \d+: \w+: \S.* \(executed copy: " + re.escape(str(executed)) + r"\)$", row), row
    assert executed.is_file()


def test_json_into_a_missing_folder_is_refused_before_any_check(tmp_path):
    result = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--dry-run", "--json", str(tmp_path / "no" / "checks.json")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert (
        result.stderr
        == f"error: --json {tmp_path / 'no' / 'checks.json'}: not a file in an existing, writable folder\n"
    )
