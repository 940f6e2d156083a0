"""The Try this items of notebooks 01, 02 and 03 run exactly as written, and the check cell marks what they showed.

(04's and 05's read the runs of the whole series: tests/test_notebooks.py.)"""

import ast
import re
import shlex
import subprocess

from helpers import try_this_items

from tools.notebook_runner import notebooks, printed_text, run_notebook
from utils import REPO_ROOT, exercises


def test_try_this_01_parameters_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MISTRAL_SFT_RUNS", str(tmp_path / "runs"))  # the check cell's record of earlier runs
    path = notebooks(["01"])[0]
    params, commands = try_this_items(path)
    assert len(params) == 3 and not commands
    run_notebook(path, "smoke", out_dir=tmp_path / "executed", progress_bar=False, OUT=str(tmp_path / "default"))
    for name, value in params:  # SYSTEM_TURN = False compares with the default run just made
        executed = run_notebook(
            path,
            "smoke",
            out_dir=tmp_path / name,
            progress_bar=False,
            OUT=str(tmp_path / "processed"),
            **{name: ast.literal_eval(value)},
        )
        text = printed_text(executed)
        assert f"✓ {name} = {value}: " in text, text[-1500:]


def _run_commands(number: str, cwd, env) -> list[str]:
    _, commands = try_this_items(notebooks([number])[0])
    assert len(commands) >= 3
    for name in ("configs", "data"):  # the commands name these relative to the collection
        (cwd / name).symlink_to(REPO_ROOT / name)
    for command in commands:
        result = subprocess.run(shlex.split(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (command, result.stderr[-2000:])
    return commands


def test_try_this_02_commands_run(tmp_path, command_env):
    commands = _run_commands("02", tmp_path, command_env)
    again = subprocess.run(shlex.split(commands[0]), cwd=tmp_path, env=command_env, capture_output=True, text=True)
    assert again.returncode == 0 and "already trained: 4/4 steps in runs/qlora-r64" in again.stdout  # a second run
    lines = exercises.notebook_02(tmp_path / "runs", main_run=tmp_path / "runs" / "qlora")  # no notebook run here
    assert lines[0] == "✓ rank 64: r = 64, 335,872 adapter parameters"
    assert lines[1] == "· bfd_split: 194 packed rows; run the notebook's own run to compare"
    assert lines[2] == "✓ ten steps: the learning rate is 0 at step 1 and peaks at step 2 (0.005)"
    assert re.fullmatch(  # its own medians: the notebook's run, to compare with, is not made here
        r"· answers only: its training loss ends at \d\.\d{3} \(median of the last tenth of the steps\); run the "
        r"notebook's own run to compare",
        lines[3],
    ), lines[3]


def test_try_this_03_commands_run(tmp_path, command_env):
    _run_commands("03", tmp_path, command_env)
    lines = exercises.notebook_03({"accumulation, 16 GPUs x 4": 8, "accumulation, 4 GPUs x 2": 64}, tmp_path / "runs")
    assert [line[0] for line in lines] == ["✓", "✓", "✓", "·"], lines
