"""Stored notebooks are clean and parameterised; the whole series executes in the smoke profile, in order."""

import json

import nbformat
import pytest

from utils.notebook_runner import notebooks, run_notebook

ALL = notebooks()


def test_the_series_is_there():
    assert [p.name[:2] for p in ALL] == ["01", "02", "03", "04", "05"]


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


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Run 01 to 05 in the smoke profile, as `make tutorial` does; 04 and 05 read what 02 and 03 wrote."""
    base = tmp_path_factory.mktemp("series")
    runs = base / "runs"
    params = {
        "01": dict(OUT=str(base / "processed")),
        "02": dict(OUTPUT_DIR=str(runs / "qlora")),
        "03": dict(OUTPUT_DIR=str(runs / "full"), SMOKE_STEPS=4),
        "04": dict(RUNS=str(runs), PLOTS=str(base / "plots")),
        "05": dict(RUNS=str(runs), MAX_NEW_TOKENS=32),
    }
    texts = {}
    for path in ALL:
        number = path.name[:2]
        texts[number] = _outputs(run_notebook(path, "smoke", out_dir=base / "executed", **params[number]))
    return base, texts


def test_notebook_01(series):
    base, texts = series
    assert "Profile: smoke — asked for explicitly" in texts["01"]
    assert "66 rows in, 50 kept, 16 dropped, 3 truecased (5 messages)" in texts["01"]
    assert (base / "processed" / "report.json").is_file()


def test_notebook_02(series):
    base, texts = series
    assert "28 linear layers are 4-bit" in texts["02"]
    assert "Starting a new run." in texts["02"]
    assert "same next token: True" in texts["02"]
    assert (base / "runs" / "qlora" / "merged" / "model.safetensors").is_file()


def test_notebook_03(series):
    _, texts = series
    assert "skipped: one node of 8 GPUs needed, this machine has 0" in texts["03"]
    assert "rank 0 of 2: 4 steps" in texts["03"] and "rank 1 of 2: 4 steps" in texts["03"]
    assert "checkpoints: ['checkpoint-4'] | trainer_state.json: True" in texts["03"]


def test_notebook_04(series):
    base, texts = series
    assert "full         4 train logs" in texts["04"] and "qlora        30 train logs" in texts["04"]
    assert (base / "plots" / "loss_curves.png").is_file() and (base / "plots" / "loss_curves.svg").is_file()


def test_notebook_05(series):
    _, texts = series
    assert "You are a friendly chatbot who always responds in the style of a pirate</s>" in texts["05"]
    assert "re-ran full with seed 42: identical answers" in texts["05"]
    assert "GPU memory: no GPU" in texts["05"]


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_papermill_reads_every_parameter(path):
    """papermill parses the parameters cell to show and check overrides; an apostrophe in a comment breaks it."""
    from papermill.inspection import inspect_notebook

    nb = nbformat.read(path, as_version=4)
    source = next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    names = [line.split("=")[0].strip() for line in source.splitlines() if "=" in line and not line.startswith("#")]
    assert list(inspect_notebook(str(path))) == names
