"""Stored notebooks are clean and parameterised; each executes in the smoke profile."""

import json

import nbformat
import pytest

from utils.notebook_runner import notebooks, run_notebook

ALL = notebooks()


def test_the_series_is_there():
    assert [p.name[:2] for p in ALL][:3] == ["01", "02", "03"]


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_stored_without_outputs_and_with_parameters(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and 'PROFILE = "auto"' in tagged[0].source
    assert nb.cells[0].cell_type == "markdown" and "**Hardware.**" in nb.cells[0].source
    assert "**Time.**" in nb.cells[0].source
    assert "## Try this" in nb.cells[-1].source


def _outputs(executed):
    nb = json.loads(executed.read_text())
    return "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))


def test_notebook_01_executes_in_smoke(tmp_path):
    executed = run_notebook(ALL[0], "smoke", out_dir=tmp_path, OUT=str(tmp_path / "processed"))
    text = _outputs(executed)
    assert "Profile: smoke — asked for explicitly" in text
    assert "66 rows in, 50 kept, 16 dropped, 3 truecased (5 messages)" in text
    assert (tmp_path / "processed" / "report.json").is_file()


def test_notebook_02_executes_in_smoke(tmp_path):
    executed = run_notebook(ALL[1], "smoke", out_dir=tmp_path, OUTPUT_DIR=str(tmp_path / "qlora"))
    text = _outputs(executed)
    assert "28 linear layers are 4-bit" in text
    assert "Starting a new run." in text
    assert "same next token: True" in text
    assert (tmp_path / "qlora" / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "qlora" / "trainer_state.json").is_file()


def test_notebook_03_executes_in_smoke(tmp_path):
    executed = run_notebook(ALL[2], "smoke", out_dir=tmp_path, OUTPUT_DIR=str(tmp_path / "full"), SMOKE_STEPS=4)
    text = _outputs(executed)
    assert "skipped: one node of 8 GPUs needed, this machine has 0" in text
    assert "rank 0 of 2: 4 steps" in text and "rank 1 of 2: 4 steps" in text
    assert "checkpoints: ['checkpoint-4'] | trainer_state.json: True" in text
