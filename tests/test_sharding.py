"""Notebook 03's FSDP demo (``torchrun -m utils.sharding``) on any number of ranks: every rank steps as often as the
others, whatever the number of rows; too few rows for the ranks is one line before any training."""

import os
import shutil
import signal
import subprocess
import sys
from collections import Counter

import datasets
import pytest

from utils import REPO_ROOT
from utils.data.output import MARKER
from utils.sharding import prepared_sample


def runs_with_sample_rows(runs, rows: int):
    """A MISTRAL_SFT_RUNS folder whose prepared sample keeps only its first ``rows`` training rows."""
    full = prepared_sample()
    cut = runs / "data" / os.path.basename(full)
    data = datasets.load_from_disk(full)
    datasets.DatasetDict({"train": data["train"].select(range(rows)), "test": data["test"]}).save_to_disk(str(cut))
    for name in ("report.json", MARKER):
        shutil.copy(os.path.join(full, name), cut / name)
    return runs


def torchrun(ranks: int, runs, *argv) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node ranks -m utils.sharding argv`` with MISTRAL_SFT_RUNS=runs; every process it
    started is ended if it does not finish in time (ranks waiting for each other)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "-m", "utils.sharding"]
    env = {**os.environ, "MISTRAL_SFT_RUNS": str(runs)}
    proc = subprocess.Popen(
        [*command, *argv],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the ranks did not finish: {out[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("ranks, steps", [(3, 3), (4, 2)])  # 22 rows: 7 or 5 rows a rank, 3 or 2 batches of 2
def test_every_rank_steps_as_often_to_the_end_of_the_data(ranks, steps, tmp_path):
    result = torchrun(ranks, runs_with_sample_rows(tmp_path, 22), "--steps", "9")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = [line.split("]")[0] for line in result.stdout.splitlines() if " its own loss " in line]
    assert Counter(lines) == {f"[rank {rank}/{ranks}": steps for rank in range(ranks)}
    assert "gathered on rank 0 for saving: 4,317,760 parameters" in result.stdout


def test_too_few_rows_for_the_ranks_is_one_line(tmp_path):
    result = torchrun(2, runs_with_sample_rows(tmp_path, 3), "--steps", "1")
    assert result.returncode != 0 and " its own loss " not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: the prepared sample has 3 training rows: too few for 2 ranks of 2 rows each "
        "(--nproc_per_node 1 at most)"
    ]
