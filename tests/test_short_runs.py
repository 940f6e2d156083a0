"""Short runs: notebook 02 runs to its end after one step (the adapter is still zero: the warm-up's first step has
learning rate 0), and says what a run that short cannot measure instead of printing it."""

from tools.notebook_runner import notebooks, printed_text, run_notebook


def test_notebook_02_runs_to_its_end_after_one_step(tmp_path):
    text = printed_text(
        run_notebook(
            notebooks(["02"])[0],
            "smoke",
            out_dir=tmp_path / "executed",
            progress_bar=False,
            OUTPUT_DIR=str(tmp_path / "qlora"),
            MAX_STEPS=1,
        )
    )
    assert "train loss: 1 logged step(s), too few for the medians of a first and last tenth (20 needed)" in text
    assert "tokens_per_second                        - (fewer than 2 steps: no speed to measure)" in text
    assert "28 adapted weights: each equals W + 1·B·A computed in float32 and rounded once" in text
    assert "PROBLEM" not in text and (tmp_path / "qlora" / "merged" / "model.safetensors").is_file()
